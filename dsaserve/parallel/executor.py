"""Executors run step plans on the world of ranks. The engine only sees this interface.

``make_executor`` picks the implementation from the layout: ``LocalExecutor`` for the one-process world
(pp_size = cp_size = 1), ``MultiProcessExecutor`` (``dsaserve.parallel.multiprocess``) otherwise, which
keeps several plans in flight so pipeline stages work on different chunks at once.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dsaserve.args import EngineArgs
from dsaserve.config import ModelConfig
from dsaserve.parallel.layout import Layout
from dsaserve.parallel.multiprocess import MultiProcessExecutor
from dsaserve.runtime.compile_watch import COMPILES
from dsaserve.runtime.plan import StepItem, StepPlan
from dsaserve.runtime.runner import ModelRunner, PendingStep


class Executor(Protocol):
    """Runs plans in submission order on every rank; results come back in the same order."""

    max_inflight: int       # plans the engine may submit before it waits for the oldest
    num_pages: int          # KV pages every rank holds (the world's minimum)
    feeds_tokens: bool      # takes decode plans fed by the previous step's samples (StepPlan.fed_from)

    def submit(self, plan: StepPlan) -> object:
        """Start ``plan``; returns the handle ``wait`` takes."""
        ...

    def wait(self, handle: object) -> list[StepItem]:
        """Block until the plan's sampled tokens are back; raises EngineDeadError if a worker died."""
        ...

    def is_healthy(self) -> bool:
        ...

    def liveness_problem(self, step_timeout_s: float | None = None) -> str | None:
        """Thread-safe: a rank that stopped sending heartbeats (or one stuck in a step longer than
        ``step_timeout_s``), named; None while all is well."""
        ...

    def control(self, op: str) -> list[dict]:
        """Ask every rank to do ``op`` ("stats", "profile_on", "profile_off", "reset", "warm"); one answer per
        rank. "warm": the warm-up is over, a Triton compile from now on is logged (``runtime.compile_watch``)."""
        ...

    def stats(self) -> dict:
        """Per-rank comm counters, weight bytes (allocated and planned) and phase times, keyed by rank."""
        ...

    def shutdown(self) -> None:
        ...


class LocalExecutor:
    """The whole model in this process. ``submit`` queues the step on the device (inputs, forward, sampling)
    and returns; ``wait`` brings its tokens back. Two plans may be in flight, so the host prepares the next
    step while the device still runs the current one: a prefill chunk after a decode step, or the next decode
    step with its tokens fed from the current one's samples on the device (``StepPlan.fed_from``)."""

    max_inflight = 2
    feeds_tokens = True     # the runner keeps the last step's samples on the device for the next step

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.num_pages = runner.cache.num_pages

    def submit(self, plan: StepPlan) -> PendingStep:
        return self.runner.launch(plan)

    def wait(self, handle: PendingStep) -> list[StepItem]:
        return self.runner.finish(handle)

    def is_healthy(self) -> bool:
        return True

    def liveness_problem(self, step_timeout_s: float | None = None) -> str | None:
        return None           # one process: nothing to watch (the server's step timeout still applies)

    def control(self, op: str) -> list[dict]:
        from dsaserve.profiling import RECORDER

        if op == "profile_on":
            RECORDER.enable(cuda=self.runner.device.type == "cuda")
        elif op == "profile_off":
            RECORDER.disable()
        elif op == "reset":
            self.runner.prefill_indexer.reset()
            RECORDER.reset()
        elif op == "warm":
            COMPILES.mark_warm()
        elif op == "stats":
            return [{"rank": 0, "stage": 0, "cp_rank": 0, "comm": {"bytes": {}, "calls": {}},
                     "weights": self.runner.weight_stats(),
                     "indexer_sm_budget": self.runner.prefill_indexer.snapshot(),
                     "triton_compiles": COMPILES.snapshot(),
                     "phases_ms": RECORDER.exclusive_ms() if RECORDER.enabled else {},
                     "regions": RECORDER.collect() if RECORDER.enabled else []}]
        else:
            raise ValueError(f"unknown control request {op!r}")
        return [{"rank": 0}]

    def stats(self) -> dict:
        return {a["rank"]: a for a in self.control("stats")}

    def shutdown(self) -> None:
        pass


def make_executor(model_dir: str, cfg: ModelConfig, layout: Layout, args: EngineArgs, dtype: torch.dtype,
                  max_model_len: int) -> Executor:
    """The executor for ``layout``: this process alone, or this process as rank 0 of a spawned world."""
    if layout.world_size > 1:
        return MultiProcessExecutor(model_dir, cfg, layout, args, dtype, max_model_len)
    runner = ModelRunner(model_dir, cfg, layout.rank_view(0).shard(), args, device=torch.device(args.device),
                         dtype=dtype)
    runner.allocate_cache(runner.propose_num_pages(max_model_len))
    runner.init_decode(max_model_len)
    return LocalExecutor(runner)
