"""``dsaserve serve``: run the OpenAI-compatible HTTP server (FastAPI + uvicorn) over an ``LLMEngine``.

Start-up: the port is bound first (a port in use fails at once, before any loading), then the server
listens while the engine thread loads the model (/health answers 503 "starting" until it is ready).

Exit status: 0 after a clean shutdown (SIGTERM / Ctrl-C drain the requests in flight for up to
``--shutdown-timeout`` seconds, end the rest with an error event, then stop; a second signal ends them at
once), 1 when the server could not start (port in use, missing ``serve`` extra, the engine failed to
load) or the engine died (a worker process was killed or stopped, a step hung), 2 for bad flags. Worker
processes never outlive the server: the engine is shut down on every path and any child process still
alive afterwards is killed.

Security: with ``--api-key`` (or ``DSASERVE_API_KEY``) every /v1 request needs ``Authorization: Bearer
<key>``; /health and /metrics stay open. The torch.distributed store and the control channel between
ranks (pickled step plans) are not authenticated: they must run on a trusted network (see README).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import logging
import os
import signal
import socket
import sys
import time

from dsaserve.engine.client import EngineClient

log = logging.getLogger("dsaserve.server")

API_KEY_ENV = "DSASERVE_API_KEY"
_SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def _request_bytes(text: str) -> int:
    """``--max-request-bytes``: an integer of at least 1024."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1024:
        raise argparse.ArgumentTypeError(f"must be at least 1024 bytes, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (HF format: config.json, "
                        "safetensors, tokenizer.json)")
    parser.add_argument("--served-model-name", default=None, help="model id clients must send "
                        "(default: the engine's model name, i.e. the directory's basename)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for "
                        "all interfaces: then set --api-key)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer <key>' on every /v1 "
                        f"request (default: ${API_KEY_ENV} if set, else no authentication); prefer the environment "
                        "variable: a flag is visible to every user of the machine in the process list")
    from dsaserve.args import EngineArgs  # engine flags: same names as every other subcommand

    EngineArgs.add_cli_args(parser)
    parser.add_argument("--chat-template", default=None, help="Jinja chat template file overriding the "
                        "checkpoint's (and the model's chat format)")
    from .parsers import REASONING_PARSERS, TOOL_PARSERS

    parser.add_argument("--tool-call-parser", default="auto", choices=("auto", "none", *sorted(TOOL_PARSERS)),
                        help="how tool calls are read back from the model's output into OpenAI tool_calls "
                        "(default auto: from the model type, deepseek_v32 or glm47; none: off, the markup stays "
                        "in the content)")
    parser.add_argument("--reasoning-parser", default="auto", choices=("auto", "none", *sorted(REASONING_PARSERS)),
                        help="how reasoning ('thinking') text is split from the answer into reasoning_content "
                        "(default auto: from the model type; none: off)")
    parser.add_argument("--max-request-bytes", type=_request_bytes, default=None, help="largest request body "
                        "accepted; larger ones get 413 before any parsing (default: 1 MiB + 16 bytes per token of "
                        "max_model_len, room for a whole context)")
    parser.add_argument("--step-timeout", type=_positive_float, default=600.0, help="seconds one engine step may "
                        "take before the engine is declared hung (the server then exits with status 1; default "
                        "600). A stopped or frozen worker is found sooner, by --heartbeat-timeout-s")
    parser.add_argument("--shutdown-timeout", type=_positive_float, default=30.0, help="on SIGTERM / Ctrl-C, "
                        "seconds to let requests in flight finish before they are ended with an error (default 30)")
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


def _missing_serve_modules() -> list[str]:
    missing = []
    for name in _SERVE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on (host, port) now, so a port in use fails before the model loads; uvicorn then
    serves on this very socket (no window for another process to take the port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _make_uvicorn_server(config, on_first_signal):
    """A uvicorn server whose first SIGTERM / SIGINT starts our drain instead of stopping at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        signals_seen = 0

        def handle_exit(self, sig, frame) -> None:
            self.signals_seen += 1
            if self.signals_seen <= 2 and self.started and not self.should_exit:
                on_first_signal()          # 1st: drain; 2nd: end the requests in flight now
            elif self.should_exit:
                self.force_exit = True     # 3rd (or during uvicorn's own shutdown): stop waiting
            else:
                self.should_exit = True    # before uvicorn started serving: nothing to drain
            # not recorded in _captured_signals: a drained shutdown exits with status 0, not by the signal

    return DrainingServer(config)


def run(args: argparse.Namespace) -> int:
    from dsaserve.args import EngineArgs
    from dsaserve.parallel.launch import run_worker_if_torchrun

    engine_args = EngineArgs.from_cli(args)
    engine_args.validate()                         # bad flags: one line (dsaserve.cli), before anything starts
    if run_worker_if_torchrun(args.model, engine_args):
        return 0                                   # a torchrun rank > 0: served rank 0's plans until shutdown
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    missing = _missing_serve_modules()
    if missing:
        print(f"error: `dsaserve serve` needs the optional server dependencies, and {', '.join(missing)} "
              "cannot be imported; install them with:  pip install 'dsaserve[serve]'  (or, in a checkout:  "
              "pip install -e '.[serve]')", file=sys.stderr)
        return 1
    import uvicorn

    from .app import OpenAIServer, build_app

    chat_template = None
    if args.chat_template:
        try:
            with open(args.chat_template) as f:
                chat_template = f.read()
        except OSError as e:
            print(f"error: cannot read --chat-template: {e}", file=sys.stderr)
            return 1
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        hint = "; another process is using it: pick another --port" if e.errno == errno.EADDRINUSE else ""
        log.error("cannot listen on %s:%d: %s%s", args.host, args.port, e.strerror or e, hint)
        return 1
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach the port can use the model",
                    args.host)

    uv = None

    def request_exit(code: int) -> None:
        if uv is not None:
            uv.should_exit = True

    server = OpenAIServer(engine_factory=lambda: make_engine(args),
                          model_name=os.path.basename(os.path.normpath(args.model)),
                          served_model_name=args.served_model_name, chat_template=chat_template,
                          step_timeout=args.step_timeout, fault_exit_delay=args.fault_exit_delay,
                          request_exit=request_exit, api_key=api_key, max_request_bytes=args.max_request_bytes,
                          shutdown_timeout=args.shutdown_timeout, tool_call_parser=args.tool_call_parser,
                          reasoning_parser=args.reasoning_parser)

    def on_signal() -> None:
        loop = server._loop
        if loop is not None:
            loop.call_soon_threadsafe(server.begin_shutdown)

    config = uvicorn.Config(build_app(server), log_level=args.log_level, timeout_graceful_shutdown=5,
                            lifespan="on")
    uv = _make_uvicorn_server(config, on_signal)
    log.info("listening at http://%s:%d/v1; loading %s (GET /health answers 503 until the engine is ready)",
             args.host, args.port, args.model)
    try:
        uv.run(sockets=[sock])
    finally:
        server.engine_loop.stop()
        kill_leftover_children()
        sock.close()
    if server.engine_loop.dead and not server.exit_code:
        server.exit_code = 1
    if server.exit_code:
        log.error("exiting with status %d: %s", server.exit_code, server.engine_loop.dead_reason)
    else:
        log.info("shut down cleanly")
    return server.exit_code
