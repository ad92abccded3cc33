"""The engine's ways of computing the same thing agree: chunked vs one-shot prefill, cached decode vs
recompute, batched vs alone, preempted-and-recomputed vs undisturbed."""

from __future__ import annotations

import pytest

from dsaserve import SamplingParams
from tests.model._shared import ARCHS, MAX_TOKENS, TOPK_LOGPROBS, max_dict_diff, prompt_ids

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOPK_LOGPROBS)


@pytest.mark.parametrize("chunk", [7, 32, 50])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_equals_one_shot(world, arch, chunk):
    """Chunks smaller than, equal to and not dividing the prompt; each prompt alone."""
    llm = world.arch_llm(arch, chunked_prefill_size=chunk)
    for length in (31, 33, 90, 300):
        out = llm.generate([prompt_ids(length)], GREEDY)[0]
        ref = world.base_output(arch, length)
        assert out.token_ids == ref.token_ids, f"prompt {length}, chunk {chunk}"
        assert max_dict_diff(out.logprobs, ref.logprobs) < 1e-5


def test_chunking_really_happens(world):
    """The chunked engine splits a 90-token prompt into ceil(90 / 32) = 3 prefill steps."""
    llm = world.arch_llm("deepseek_v32", chunked_prefill_size=32)
    engine = llm.engine
    sizes = []
    orig = engine.executor.submit

    def spy(plan):
        if not plan.is_decode:
            sizes.append([len(e.token_ids) for e in plan.entries])
        return orig(plan)

    engine.executor.submit = spy
    try:
        llm.generate([prompt_ids(90)], SamplingParams(max_tokens=2))
    finally:
        del engine.executor.submit
    assert sizes == [[32], [32], [26]]


@pytest.mark.parametrize("length", [20, 300])
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_with_cache_equals_recompute(world, arch, length):
    """For each generated position i, a fresh one-token run on prompt + generated[:i] (no cache reuse:
    the whole context is prefilled) gives the same token and logprobs."""
    prompt = prompt_ids(length)
    ref = world.base_output(arch, length)
    llm = world.arch_llm(arch)
    one = SamplingParams(max_tokens=1, ignore_eos=True, logprobs=TOPK_LOGPROBS)
    worst = 0.0
    for i in range(MAX_TOKENS):
        out = llm.generate([prompt + ref.token_ids[:i]], one)[0]
        assert out.token_ids == [ref.token_ids[i]], f"position {i}"
        worst = max(worst, max_dict_diff(out.logprobs, ref.logprobs[i:i + 1]))
    assert worst < 1e-4
    print(f"{arch} len {length}: decode vs recompute max logprob diff {worst:.2e}")


@pytest.mark.parametrize("options", [{}, {"chunked_prefill_size": 50}, {"max_num_seqs": 2},
                                     {"chunked_prefill_size": 40, "page_size": 16}],
                         ids=["one-shot", "chunk50", "max_num_seqs2", "chunk40-page16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_alone(world, arch, options):
    """Mixed-length prompts in one generate call (prefills batched together, decodes batched, queueing
    when max_num_seqs is small) give each prompt's result alone."""
    lengths = (300, 5, 90, 31, 33)
    outs = world.arch_llm(arch, **options).generate([prompt_ids(n) for n in lengths], GREEDY)
    assert len(outs) == len(lengths)
    for n, out in zip(lengths, outs):
        ref = world.base_output(arch, n)
        assert out.prompt_token_ids == prompt_ids(n)
        assert out.token_ids == ref.token_ids, f"prompt {n}"
        assert max_dict_diff(out.logprobs, ref.logprobs) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_recomputes_correctly(world, arch):
    """A KV cache of 8 pages (512 tokens) holds two 250-token prompts but not their decodes: the newest
    request is preempted, recomputed later (prompt + its generated tokens), and every result still equals
    the request run alone."""
    llm = world.arch_llm(arch, kv_cache_tokens=512, max_model_len=512)
    lengths = (250, 251, 240)
    refs = [world.arch_llm(arch).generate([prompt_ids(n)], GREEDY)[0] for n in lengths]
    sched = llm.engine.scheduler
    preempted = []
    orig = sched._preempt

    def spy(req):
        preempted.append(req.external_id)
        return orig(req)

    sched._preempt = spy
    try:
        outs = llm.generate([prompt_ids(n) for n in lengths], GREEDY)
    finally:
        del sched._preempt
    assert preempted, "the test did not trigger preemption"
    for n, out, ref in zip(lengths, outs, refs):
        assert out.token_ids == ref.token_ids, f"prompt {n}"
        assert max_dict_diff(out.logprobs, ref.logprobs) < 1e-4
    assert llm.engine.scheduler.allocator.num_free == llm.engine.scheduler.allocator.num_pages  # all pages back
