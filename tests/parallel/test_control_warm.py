"""The "warm" control op (sent by the engine when its warm-up ends) reaches every rank, and llm.stats()
carries each rank's Triton compile counts (runtime.compile_watch)."""

from __future__ import annotations


def test_the_warm_control_op_reaches_every_rank(pool, ds_ckpt):
    llm = pool.get("ds-2x1-auto", ds_ckpt, pp_size=2, cp_size=1)
    assert [a["rank"] for a in llm.engine.control("warm")] == [0, 1]
    stats = llm.engine.stats()
    assert sorted(stats) == [0, 1]
    for s in stats.values():
        assert s["triton_compiles"]["warm"] and s["triton_compiles"]["after_warmup"] == 0
