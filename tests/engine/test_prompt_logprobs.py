"""Prompt logprobs (issue 16 item 2): ``SamplingParams(prompt_logprobs=k)`` returns, for every prompt token
after the first, its logprob and the top k of its position, equal to transformers' log-softmax (fp32) within
1e-4, also across chunk boundaries and with ``max_tokens=0`` (score a prompt without generating). The PP x CP
equality with one process is in tests/parallel/test_layouts.py."""

from __future__ import annotations

import pytest
import torch

from dsaserve import SamplingParams
from tests.model._shared import ARCHS, prompt_ids

pytestmark = pytest.mark.timeout(600)

TOL = 1e-4
TOP = 4


def hf_prompt_logprobs(world, arch: str, prompt: list[int]) -> torch.Tensor:
    """[len - 1, V]: row i = log-softmax of the logits that predict prompt token i + 1."""
    with torch.no_grad():
        logits = world.hf_model(arch)(torch.tensor([prompt])).logits[0].float()
    return logits.log_softmax(-1)[:-1]


def check(out_lps, prompt, ref: torch.Tensor) -> float:
    assert len(out_lps) == len(prompt) and out_lps[0] is None
    worst = 0.0
    for i, lp in enumerate(out_lps[1:]):
        top = set(ref[i].topk(TOP).indices.tolist())
        assert set(lp) == top | {prompt[i + 1]}, f"position {i + 1}: top-{TOP} ids differ"
        worst = max(worst, max(abs(v - float(ref[i, t])) for t, v in lp.items()))
    assert worst < TOL, f"prompt logprobs differ from transformers by {worst:.2e}"
    return worst


@pytest.mark.parametrize("length", [5, 33, 90])          # below and above index_topk = 32
@pytest.mark.parametrize("arch", ARCHS)
def test_equal_transformers(world, arch, length):
    prompt = prompt_ids(length, seed=8)
    out = world.arch_llm(arch).generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=TOP))[0]
    diff = check(out.prompt_logprobs, prompt, hf_prompt_logprobs(world, arch, prompt))
    print(f"{arch} len {length}: max |prompt logprob - HF| = {diff:.2e}")


def test_chunked_prefill_and_scoring_only(world):
    """16-token chunks (each chunk's last row predicts the next chunk's first token), max_tokens=0, n = 2."""
    arch = "deepseek_v32"
    prompt = prompt_ids(90, seed=9)
    ref = hf_prompt_logprobs(world, arch, prompt)
    llm = world.arch_llm(arch, chunked_prefill_size=16)
    scored = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=TOP))[0]
    assert scored.token_ids == [] and scored.finish_reason == "length"
    check(scored.prompt_logprobs, prompt, ref)
    two = llm.generate([prompt], SamplingParams(max_tokens=3, prompt_logprobs=0, n=2, temperature=1.0, seed=1))
    assert [len(o.token_ids) for o in two] == [3, 3]
    for o in two:                               # k = 0: each token's own logprob only, shared by the sequences
        assert [list(lp) for lp in o.prompt_logprobs[1:]] == [[t] for t in prompt[1:]]
        assert max(abs(lp[t] - float(ref[i, t])) for i, (lp, t) in enumerate(zip(o.prompt_logprobs[1:], prompt[1:]))) < TOL
    assert not llm.engine.has_unfinished_requests()


def test_sampling_params_validate_prompt_logprobs():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)             # 0 only when scoring the prompt
