"""Rank 0's scheduler on its own (no model): chunking, budgets, admission, decode batching, stops, aborts and
preemption, checked on the plans it emits and the pages it holds."""

from __future__ import annotations

import pytest

from dsaserve.cache.allocator import OutOfPagesError, PageAllocator
from dsaserve.engine.scheduler import Phase, Scheduler, SchedulerConfig
from dsaserve.engine.types import SamplingParams
from dsaserve.runtime.plan import SampledToken, StepPlan

EOS = 1
PAGE = 4


def make(num_pages: int = 64, chunk: int = 8, max_num_seqs: int = 8, max_model_len: int = 64,
         chunk_while_decoding: int = 512, prefill_inflight: int = 1) -> Scheduler:
    return Scheduler(SchedulerConfig(chunk, max_num_seqs, max_model_len, prefill_chunk_while_decoding=chunk_while_decoding,
                                     max_prefill_inflight_while_decoding=prefill_inflight),
                     PageAllocator(num_pages, PAGE), [EOS])


def params(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 8)
    kw.setdefault("seed", 5)
    return SamplingParams(**kw)


def answer(sched: Scheduler, plan: StepPlan, token: int = 7):
    """The tokens a model would sample for this plan: one per entry that asks for a sample."""
    return sched.process_results(plan, [SampledToken(e.req_id, token) for e in plan.entries if e.sample])


def test_a_long_prompt_is_cut_into_chunks_and_only_the_last_one_samples():
    s = make(chunk=4)
    s.add("a", list(range(10, 20)), params())                  # 10 tokens
    plans = [s.schedule() for _ in range(3)]
    assert s.schedule() is None                                # everything left waits on the sample
    entries = [p.entries[0] for p in plans]
    assert [e.token_ids for e in entries] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    assert [e.start_pos for e in entries] == [0, 4, 8]
    assert [len(e.block_table) for e in entries] == [1, 2, 3]   # the table grows with the chunk
    assert [e.sample is not None for e in entries] == [False, False, True]
    assert not any(p.is_decode for p in plans)
    assert [p.step_id for p in plans] == [0, 1, 2]


def test_the_chunk_budget_is_shared_and_max_num_seqs_caps_a_step():
    s = make(chunk=6)
    s.add("a", [5] * 3, params())
    s.add("b", [6] * 5, params())
    p1, p2 = s.schedule(), s.schedule()
    assert [(e.req_id, len(e.token_ids), e.sample is not None) for e in p1.entries] == [(0, 3, True), (1, 3, False)]
    assert [(e.req_id, len(e.token_ids), e.start_pos) for e in p2.entries] == [(1, 2, 3)]
    s = make(chunk=100, max_num_seqs=2)
    for name in "abc":
        s.add(name, [5, 6], params())
    assert len(s.schedule().entries) == 2 and len(s.schedule().entries) == 1


def test_after_the_sample_comes_one_decode_token_per_request_in_one_batch():
    s = make(chunk=100)
    s.add("a", [5, 6, 7], params(logprobs=2))
    s.add("b", [8, 9], params(temperature=0.5, top_k=3))
    out = answer(s, s.schedule(), token=11)
    assert [(o.request_id, o.new_token_ids, o.finished, o.num_prompt_tokens) for o in out] == \
        [("a", [11], False, 3), ("b", [11], False, 2)]
    plan = s.schedule()
    assert plan.is_decode and [(e.token_ids, e.start_pos) for e in plan.entries] == [([11], 3), ([11], 2)]
    a, b = (e.sample for e in plan.entries)
    assert (a.output_index, a.logprobs, a.seed) == (1, 2, 5)        # the 2nd output token of "a"
    assert (b.temperature, b.top_k) == (0.5, 3)
    assert s.schedule() is None                                   # both wait on this decode step


def test_a_new_prompt_goes_first_when_the_last_step_was_a_decode():
    s = make(chunk=100)
    s.add("a", [5, 6], params())
    answer(s, s.schedule())
    answer(s, s.schedule())                                        # a decode step of "a"
    s.add("b", [7, 8, 9], params())
    first, second = s.schedule(), s.schedule()
    assert not first.is_decode and [e.req_id for e in first.entries] == [1]
    assert second.is_decode and [e.req_id for e in second.entries] == [0]


def kinds(plans) -> list[str]:
    return ["decode" if p.is_decode else f"prefill {sum(len(e.token_ids) for e in p.entries)}" for p in plans]


