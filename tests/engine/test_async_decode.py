"""Decode steps queued back to back (one process): while a decode step runs, the next one is submitted with its
token ids fed from that step's samples on the device (``StepPlan.fed_from``), so the host's work for a step
hides behind the GPU's. Results must not change: every request's tokens, logprobs and finish reasons equal
those of ``sync_scheduling`` (each decode step planned from tokens on the host), for every sampling feature,
on the general decode path (reference attention: tokens read back on the host) and the static one (triton
attention: tokens copied on the device), including requests that stop while a fed step holding them is in
flight (their extra token is dropped) and requests that join a running batch."""

from __future__ import annotations

import pytest

from dsaserve import SamplingParams
from dsaserve.runtime.plan import FED_TOKEN
from tests.engine._plans import record_plans
from tests.model._shared import max_dict_diff, prompt_ids

pytestmark = pytest.mark.timeout(300)

BACKENDS = ["reference", "triton"]


def _llm(world, backend: str, sync: bool):
    return world.arch_llm("deepseek_v32", attention_backend=backend, sync_scheduling=sync)


def _run(engine, requests: list[tuple[int, str, list[int], SamplingParams]]) -> tuple[dict, dict, dict, list]:
    """Drive ``engine`` step by step, adding each (step, id, prompt, params) at its step -> (tokens, logprobs,
    finish reason) by request id, and every submitted plan."""
    plans = record_plans(engine)
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list] = {}
    reasons: dict[str, str] = {}
    pending = sorted(requests, key=lambda r: r[0])
    step = 0
    try:
        while pending or engine.has_unfinished_requests():
            while pending and pending[0][0] <= step:
                _, rid, prompt, params = pending.pop(0)
                engine.add_request(rid, prompt, params)
            for out in engine.step():
                key = f"{out.request_id}/{out.index}"
                tokens.setdefault(key, []).extend(out.new_token_ids)
                logprobs.setdefault(key, []).extend(out.new_logprobs or [])
                if out.finished:
                    reasons[key] = out.finish_reason
            step += 1
    finally:
        del engine.executor.submit
    return tokens, logprobs, reasons, plans


