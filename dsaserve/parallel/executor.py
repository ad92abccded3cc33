"""Executors run step plans on the world of ranks. The engine only sees ``submit`` / ``wait``.

``LocalExecutor`` is the one-process world (pp_size = cp_size = 1). The multi-process PP x CP executor
lives in ``dsaserve.parallel.executor`` and keeps several plans in flight (one per pipeline stage).
"""

from __future__ import annotations

from dsaserve.engine.plan import SampledToken, StepPlan
from dsaserve.engine.runner import ModelRunner


class Executor:
    """Runs plans in submission order on every rank; results come back in the same order."""

    max_inflight: int = 1
    num_pages: int          # KV pages every rank holds (the world's minimum)

    def submit(self, plan: StepPlan) -> object:
        raise NotImplementedError

    def wait(self, handle: object) -> list[SampledToken]:
        """Block until the plan's sampled tokens are back; raises EngineDeadError if a worker died."""
        raise NotImplementedError

    def is_healthy(self) -> bool:
        return True

    def control(self, op: str) -> list[dict]:
        """Ask every rank to do ``op`` ("stats", "profile_on", "profile_off", "reset"); one answer per rank."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Per-rank comm counters and phase times, keyed by rank."""
        return {a["rank"]: a for a in self.control("stats")}

    def shutdown(self) -> None:
        pass


class LocalExecutor(Executor):
    """The whole model in this process: a plan runs as soon as it is submitted."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.num_pages = runner.cache.num_pages

    def submit(self, plan: StepPlan) -> list[SampledToken]:
        return self.runner.execute_local(plan)

    def wait(self, handle: list[SampledToken]) -> list[SampledToken]:
        return handle

    def control(self, op: str) -> list[dict]:
        from dsaserve.profiling import RECORDER

        if op == "profile_on":
            RECORDER.enable(cuda=self.runner.device.type == "cuda")
        elif op == "profile_off":
            RECORDER.disable()
        elif op == "reset":
            RECORDER.reset()
        elif op == "stats":
            return [{"rank": 0, "stage": 0, "cp_rank": 0, "comm": {"bytes": {}, "calls": {}},
                     "phases_ms": RECORDER.exclusive_ms() if RECORDER.enabled else {},
                     "regions": RECORDER.collect() if RECORDER.enabled else []}]
        else:
            raise ValueError(f"unknown control request {op!r}")
        return [{"rank": 0}]