def _run(s: Scheduler, inflight: int, steps: int) -> list[StepPlan]:
    """Drive the scheduler like the engine: keep up to ``inflight`` plans in flight, finish the oldest."""
    done, flight = [], []
    while len(done) < steps:
        plan = s.schedule() if len(flight) < inflight else None
        if plan is not None:
            done.append(plan)
            flight.append(plan)
        elif flight:
            answer(s, flight.pop(0))
        else:
            break
    return done


def test_prefill_chunks_and_decode_steps_alternate_while_requests_generate():
    """A long prompt arriving while "a" generates: chunks of at most prefill_chunk_while_decoding tokens and a
    decode step of "a" between every two of them."""
    s = make(chunk=100, chunk_while_decoding=4)
    s.add("a", [5, 6], params(max_tokens=20))
    answer(s, s.schedule())                                        # "a" has its first token: it generates
    s.add("b", list(range(10, 21)), params())                      # 11 tokens
    assert kinds(_run(s, 1, 7)) == ["decode", "prefill 4", "decode", "prefill 4", "decode", "prefill 3", "decode"]
    assert s.requests[1].output_token_ids == [7]                   # "b"'s last chunk sampled its first token


def test_the_key_cap_shortens_chunks_at_long_context_while_requests_generate():
    """While "a" generates, a chunk of "b" also keeps (tokens x keys they see) under prefill_keys_while_decoding:
    the chunks shrink as b's cached prefix grows, never below MIN_CHUNK_WHILE_DECODING; the cap is off when
    nobody decodes and with 0."""
    from dsaserve.engine.scheduler import MIN_CHUNK_WHILE_DECODING

    def sched(keys):
        s = Scheduler(SchedulerConfig(4096, 8, 16384, prefill_chunk_while_decoding=512,
                                      prefill_keys_while_decoding=keys),
                      PageAllocator(16384 // PAGE + 64, PAGE), [EOS])
        s.add("a", [5, 6], params(max_tokens=2000))
        answer(s, s.schedule())                                    # "a" generates from now on
        s.add("b", [9] * 12000, params())
        return s

    s = sched(512 * 1024)
    chunks = [(e.start_pos, len(e.token_ids)) for p in _run(s, 1, 600) if not p.is_decode for e in p.entries]
    assert sum(n for _, n in chunks) == 12000
    cap = 512 * 1024
    for start, n in chunks[:-1]:
        assert n == max(MIN_CHUNK_WHILE_DECODING, min(512, cap // (start + 512))), (start, n)
    assert chunks[0] == (0, 512) and chunks[1] == (512, 512) and chunks[2] == (1024, 341)   # 524288 // 1536
    assert [n for _, n in chunks] == sorted((n for _, n in chunks), reverse=True)
    assert min(n for _, n in chunks[:-1]) == MIN_CHUNK_WHILE_DECODING                       # past ~8K of context
    off = sched(0)
    assert all(len(e.token_ids) == 512 for p in _run(off, 1, 12) if not p.is_decode for e in p.entries)


def test_with_two_steps_in_flight_one_prefill_chunk_at_most():
    """With two plans in flight (one process on CUDA), a chunk never queues behind another chunk while "a"
    generates: "a" waits for at most one chunk per token."""
    s = make(chunk=100, chunk_while_decoding=3)
    s.add("a", [5, 6], params(max_tokens=30))
    answer(s, s.schedule())
    s.add("b", list(range(10, 30)), params())                      # 20 tokens: 7 chunks
    plans = _run(s, 2, 16)
    ks = kinds(plans)
    assert all(k in ("decode", "prefill 3", "prefill 2") for k in ks), ks
    assert all(not (x.startswith("prefill") and y.startswith("prefill")) for x, y in zip(ks, ks[1:])), ks
    assert ks.count("decode") >= 7


def test_without_generating_requests_a_prompt_gets_the_full_chunk():
    """Only requests that already have output tokens cap the chunk; a burst of new prompts pipelines."""
    s = make(chunk=6, chunk_while_decoding=2)
    s.add("a", [5] * 3, params())
    s.add("b", [6] * 9, params())
    plans = [s.schedule(), s.schedule()]                           # "a" awaits its first token: not generating
    assert kinds(plans) == ["prefill 6", "prefill 6"]
    answer(s, plans[0])                                            # "a" generates from now on
    decode = s.schedule()
    assert kinds([decode]) == ["decode"]
    answer(s, plans[1])                                            # "b"'s second chunk finished its prompt
    # "b" is ready while "a"'s decode step is in flight: it waits to join the next batch (one pipeline stage:
    # a decode step of its own would cost a whole weight read for one request)
    assert s.schedule() is None
    answer(s, decode)
    nxt = s.schedule()
    assert nxt.is_decode and [e.req_id for e in nxt.entries] == [0, 1]


def test_with_several_pipeline_stages_decode_micro_batches_overlap():
    """pp_size = 2 (max_decode_inflight 2): a request that becomes ready while another's decode step is in flight
    gets its own step, so the two stages work on two decode micro-batches."""
    s = Scheduler(SchedulerConfig(6, 8, 64, prefill_chunk_while_decoding=2, max_decode_inflight=2),
                  PageAllocator(64, PAGE), [EOS])
    s.add("a", [5] * 3, params())
    s.add("b", [6] * 9, params())
    plans = [s.schedule(), s.schedule()]
    answer(s, plans[0])
    first = s.schedule()
    answer(s, plans[1])
    second = s.schedule()
    assert [e.req_id for e in first.entries] == [0] and [e.req_id for e in second.entries] == [1]
    assert s.schedule() is None                                    # both in flight


@pytest.mark.parametrize("kw, tokens, reason, steps", [
    (dict(), [EOS], "stop", 1),                                   # end of sequence
    (dict(ignore_eos=True, max_tokens=3), [EOS, EOS, EOS], "length", 3),
    (dict(stop_token_ids=[9]), [4, 9], "stop", 2),
    (dict(max_tokens=2), [4, 4], "length", 2),
])
def test_stop_conditions_finish_and_free_the_pages(kw, tokens, reason, steps):
    s = make(num_pages=8, chunk=100)
    s.add("a", [5, 6, 7, 8, 9], params(**kw))
    for i, tok in enumerate(tokens):
        out = answer(s, s.schedule(), token=tok)
        assert out[0].finished == (i == steps - 1)
    assert out[0].finish_reason == reason
    assert not s.has_unfinished() and s.allocator.num_free == 8 and s.schedule() is None


def test_the_context_limit_stops_generation():
    s = make(chunk=100, max_model_len=7)
    s.add("a", [5] * 5, params(max_tokens=100))
    reasons = [answer(s, s.schedule())[0].finish_reason for _ in range(2)]
    assert reasons == [None, "length"]                            # 5 prompt + 2 generated = 7


def test_abort_frees_pages_and_drops_results_already_in_flight():
    s = make(num_pages=8, chunk=100)
    s.add("a", [5] * 9, params())
    plan = s.schedule()
    assert s.allocator.num_free == 5
    [req] = s.abort("a")
    assert req.phase is Phase.FINISHED and req.finish_reason == "abort" and s.allocator.num_free == 8
    assert answer(s, plan) == [] and not s.has_unfinished()
    assert s.abort("a") == [] and s.abort("never-added") == []
    s.add("a", [5], params())                                      # the id is free again


def test_admission_waits_for_pages_and_an_impossible_prompt_is_an_error():
    s = make(num_pages=4, chunk=100)
    s.add("a", [5] * 12, params())                                 # 3 pages
    s.add("b", [6] * 8, params())                                  # 2 pages: must wait for "a"
    plan = s.schedule()
    assert [e.req_id for e in plan.entries] == [0] and len(s.waiting) == 1
    s.abort("a")
    assert [e.req_id for e in s.schedule().entries] == [1]
    s = make(num_pages=2, chunk=100)
    s.add("huge", [5] * 9, params())
    with pytest.raises(OutOfPagesError, match="'huge' needs 9 tokens of KV cache; the cache holds 8"):
        s.schedule()


def test_a_request_that_cannot_grow_gives_its_pages_back_and_is_recomputed_later():
    s = make(num_pages=3, chunk=100)
    s.add("a", [5] * 4, params(max_tokens=10))                      # 1 page each, both full
    s.add("b", [6] * 4, params(max_tokens=10))
    answer(s, s.schedule(), token=20)
    # the decode needs a 2nd page for each; 1 is free: "a" takes it, and "b", with every other request in
    # this step already, gives its own page back
    plan = s.schedule()
    assert plan.is_decode and [e.req_id for e in plan.entries] == [0]
    b = s.requests[1]
    assert b.phase is Phase.WAITING and b.pages == [] and b.num_scheduled == 0 and s.waiting[0] is b
    answer(s, plan, token=21)
    s.abort("a")
    # re-admitted: its prompt plus the token it already generated are prefilled again, then it samples
    replay = s.schedule()
    assert not replay.is_decode and replay.entries[0].token_ids == [6, 6, 6, 6, 20]
    assert replay.entries[0].sample.output_index == 1
    assert answer(s, replay, token=22)[0].new_token_ids == [22]
    assert s.requests[1].output_token_ids == [20, 22]


def test_a_full_cache_preempts_the_newest_request_outside_the_step():
    s = make(num_pages=3, chunk=100, max_num_seqs=1)
    s.add("a", [5] * 4, params(max_tokens=10))
    s.add("b", [6] * 4, params(max_tokens=10))
    answer(s, s.schedule(), token=20)                              # prefill "a" (one request per step)
    plan = s.schedule()                                            # "a" decodes between the two prefills
    assert plan.is_decode and [e.req_id for e in plan.entries] == [0]
    answer(s, plan, token=21)
    answer(s, s.schedule(), token=30)                              # prefill "b"
    for _ in range(3):                                             # "a" decodes: 9 tokens, 8 of them cached
        plan = s.schedule()
        assert [e.req_id for e in plan.entries] == [0]
        answer(s, plan, token=21)
    assert (s.requests[0].pages, s.requests[1].pages, s.allocator.num_free) == ([0, 1], [2], 0)
    plan = s.schedule()                                            # "a" needs a 3rd page: "b" is preempted
    assert [e.req_id for e in plan.entries] == [0] and plan.entries[0].block_table == [0, 1, 2]
    assert s.requests[1].phase is Phase.WAITING and s.requests[1].pages == []


def test_duplicate_ids_are_rejected():
    s = make()
    s.add("a", [5], params())
    with pytest.raises(ValueError, match="'a' is already in use"):
        s.add("a", [6], params())


# ---- n > 1, penalties, min_tokens, prompt logprobs (issue 16) ------------------------------------------------
def test_n_sequences_fork_after_one_prefill_sharing_full_pages():
    """One prefill; the step reaching the prompt's end samples all n first tokens; the others share the full
    pages and get a copy of the partly filled one, made by the next plan (before anything writes it)."""
    s = make(chunk=4)
    s.add("a", list(range(10, 20)), params(n=3, temperature=1.0))          # 10 tokens: pages 0, 1 full, 2 partial
    plans = [s.schedule() for _ in range(3)]
    last = plans[-1].entries[0]
    assert [len(p.entries) for p in plans] == [1, 1, 1] and last.sample is not None
    assert [rid for rid, _ in last.forks] == [1, 2]
    assert [spec.seed for _, spec in last.forks] != [last.sample.seed] * 2            # each its own seed
    seqs = s.groups["a"]
    assert [r.pages for r in seqs] == [[0, 1, 2], [0, 1, 3], [0, 1, 4]]
    assert [s.allocator.refs(p) for p in range(5)] == [3, 3, 1, 1, 1]
    assert all(p.page_copies == [] for p in plans)
    out = s.process_results(plans[-1], [SampledToken(0, 7), SampledToken(1, 8), SampledToken(2, 9)])
    assert [(o.index, o.new_token_ids) for o in out] == [(0, [7]), (1, [8]), (2, [9])]
    nxt = s.schedule()
    assert nxt.is_decode and nxt.page_copies == [(2, 3), (2, 4)]
    assert [(e.req_id, e.token_ids, e.start_pos, e.block_table) for e in nxt.entries] == \
        [(0, [7], 10, [0, 1, 2]), (1, [8], 10, [0, 1, 3]), (2, [9], 10, [0, 1, 4])]
    assert s.schedule() is None                                              # all three await their tokens
    s.abort("a", index=1)                                                    # one sequence ends alone
    assert [s.allocator.refs(p) for p in range(5)] == [2, 2, 1, 0, 1] and "a" in s.groups
    s.abort("a")
    assert s.allocator.num_free == 64 and "a" not in s.groups


def test_a_prompt_filling_whole_pages_forks_without_copies():
    s = make(chunk=100)
    s.add("a", list(range(8)), params(n=2))
    plan = s.schedule()
    assert [r.pages for r in s.groups["a"]] == [[0, 1], [0, 1]]
    s.process_results(plan, [SampledToken(0, 7), SampledToken(1, 7)])
    assert s.schedule().page_copies == []


def test_a_sequence_that_cannot_get_its_page_is_recomputed_alone():
    s = make(num_pages=3, chunk=100)
    s.add("a", list(range(6)), params(n=3, max_tokens=1))      # 2 pages + 2 copies: only one copy fits
    plan = s.schedule()
    (forked, spec), = plan.entries[0].forks
    seqs = s.groups["a"]
    assert forked == seqs[1].req_id and seqs[2].phase is Phase.WAITING and s.waiting[0] is seqs[2]
    out = s.process_results(plan, [SampledToken(0, 7), SampledToken(forked, 8)])
    assert [o.finished for o in out] == [True, True] and s.allocator.num_free == 3
    again = s.schedule()                                         # sequence 2 alone, from its prompt
    e = again.entries[0]
    assert (e.req_id, e.token_ids, e.start_pos, e.forks) == (seqs[2].req_id, list(range(6)), 0, [])
    assert (e.sample.seed, e.sample.output_index) == (seqs[2].seed, 0)   # the draw the fork would have made
    out = s.process_results(again, [SampledToken(seqs[2].req_id, 9)])
    assert [(o.index, o.finished) for o in out] == [(2, True)] and not s.has_unfinished()


def test_penalized_requests_get_count_slots_and_forks_copy_them():
    s = make(chunk=100)
    s.add("plain", [5, 6], params())
    s.add("a", [5, 6, 7], params(n=2, presence_penalty=0.5))
    plan = s.schedule()
    plain, a = plan.entries
    assert plain.counts is None and plain.sample.counts_slot == -1
    assert (a.counts.slot, a.counts.prompt_len) == (0, 3) and a.sample.counts_slot == 0
    (child, spec), = a.forks
    assert spec.counts_slot == 0                                  # sampled from the parent's row, before the copy
    s.process_results(plan, [SampledToken(0, 9), SampledToken(1, 9), SampledToken(2, 9)])
    nxt = s.schedule()
    assert nxt.counts_copies == [(0, 1)]
    assert [(e.counts.slot if e.counts else -1) for e in nxt.entries] == [-1, 0, 1]
    s.abort("a")
    s.add("b", [1, 2], params(frequency_penalty=1.0))
    assert s.schedule().entries[0].counts.slot == 0              # slots are reused, lowest first


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    s = make(chunk=100)
    s.add("a", [5, 6], params(min_tokens=2, stop_token_ids=[3]))
    plan = s.schedule()
    assert plan.entries[0].sample.banned_token_ids == (EOS, 3)
    s.process_results(plan, [SampledToken(0, 7)])
    plan = s.schedule()
    assert plan.entries[0].sample.banned_token_ids == (EOS, 3)
    s.process_results(plan, [SampledToken(0, 7)])
    assert s.schedule().entries[0].sample.banned_token_ids == ()
    s.add("b", [5], params(min_tokens=1, ignore_eos=True, stop_token_ids=[4]))
    assert s.schedule().entries[0].sample.banned_token_ids == (4,)        # eos is no stop here: not banned


def test_prompt_only_request_scores_the_prompt_and_ends():
    from dsaserve.runtime.plan import PromptLogprobs

    s = make(chunk=3)
    s.add("a", [5, 6, 7, 8, 9], params(max_tokens=0, prompt_logprobs=1, n=2))
    p1, p2 = s.schedule(), s.schedule()
    assert [(e.prompt_logprobs, e.next_token_id, e.sample) for e in (p1.entries[0], p2.entries[0])] == \
        [(1, 8, None), (1, None, None)]
    assert s.process_results(p1, [PromptLogprobs(0, [1, 2, 3], [{6: -1.0}, {7: -2.0}, {8: -3.0}])]) == []
    out = s.process_results(p2, [PromptLogprobs(0, [4], [{9: -4.0}])])
    assert [(o.index, o.finished, o.finish_reason, o.new_token_ids) for o in out] == \
        [(0, True, "length", []), (1, True, "length", [])]
    assert out[0].prompt_logprobs == [None, {6: -1.0}, {7: -2.0}, {8: -3.0}, {9: -4.0}]
    assert out[1].prompt_logprobs is None and s.allocator.num_free == 64 and not s.has_unfinished()
