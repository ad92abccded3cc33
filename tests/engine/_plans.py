"""Engine-test helper shared by the scheduling tests: record the plans an engine submits."""

from __future__ import annotations


def record_plans(engine) -> list:
    """Record every plan the engine submits (``del engine.executor.submit`` restores the executor's own)."""
    plans, submit = [], engine.executor.submit

    def spy(plan):
        plans.append(plan)
        return submit(plan)

    engine.executor.submit = spy
    return plans
