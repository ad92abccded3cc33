"""Dynamic chunk sizing (engine/chunking.py) on its own: the cost model's closed forms and fit, the chunk
sequence's invariants, and the scheduler cutting a prompt the way the chunker says."""

from __future__ import annotations

import json
import os

import pytest

from dsaserve.args import EngineArgs
from dsaserve.cache.allocator import PageAllocator
from dsaserve.config import ConfigError
from dsaserve.engine.chunking import (
    DEFAULT_SOURCE,
    ChunkCostModel,
    DynamicChunker,
    attended_keys,
    causal_keys,
    dynamic_chunking_enabled,
    make_chunker,
)
from dsaserve.engine.scheduler import Scheduler, SchedulerConfig
from dsaserve.engine.types import SamplingParams
from dsaserve.runtime.plan import SampledToken

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEEP = ChunkCostModel(per_token_ms=1.0, per_key_ms=0.01, per_attended_ms=0.05, index_topk=16)


def brute_cost(m: ChunkCostModel, start: int, end: int) -> float:
    return sum(m.per_token_ms + m.per_key_ms * (p + 1) + m.per_attended_ms * min(p + 1, m.index_topk)
               for p in range(start, end))


@pytest.mark.parametrize("x", [0, 1, 2, 15, 16, 17, 100])
def test_closed_forms_equal_the_sums(x):
    assert causal_keys(x) == sum(p + 1 for p in range(x))
    assert attended_keys(x, 16) == sum(min(p + 1, 16) for p in range(x))


@pytest.mark.parametrize("start,end", [(0, 1), (0, 16), (5, 40), (16, 17), (90, 211)])
def test_span_cost_is_the_per_position_sum(start, end):
    assert STEEP.span(start, end) == pytest.approx(brute_cost(STEEP, start, end), rel=1e-12)


def test_fit_recovers_the_coefficients_from_phase_times():
    spans = [(0, 48), (48, 80), (80, 101), (0, 7), (300, 301)]        # chunks of two prompts and a decode
    phases = {
        "indexer_logits": 0.6 * sum(causal_keys(e) - causal_keys(s) for s, e in spans) * STEEP.per_key_ms,
        "topk": 0.4 * sum(causal_keys(e) - causal_keys(s) for s, e in spans) * STEEP.per_key_ms,
        "sparse_attn": sum(attended_keys(e, 16) - attended_keys(s, 16) for s, e in spans) * STEEP.per_attended_ms,
        "dense_gemm": 0.3 * sum(e - s for s, e in spans), "moe": 0.7 * sum(e - s for s, e in spans),
        "pp_recv_wait": 1e6,                                           # waiting is not work: ignored
    }
    fitted = ChunkCostModel.fit(phases, spans, 16)
    assert fitted.per_token_ms == pytest.approx(1.0, rel=1e-12)
    assert fitted.per_key_ms == pytest.approx(STEEP.per_key_ms, rel=1e-12)
    assert fitted.per_attended_ms == pytest.approx(STEEP.per_attended_ms, rel=1e-12)
    with pytest.raises(ValueError, match="at least one computed span"):
        ChunkCostModel.fit(phases, [(5, 5)], 16)
    # the fused indexer top-k kernel records one phase for both: it is prefix work too
    fused = {k: v for k, v in phases.items() if k not in ("indexer_logits", "topk")}
    fused["indexer_topk"] = phases["indexer_logits"] + phases["topk"]
    assert ChunkCostModel.fit(fused, spans, 16) == fitted


def test_default_model_reproduces_its_source_breakdown():
    """The defaults are the cited 1-GPU breakdown: the model's cost of the whole prompt is the sum of the
    phases it was fitted on, and those phases are the ones in the committed JSON."""
    src = DEFAULT_SOURCE
    with open(os.path.join(REPO, src["file"])) as f:
        runs = json.load(f)["runs"]
    run = next(r for r in runs if r["layout"] == "1x1" and r["input_len"] == src["input_len"] and "breakdown" in r)
    rows = run["breakdown"]["rows"]
    for row, phase in [("indexer logits", "indexer_logits"), ("top-k", "topk"), ("sparse attention", "sparse_attn"),
                       ("MoE experts", "moe"), ("dense GEMMs", "dense_gemm"), ("CP gathers", "cp_gather")]:
        assert src["phases_ms"][phase] == pytest.approx(rows[row]["max"], abs=0.05), row
    m = ChunkCostModel.default(src["index_topk"])
    assert m.cumulative(src["input_len"]) == pytest.approx(sum(src["phases_ms"].values()), rel=1e-9)
    assert ChunkCostModel.default(32).per_key_ms == m.per_key_ms          # per-key costs carry over