def _requests(stop_token: int) -> list[tuple[int, str, list[int], SamplingParams]]:
    p = [prompt_ids(n, seed=20 + n) for n in (5, 33, 40, 9, 70, 12, 3)]
    return [
        (0, "greedy", p[0], SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)),
        (0, "sampled", p[1], SamplingParams(max_tokens=9, temperature=0.9, top_k=20, top_p=0.9, seed=7,
                                             ignore_eos=True)),
        (0, "penalties", p[2], SamplingParams(max_tokens=11, temperature=0.7, seed=3, presence_penalty=0.5,
                                               frequency_penalty=0.3, repetition_penalty=1.2, ignore_eos=True)),
        # stops at a token it produces early: a fed step holding it is in flight when it stops
        (0, "stops", p[0], SamplingParams(max_tokens=12, stop_token_ids=[stop_token], ignore_eos=True)),
        (0, "one_token", p[3], SamplingParams(max_tokens=1)),
        (0, "min_tokens", p[4], SamplingParams(max_tokens=8, min_tokens=5, stop_token_ids=[stop_token],
                                                ignore_eos=True, logit_bias={stop_token: 5.0})),
        # joins while the others decode; n = 2 forks its KV
        (4, "late_n2", p[5], SamplingParams(max_tokens=8, n=2, temperature=1.0, seed=11, ignore_eos=True)),
        (6, "late_short", p[6], SamplingParams(max_tokens=3, ignore_eos=True, logprobs=1)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fed_decode_steps_change_no_output(world, backend):
    sync_llm, async_llm = _llm(world, backend, sync=True), _llm(world, backend, sync=False)
    greedy = sync_llm.generate([prompt_ids(5, seed=25)], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    stop_token = greedy[3]
    stop_at = greedy.index(stop_token) + 1                   # outputs of "stops", its stop token included
    reqs = _requests(stop_token)

    want_tokens, want_lps, want_reasons, sync_plans = _run(sync_llm.engine, reqs)
    got_tokens, got_lps, got_reasons, plans = _run(async_llm.engine, reqs)

    assert not any(p.fed_from is not None for p in sync_plans)
    assert got_tokens == want_tokens
    assert got_reasons == want_reasons
    for key in want_lps:
        assert len(got_lps[key]) == len(want_lps[key])
        # the batches differ between the two schedules, so fp32 matmul rows may round differently (as when a
        # prompt interleaves: tests/engine/test_interleave.py)
        assert max_dict_diff(got_lps[key], want_lps[key]) < 1e-5, key
    assert len(got_tokens["stops/0"]) == stop_at and got_reasons["stops/0"] == "stop"
    assert len(got_tokens["min_tokens/0"]) >= 5
    alloc = async_llm.engine.scheduler.allocator
    assert alloc.num_free == alloc.num_pages

    # the schedule: fed steps ran, each right after the step that feeds it
    fed = [i for i, p in enumerate(plans) if p.fed_from is not None]
    assert len(fed) >= 8
    for i in fed:
        assert plans[i - 1].step_id == plans[i].fed_from and plans[i - 1].is_decode
        tokens = [e.token_ids[0] for e in plans[i].entries]
        assert FED_TOKEN in tokens and tokens.index(FED_TOKEN) == 0          # fed entries come first
    # a request that stopped still had a fed step in flight (its token there was dropped)
    same_prompt = [e.req_id for p in plans for e in p.entries if e.start_pos == 0 and e.token_ids == reqs[3][2]]
    stops_req = same_prompt[1]                    # "greedy" has the same prompt and was added first
    holding = [p for p in plans if p.is_decode and any(e.req_id == stops_req for e in p.entries)]
    assert len(holding) == stop_at                # stop_at - 1 decode steps made its tokens, one more was dropped
    # a request that joined the batch rode in a fed step with the tokens it had on the host
    assert any(FED_TOKEN in (t := [e.token_ids[0] for e in p.entries]) and any(x != FED_TOKEN for x in t)
               for p in plans if p.fed_from is not None)
    # requests left out of a fed step (ending by length) make the fed rows skip rows of the source step
    assert any([e.req_id for e in p.entries if e.token_ids[0] == FED_TOKEN]
               != [e.req_id for e in plans[i - 1].entries][:sum(e.token_ids[0] == FED_TOKEN for e in p.entries)]
               for i, p in enumerate(plans) if p.fed_from is not None)


def test_fed_decode_step_of_an_aborted_request_is_dropped(world):
    llm = _llm(world, "triton", sync=False)
    engine = llm.engine
    alone_b = llm.generate([prompt_ids(8, seed=4)], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    engine.add_request("a", prompt_ids(7, seed=3), SamplingParams(max_tokens=20, ignore_eos=True))
    engine.add_request("b", prompt_ids(8, seed=4), SamplingParams(max_tokens=6, ignore_eos=True))
    got: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
        if steps == 3:
            engine.abort_request("a")             # while a fed step holding it is in flight
    assert got["b"] == alone_b
    assert 1 <= len(got["a"]) <= 3
    alloc = engine.scheduler.allocator
    assert alloc.num_free == alloc.num_pages            # every page back, those of the dropped steps included


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "fed"])
def test_one_process_never_splits_the_decode_batch(world, sync):
    """One pipeline stage: requests that become ready while a decode step is in flight join the next batch (sync
    scheduling) or ride in the fed step (default) instead of running in a decode step of their own, which would
    cost a whole weight read for a part of the batch. Every decode step in flight besides the oldest is fed."""
    # prompts prefilled over several small steps: later ones become ready while earlier ones decode
    llm = world.arch_llm("deepseek_v32", attention_backend="triton", sync_scheduling=sync, chunked_prefill_size=16,
                         prefill_chunk_while_decoding=16)
    ex = llm.engine.executor
    submit, wait = ex.submit, ex.wait
    flight: dict[int, object] = {}
    worst: list[list] = [[]]

    def spy_submit(plan):
        handle = submit(plan)
        flight[id(handle)] = plan
        decodes = [p for p in flight.values() if p.is_decode]
        if len(decodes) > len(worst[0]):
            worst[0] = decodes
        return handle

    def spy_wait(handle):
        flight.pop(id(handle), None)
        return wait(handle)

    ex.submit, ex.wait = spy_submit, spy_wait
    try:
        prompts = [prompt_ids(n, seed=40 + n) for n in (3, 50, 7, 90, 20)]
        got = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    finally:
        del ex.submit, ex.wait
    assert all(len(o.token_ids) == 10 for o in got)
    decodes = worst[0]
    assert len(decodes) == (1 if sync else 2), [p.step_id for p in decodes]
    assert all(p.fed_from is not None for p in decodes[1:])
