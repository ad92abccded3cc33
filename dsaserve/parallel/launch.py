"""Multi-node launch through torchrun: every rank runs the same command with the same flags.

Rank 0 becomes the engine (server, generate, bench ...); every other rank calls
``run_worker_if_torchrun`` first thing, serves step plans until rank 0 shuts down, and exits:

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank N --master-addr HOST --master-port 29500 \\
        -m dsaserve serve --model DIR --pp-size 2 --cp-size 8 --device cuda
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from dsaserve.args import EngineArgs
from dsaserve.config import ConfigError, read_model_config
from dsaserve.parallel.layout import Layout
from dsaserve.parallel.rendezvous import publish_startup_error, world_store
from dsaserve.parallel.worker import WorkerSpec, worker_main

_PR_SET_PDEATHSIG = 1
_lifeline_started = False


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def exit_with_launcher(sig: int) -> None:
    """Make this process get ``sig`` when the process that started it (the torchrun agent) dies, so a
    killed agent cannot leave its ranks running on (re-parented to PID 1). Linux: ``prctl(PR_SET_PDEATHSIG)``;
    everywhere, and for a parent that died before the call: a thread that polls the parent pid."""
    global _lifeline_started
    if _lifeline_started:
        return
    _lifeline_started = True
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            pass                                  # the polling thread still covers it

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        print(f"dsaserve: the launcher (pid {parent}) is gone; stopping (signal {int(sig)})", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _tell_rank0(rank: int, error: str) -> None:
    """Rank 0 waits for every rank's start-up summary: send it this rank's error instead (best effort)."""
    try:
        store = world_store(rank, int(os.environ["WORLD_SIZE"]), os.environ["MASTER_ADDR"],
                            int(os.environ["MASTER_PORT"]), external=True, timeout_s=3.0, client=True)
        publish_startup_error(store, rank, error)
    except Exception:  # noqa: BLE001 - rank 0 then reports that this rank did not start in time
        pass


def run_worker_if_torchrun(model_path: str, args: EngineArgs) -> bool:
    """Under torchrun, a rank > 0 runs its worker loop here (blocking) and returns True; else False.

    Every torchrun rank (0 included) also stops when its agent dies: workers at once (SIGKILL), rank 0 by
    SIGTERM (a server drains first)."""
    if not launched_by_torchrun():
        return False
    rank = int(os.environ["RANK"])
    exit_with_launcher(signal.SIGTERM if rank == 0 else signal.SIGKILL)
    if rank == 0:
        return False
    try:
        args.validate()
        cfg = read_model_config(model_path, args.load_format)
        layout = Layout.build(cfg, args.pp_size, args.cp_size, args.pp_layer_partition)
        layout.check_world_size(int(os.environ["WORLD_SIZE"]))
    except (ConfigError, OSError, ValueError) as e:
        _tell_rank0(rank, f"{type(e).__name__}: {e}")
        raise SystemExit(str(e)) from None
    spec = WorkerSpec(model_path, cfg, layout, args, args.torch_dtype(cfg.torch_dtype),
                      args.max_model_len or cfg.max_position_embeddings, os.environ["MASTER_ADDR"],
                      int(os.environ["MASTER_PORT"]), external=True)
    worker_main(rank, spec, None, None)
    return True
