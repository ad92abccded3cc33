"""Multi-node launch through torchrun: every rank runs the same command with the same flags.

Rank 0 becomes the engine (server, generate, bench ...); every other rank calls
``run_worker_if_torchrun`` first thing, serves step plans until rank 0 shuts down, and exits:

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank N --master-addr HOST --master-port 29500 \\
        -m dsaserve serve --model DIR --pp-size 2 --cp-size 8 --device cuda
"""

from __future__ import annotations

import os

from dsaserve.args import EngineArgs
from dsaserve.config import ConfigError, read_model_config
from dsaserve.parallel.layout import Layout
from dsaserve.parallel.worker import WorkerSpec, worker_main


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def run_worker_if_torchrun(model_path: str, args: EngineArgs) -> bool:
    """Under torchrun, a rank > 0 runs its worker loop here (blocking) and returns True; else False."""
    if not launched_by_torchrun() or int(os.environ["RANK"]) == 0:
        return False
    args.validate()
    cfg = read_model_config(model_path, args.load_format)
    layout = Layout.build(cfg, args.pp_size, args.cp_size, args.pp_layer_partition)
    try:
        layout.check_world_size(int(os.environ["WORLD_SIZE"]))
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    spec = WorkerSpec(model_path, cfg, layout, args, args.torch_dtype(cfg.torch_dtype),
                      args.max_model_len or cfg.max_position_embeddings, os.environ["MASTER_ADDR"],
                      int(os.environ["MASTER_PORT"]), external=True)
    worker_main(int(os.environ["RANK"]), spec, None, None)
    return True
