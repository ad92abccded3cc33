"""``dsaserve serve``: run the OpenAI-compatible HTTP server (FastAPI + uvicorn) over an ``LLMEngine``.

Exit status: 0 after a normal shutdown (Ctrl-C / SIGTERM end the process by that signal after a clean
shutdown, as uvicorn re-raises it), 1 when the engine died (a worker process was killed, a step hung) or
the server could not start. Worker processes never outlive the server: the engine is shut down on every
path and any child process still alive afterwards is killed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import signal
import time

from dsaserve.engine.client import EngineClient

log = logging.getLogger("dsaserve.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (HF format: config.json, "
                        "safetensors, tokenizer.json)")
    parser.add_argument("--served-model-name", default=None, help="model id clients must send "
                        "(default: the engine's model name, i.e. the directory's basename)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for "
                        "all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    from dsaserve.args import EngineArgs  # engine flags: same names as every other subcommand

    EngineArgs.add_cli_args(parser)
    parser.add_argument("--chat-template", default=None, help="Jinja chat template file overriding the "
                        "checkpoint's")
    parser.add_argument("--step-timeout", type=float, default=600.0, help="seconds one engine step may take "
                        "before the engine is declared hung (the server then exits with status 1)")
    parser.add_argument("--fault-exit-delay", type=float, default=1.0, help="seconds between an engine fault "
                        "and server exit (health reports 503 meanwhile)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="server and uvicorn log level (default info)")
    # For tests: build the engine with another callable (same signature as LLMEngine).
    parser.add_argument("--engine-factory", default=None, help=argparse.SUPPRESS)


def make_engine(args: argparse.Namespace) -> EngineClient:
    """Construct the engine from the command-line flags (``EngineArgs`` fields)."""
    from dsaserve.args import EngineArgs

    if args.engine_factory:
        module_name, _, attr = args.engine_factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
    else:
        from dsaserve.engine.engine import LLMEngine as factory
    options = dataclasses.asdict(EngineArgs.from_cli(args))
    return factory(args.model, **options)


def _descendants(pid: int) -> list[int]:
    """All live descendant pids of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] == "Z":
            continue  # zombie: already dead
        children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_leftover_children(grace: float = 3.0) -> list[int]:
    """Kill child processes the engine left behind (after ``engine.shutdown()``). Returns their pids.

    multiprocessing's resource tracker is left alone: it exits on its own when this process exits.
    """
    deadline = time.monotonic() + grace
    while True:
        left = [p for p in _descendants(os.getpid()) if "resource_tracker" not in _cmdline(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for p in left:
        log.warning("killing leftover child process %d (%s)", p, _cmdline(p)[:120])
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return left


def run(args: argparse.Namespace) -> int:
    from dsaserve.args import EngineArgs
    from dsaserve.parallel.launch import run_worker_if_torchrun

    if run_worker_if_torchrun(args.model, EngineArgs.from_cli(args)):
        return 0                                   # a torchrun rank > 0: served rank 0's plans until shutdown
    import uvicorn

    from .app import OpenAIServer, build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chat_template = None
    if args.chat_template:
        with open(args.chat_template) as f:
            chat_template = f.read()
    try:
        engine = make_engine(args)
    except Exception:
        log.exception("could not start the engine")
        kill_leftover_children()
        return 1

    server: OpenAIServer | None = None
    try:
        uv: uvicorn.Server | None = None

        def request_exit(code: int) -> None:
            if uv is not None:
                uv.should_exit = True

        server = OpenAIServer(engine, served_model_name=args.served_model_name, chat_template=chat_template,
                              step_timeout=args.step_timeout, fault_exit_delay=args.fault_exit_delay,
                              request_exit=request_exit)
        app = build_app(server)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=5, lifespan="on")
        uv = uvicorn.Server(config)
        log.info("serving %r (max_model_len %d) at http://%s:%d/v1", server.model_name, server.max_model_len,
                 args.host, args.port)
        uv.run()
    except SystemExit as e:  # uvicorn exits this way when it cannot bind the port
        log.error("server stopped: exit status %s", e.code)
        return 1
    finally:
        if server is not None:
            server.engine_loop.stop()
        else:
            engine.shutdown()
        kill_leftover_children()
    code = server.exit_code if server is not None else 1
    if code:
        log.error("exiting with status %d: %s", code, server.engine_loop.dead_reason)
    return code