def check_sequence(ch: DynamicChunker, n: int) -> list[int]:
    seq = ch.sequence(n)
    assert sum(seq) == n
    assert seq[0] == min(n, ch.first_chunk)
    assert all(a >= b for a, b in zip(seq, seq[1:])), f"not non-increasing: {seq}"
    assert all(ch.min_chunk <= c <= ch.first_chunk for c in seq[:-1]), seq
    ends = [sum(seq[: i + 1]) for i in range(len(seq))]
    if ch.first_chunk % ch.align == 0:
        assert all(e % ch.align == 0 for e in ends[:-1]), f"chunk ends off the {ch.align} grid: {ends}"
    target = ch.cost.span(0, ch.first_chunk)
    start = 0
    for c, end in zip(seq, ends):
        if c > ch.min_chunk:                             # not clamped up: within the first chunk's cost ...
            assert ch.cost.span(start, end) <= target * (1 + 1e-9)
        if end < n and c >= ch.min_chunk and start > 0:  # ... and as long as the grid allows
            assert ch.cost.span(start, end + ch.align) > target
        start = end
    return seq


@pytest.mark.parametrize("first,align,min_chunk,n", [(40, 1, 1, 150), (40, 4, 8, 150), (48, 8, 16, 1000),
                                                     (7, 1, 1, 100), (64, 16, 16, 65)])
def test_sequence_invariants(first, align, min_chunk, n):
    seq = check_sequence(DynamicChunker(first, STEEP, align, min_chunk), n)
    if n >= 3 * first:
        assert seq[1] < seq[0], f"the steep model must shrink later chunks: {seq}"


def test_min_chunk_bounds_the_shrinking():
    ch = DynamicChunker(64, STEEP, align=8, min_chunk=32)
    seq = check_sequence(ch, 5000)
    assert seq[-2] == 32 and seq.count(32) > 10


def test_default_model_sequence_on_the_bench_lengths():
    ch = make_chunker(16384, 64, ChunkCostModel.default(2048))
    assert (ch.align, ch.min_chunk) == (64, 4096)
    seq = check_sequence(ch, 131072)
    assert seq[0] == 16384 and seq[-2] < 12000               # per-token cost grows ~1.6x over 128K
    assert check_sequence(ch, 16384) == [16384]


def test_make_chunker_alignment_rule():
    m = ChunkCostModel.default(2048)
    assert (make_chunker(8192, 64, m).align, make_chunker(8192, 64, m).min_chunk) == (64, 2048)
    assert (make_chunker(100, 64, m).align, make_chunker(100, 64, m).min_chunk) == (1, 25)
    assert make_chunker(3, 64, m).min_chunk == 1
    with pytest.raises(ValueError, match="multiple of align"):
        DynamicChunker(64, m, align=16, min_chunk=20)


def test_mode_resolution_and_validation():
    assert [dynamic_chunking_enabled(m, pp) for m in ("auto", "on", "off") for pp in (1, 2)] == \
        [False, True, True, True, False, False]
    with pytest.raises(ValueError, match="dynamic_chunking must be one of"):
        dynamic_chunking_enabled("yes", 2)
    with pytest.raises(ConfigError, match="dynamic_chunking must be one of"):
        EngineArgs(dynamic_chunking="yes").validate()


def test_scheduler_cuts_the_prompt_where_the_chunker_says():
    ch = DynamicChunker(40, STEEP, align=4, min_chunk=8)
    s = Scheduler(SchedulerConfig(40, 8, 4096, chunk_policy=ch), PageAllocator(256, 4), [1])
    s.add("a", list(range(10, 160)), SamplingParams(max_tokens=2, seed=3, ignore_eos=True))
    lens = []
    while (plan := s.schedule()) is not None:
        lens.append(len(plan.entries[0].token_ids))
    assert lens == ch.sequence(150)
    # decoding: the smaller while-decoding budget still caps the chunk
    s2 = Scheduler(SchedulerConfig(40, 8, 4096, prefill_chunk_while_decoding=5, chunk_policy=ch),
                   PageAllocator(256, 4), [1])
    s2.add("d", [5, 6, 7], SamplingParams(max_tokens=8, seed=3, ignore_eos=True))
    p = s2.schedule()
    s2.process_results(p, [SampledToken(p.entries[0].req_id, 9)])
    s2.add("long", list(range(10, 160)), SamplingParams(max_tokens=2, seed=3, ignore_eos=True))
    chunks = [len(e.token_ids) for p in iter(s2.schedule, None) if not p.is_decode for e in p.entries]
    assert chunks and max(chunks) == 5
