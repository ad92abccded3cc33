"""Sampling behaviour through LLM.generate: seeds, top-k / top-p, stops, logprobs."""

from __future__ import annotations

import math

import pytest

from dsaserve import SamplingParams
from tests.model._shared import MAX_TOKENS, prompt_ids

pytestmark = pytest.mark.timeout(300)

ARCH = "deepseek_v32"


@pytest.fixture(scope="module")
def llm(world):
    return world.arch_llm(ARCH)


@pytest.fixture(scope="module")
def greedy(world):
    return world.base_output(ARCH, 33).token_ids


def _gen(llm, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("ignore_eos", True)
    return llm.generate([prompt_ids(33)], SamplingParams(**kw))[0]


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm, greedy):
    a = _gen(llm, temperature=1.0, seed=123)
    b = _gen(llm, temperature=1.0, seed=123)
    c = _gen(llm, temperature=1.0, seed=124)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.token_ids != greedy  # near-uniform tiny model: sampling is far from greedy
    # the same seed gives the same draws when the request shares a batch with others
    batch = llm.generate([prompt_ids(90), prompt_ids(33)], SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0,
                                                                          seed=123, ignore_eos=True))
    assert batch[1].token_ids == a.token_ids


def test_unseeded_sampling_varies(llm):
    runs = {tuple(_gen(llm, temperature=1.0).token_ids) for _ in range(2)}
    assert len(runs) == 2


def test_top_k_1_is_greedy(llm, greedy):
    assert _gen(llm, temperature=1.0, top_k=1, seed=5).token_ids == greedy


def test_tiny_top_p_is_greedy(llm, greedy):
    assert _gen(llm, temperature=1.0, top_p=1e-6, seed=5).token_ids == greedy


def test_top_k_restricts_the_draws(llm):
    """With top_k=3 every sampled token is among the 3 most likely ones (logprobs=3 lists exactly them)."""
    out = _gen(llm, temperature=2.0, top_k=3, seed=11, logprobs=3)
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert len(lp) == 3 and tok in lp
    assert len(set(out.token_ids)) > 1


def test_logprobs_contract(llm, greedy):
    none = _gen(llm)
    assert none.logprobs is None
    assert none.token_ids == greedy
    zero = _gen(llm, logprobs=0)
    assert [list(lp) for lp in zero.logprobs] == [[t] for t in greedy]  # only the sampled token
    five = _gen(llm, logprobs=5, temperature=1.0, seed=3)
    for tok, lp in zip(five.token_ids, five.logprobs):
        assert tok in lp and len(lp) in (5, 6)  # top-5 plus the sampled token when it is not among them
        assert all(v <= 0 for v in lp.values())
        top5 = sorted(lp.values(), reverse=True)[:5]
        assert top5[0] < 0 and sum(math.exp(v) for v in lp.values()) < 1.0 + 1e-6


def test_max_tokens(llm, greedy):
    out = _gen(llm, max_tokens=3)
    assert out.token_ids == greedy[:3]
    assert out.finish_reason == "length"


def test_stop_at_eos(world, greedy):
    """A checkpoint variant whose eos is the 5th greedy token: generation stops right after emitting it
    (finish_reason 'stop'), unless ignore_eos."""
    eos = greedy[4]
    assert eos not in greedy[:4]
    llm = world.llm(world.variant(ARCH, f"eos{eos}", {"eos_token_id": eos}, {"eos_token_id": eos}))
    assert eos in llm.engine.eos_token_ids
    out = llm.generate([prompt_ids(33)], SamplingParams(max_tokens=MAX_TOKENS))[0]
    assert out.token_ids == greedy[:5]
    assert out.finish_reason == "stop"
    out = llm.generate([prompt_ids(33)], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    assert out.token_ids == greedy and out.finish_reason == "length"


def test_stop_token_ids(llm, greedy):
    stop = greedy[6]
    first = greedy.index(stop)
    out = _gen(llm, stop_token_ids=[stop])
    assert out.token_ids == greedy[: first + 1]
    assert out.finish_reason == "stop"


def test_context_limit_finishes_with_length(world):
    llm = world.arch_llm(ARCH, max_model_len=40)
    out = llm.generate([prompt_ids(33)], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    assert len(out.token_ids) == 40 - 33
    assert out.finish_reason == "length"
    assert out.token_ids == world.base_output(ARCH, 33).token_ids[:7]


def test_text_prompt_and_detokenized_text(llm):
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=8))[0]
    assert out.prompt_token_ids[0] == llm.tokenizer.bos_token_id
    assert out.prompt_token_ids[1:] == llm.tokenizer.encode("The capital of France is", add_bos=False)
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert len(out.token_ids) == 8 and out.text


def test_stop_strings(llm):
    full = llm.generate("The capital of France is", SamplingParams(max_tokens=12))[0]
    stop = full.text[3:6]
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=12, stop=[stop]))[0]
    assert out.text == full.text[: full.text.index(stop)]
    assert out.finish_reason == "stop"
