"""Sampling parity features end to end (issue 16): presence / frequency / repetition penalties, logit_bias,
min_tokens, ignore_eos and n > 1 through ``LLM.generate`` equal a plain reference decode loop on fixed seeds:
transformers' model gives the logits (the independent oracle), tests/runtime/reference_sampling.py
processes them and draws with the same (seed, index) stream. On the general decode path (reference
attention) and on the static decode path (triton backend: staged inputs, device-side token counts)."""

from __future__ import annotations

import pytest
import torch

from dsaserve import SamplingParams
from dsaserve.engine.scheduler import child_seed
from tests.model._shared import prompt_ids
from tests.runtime.reference_sampling import draw, process_row

pytestmark = pytest.mark.timeout(600)

ARCH = "deepseek_v32"
EOS = 1                                      # the tiny checkpoint's eos id
MAX_TOKENS = 10


def reference(world, prompt: list[int], p: SamplingParams, seed: int) -> tuple[list[int], str]:
    """The plain decode loop: full forward of transformers' model each step, reference processors, draw."""
    model = world.hf_model(ARCH)
    out: list[int] = []
    reason = "length"
    for k in range(p.max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
        banned = (sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else {EOS})) if k < p.min_tokens else [])
        x = process_row(logits, prompt=prompt, output=out, presence=p.presence_penalty,
                        frequency=p.frequency_penalty, repetition=p.repetition_penalty, logit_bias=p.logit_bias,
                        banned=banned)
        tok = draw(x, temperature=p.temperature, seed=seed, index=k, top_k=p.top_k, top_p=p.top_p)
        out.append(tok)
        if (tok == EOS and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"
            break
    return out, reason


CASES = {
    "penalties_sampled": dict(temperature=0.8, presence_penalty=1.5, frequency_penalty=0.7, repetition_penalty=1.4),
    "repetition_greedy": dict(temperature=0.0, repetition_penalty=3.0),
    "negative_penalties": dict(temperature=1.0, presence_penalty=-2.0, frequency_penalty=-0.5),
    "logit_bias": dict(temperature=1.0, logit_bias={100: 4.0, 200: -100.0, 300: 2.5}),
    # eos made likely by a bias: banned for the first 4 tokens, then it ends the request ("stop")
    "min_tokens": dict(temperature=1.0, logit_bias={EOS: 9.0}, min_tokens=4),
    "min_tokens_stop_ids": dict(temperature=0.0, logit_bias={77: 30.0}, stop_token_ids=[77], min_tokens=3),
    "ignore_eos": dict(temperature=1.0, logit_bias={EOS: 9.0}, ignore_eos=True, top_k=50, top_p=0.9),
    "everything": dict(temperature=0.9, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                       logit_bias={42: 3.0}, min_tokens=2, top_k=40),
}


@pytest.fixture(scope="module", params=["general", "static"])
def llm(request, world):
    # static: the triton attention backend has the static decode path (staged inputs) also on CPU
    llm = world.arch_llm(ARCH, **({"attention_backend": "triton"} if request.param == "static" else {}))
    assert llm.engine.executor.runner.static_decode == (request.param == "static")
    return llm


@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_reference_loop(world, llm, name):
    prompt = prompt_ids(37, seed=3)
    p = SamplingParams(max_tokens=MAX_TOKENS, seed=1234, **CASES[name])
    out = llm.generate([prompt], p)[0]
    want, reason = reference(world, prompt, p, 1234)
    assert out.token_ids == want and out.finish_reason == reason, name
    if name == "min_tokens":
        assert len(want) == 5 and want[-1] == EOS                   # the control: the ban really mattered
    if name == "min_tokens_stop_ids":
        assert want == [want[0], want[1], want[2], 77]


def test_penalties_change_the_output(world, llm):
    """Control for the reference test: the penalties are not no-ops on this model."""
    prompt = prompt_ids(37, seed=3)
    base = llm.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0].token_ids
    pen = llm.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, repetition_penalty=3.0,
                                                frequency_penalty=2.0))[0].token_ids
    assert base != pen and len(set(pen)) == len(pen)                 # heavy penalties: no token twice


@pytest.mark.parametrize("length", [37, 64])                     # partial last page, and whole pages
def test_n_sequences_equal_their_reference_and_n1_runs(world, llm, length):
    """n = 3 sampled sequences with penalties: sequence i is the reference run with child_seed(seed, i); it is
    also what a single request seeded so generates. One prefill, forked pages, all pages back afterwards."""
    prompt = prompt_ids(length, seed=4)
    kw = dict(max_tokens=8, temperature=1.0, presence_penalty=0.8, repetition_penalty=1.3, ignore_eos=True)
    outs = llm.generate([prompt], SamplingParams(n=3, seed=99, **kw))
    assert [o.index for o in outs] == [0, 1, 2] and all(o.prompt_token_ids == prompt for o in outs)
    for i, o in enumerate(outs):
        want, _ = reference(world, prompt, SamplingParams(**kw), child_seed(99, i))
        assert o.token_ids == want, f"sequence {i}"
        alone = llm.generate([prompt], SamplingParams(seed=child_seed(99, i), **kw))[0]
        assert alone.token_ids == o.token_ids
    assert len({tuple(o.token_ids) for o in outs}) == 3
    alloc = llm.engine.scheduler.allocator
    assert alloc.num_free == alloc.num_pages and not llm.engine.has_unfinished_requests()


def test_n_with_stop_strings_per_sequence(llm):
    """A stop string ends only the sequence that produced it."""
    prompt = prompt_ids(20, seed=5)
    kw = dict(n=4, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    texts = [o.text for o in llm.generate([prompt], SamplingParams(**kw))]
    # a stop string in sequence 0's text that some other sequence does not contain
    stop = next(t[i:i + 3] for t in texts[:1] for i in range(2, len(t) - 3)
                if t[i:i + 3].strip() and any(t[i:i + 3] not in u for u in texts[1:]))
    cut = llm.generate([prompt], SamplingParams(stop=[stop], **kw))
    for full, c in zip(texts, cut):
        if stop in full:
            assert c.text == full[:full.index(stop)] and c.finish_reason == "stop"
        else:
            assert c.text == full and c.finish_reason == "length"
    assert cut[0].finish_reason == "stop" and "length" in {c.finish_reason for c in cut[1:]}
