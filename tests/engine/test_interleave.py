"""Chunked prefill interleaved with decode: a long prompt arriving while other requests generate is cut into
chunks of at most ``prefill_chunk_while_decoding`` tokens with a decode step of the running requests between
every two chunks, and every request's tokens are those it gets alone (stateless sampling: results do not
depend on the schedule)."""

from __future__ import annotations

import pytest

from dsaserve import SamplingParams
from tests.engine._plans import record_plans
from tests.model._shared import max_dict_diff, prompt_ids

pytestmark = pytest.mark.timeout(300)

CHUNK_WHILE_DECODING = 24


def _params(i: int) -> SamplingParams:
    if i == 0:
        return SamplingParams(max_tokens=20, ignore_eos=True, logprobs=3)            # greedy
    return SamplingParams(max_tokens=20, ignore_eos=True, temperature=1.0, top_p=0.9, seed=100 + i)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_long_prompt_interleaves_with_decode_and_changes_no_output(world, backend):
    llm = world.arch_llm("deepseek_v32", attention_backend=backend, chunked_prefill_size=4096,
                         prefill_chunk_while_decoding=CHUNK_WHILE_DECODING)
    engine = llm.engine
    short = [prompt_ids(n, seed=3) for n in (5, 33, 40)]
    long = prompt_ids(300, seed=4)
    alone = [llm.generate([p], _params(i))[0] for i, p in enumerate(short)]
    long_alone = llm.generate([long], _params(3))[0]

    plans = record_plans(engine)
    got: dict[str, list[int]] = {}
    lps: dict[str, list] = {}
    try:
        for i, p in enumerate(short):
            engine.add_request(f"s{i}", p, _params(i))
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
                lps.setdefault(out.request_id, []).extend(out.new_logprobs or [])
            steps += 1
            if steps == 3:                                  # the short requests are generating by now
                assert all(len(got.get(f"s{i}", [])) >= 1 for i in range(3))
                engine.add_request("long", long, _params(3))
    finally:
        del engine.executor.submit

    for i in range(3):
        assert got[f"s{i}"] == alone[i].token_ids, f"short request {i} changed when a long prompt interleaved"
    assert max_dict_diff(lps["s0"], alone[0].logprobs) < 1e-5
    assert got["long"] == long_alone.token_ids

    # the schedule: the long prompt in chunks of <= CHUNK_WHILE_DECODING tokens; every short request keeps getting
    # tokens during that prefill, waiting for at most one prefill step between two of its decode steps
    long_req = next(e.req_id for p in plans for e in p.entries
                    if e.start_pos == 0 and e.token_ids == long[:len(e.token_ids)])
    chunks = [len(e.token_ids) for p in plans if not p.is_decode for e in p.entries if e.req_id == long_req]
    assert sum(chunks) == 300 and max(chunks) <= CHUNK_WHILE_DECODING and len(chunks) >= 300 // CHUNK_WHILE_DECODING
    long_steps = [i for i, p in enumerate(plans) if not p.is_decode and any(e.req_id == long_req for e in p.entries)]
    first_chunk, last_chunk = long_steps[0], long_steps[-1]
    short_reqs = {e.req_id for p in plans[:first_chunk] for e in p.entries}
    assert len(short_reqs) == 3
    for req in short_reqs:
        decodes = [i for i, p in enumerate(plans) if p.is_decode and any(e.req_id == req for e in p.entries)]
        for a, b in zip(decodes, decodes[1:]):
            between = [p for p in plans[a + 1:b] if not p.is_decode]
            assert len(between) <= 1, f"request {req} waited for {len(between)} prefill steps between two tokens"
        during = [i for i in decodes if first_chunk < i < last_chunk]
        assert len(during) >= 8, f"request {req} got {len(during)} tokens during the long prefill"


def test_n_sequences_with_penalties_interleave_and_fork_after_a_chunked_prefill(world):
    """n > 1 (forked KV pages) with penalties / logit_bias coexists with interleaving: a long n = 2 prompt is
    prefilled in small chunks while an n = 3 request decodes, forks when its prefill completes, and every
    sequence equals its request run alone; all pages (the sink page excepted) come back."""
    llm = world.arch_llm("deepseek_v32", attention_backend="triton", chunked_prefill_size=4096,
                         prefill_chunk_while_decoding=CHUNK_WHILE_DECODING)
    engine = llm.engine
    kw = dict(max_tokens=10, ignore_eos=True, temperature=1.0, presence_penalty=0.5, repetition_penalty=1.2,
              logit_bias={42: 4.0})
    short, long = prompt_ids(37, seed=5), prompt_ids(150, seed=6)
    p_short, p_long = SamplingParams(n=3, seed=21, **kw), SamplingParams(n=2, seed=22, **kw)
    alone = {"short": llm.generate([short], p_short), "long": llm.generate([long], p_long)}
    got: dict[tuple[str, int], list[int]] = {}
    plans = record_plans(engine)
    try:
        engine.add_request("short", short, p_short)
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                got.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
            steps += 1
            if steps == 2:
                assert len(got) == 3                               # the short request forked and decodes
                engine.add_request("long", long, p_long)
    finally:
        del engine.executor.submit
    long_chunks = [len(e.token_ids) for p in plans if not p.is_decode for e in p.entries
                   if list(e.token_ids) == long[e.start_pos:e.start_pos + len(e.token_ids)]]
    assert sum(long_chunks) == 150 and max(long_chunks) <= CHUNK_WHILE_DECODING   # really interleaved
    for rid, outs in alone.items():
        for o in outs:
            assert got[(rid, o.index)] == o.token_ids, f"{rid} sequence {o.index}"
    assert len({tuple(t) for t in got.values()}) == 5
    alloc = engine.scheduler.allocator
    assert alloc.num_free == alloc.num_pages
