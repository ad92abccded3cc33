"""The model against transformers (the independent oracle), on tiny DeepSeek-V3.2 and GLM-5 checkpoints.

Greedy 16-token continuations must be identical and the top-5 logprobs of every generated token must agree
within 1e-3 (fp32), for prompts below and well above index_topk = 32 (sparse attention really selects).
"""

from __future__ import annotations

import pytest
import torch

from dsaserve import SamplingParams
from tests.model._shared import (ARCHS, MAX_TOKENS, PROMPT_LENS, TOPK_LOGPROBS, max_logprob_diff, prompt_ids)

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOPK_LOGPROBS)


def _check_against_hf(out, hf_tokens, hf_logprobs, tol=1e-3):
    assert out.token_ids == hf_tokens
    assert len(out.logprobs) == MAX_TOKENS
    for step, lp in enumerate(out.logprobs):
        ref_top = hf_logprobs[step].topk(TOPK_LOGPROBS)
        # greedy: the sampled token is the top-1, so the dict is exactly the top-5
        assert set(lp) == set(ref_top.indices.tolist()), f"step {step}: top-5 token set differs from transformers"
    diff = max_logprob_diff(out.logprobs, hf_logprobs)
    assert diff < tol, f"logprobs differ from transformers by {diff:.2e}"
    return diff


@pytest.mark.parametrize("length", PROMPT_LENS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(world, arch, length, record_property):
    prompt = prompt_ids(length)
    out = world.arch_llm(arch).generate([prompt], GREEDY)[0]
    hf_tokens, hf_logprobs = world.hf_greedy(arch, prompt)
    assert len(set(hf_tokens)) >= 4, f"degenerate tiny model: continuation {hf_tokens}"
    diff = _check_against_hf(out, hf_tokens, hf_logprobs)
    assert out.finish_reason == "length"
    record_property("max_logprob_diff", diff)
    print(f"{arch} len {length}: max |logprob - HF| = {diff:.2e}")


@pytest.mark.parametrize("arch", ARCHS)
def test_continuations_differ_across_prompts(world, arch):
    """The tiny model is not degenerate: different prompts give different continuations."""
    conts = {tuple(world.hf_greedy(arch, prompt_ids(n))[0]) for n in PROMPT_LENS}
    assert len(conts) >= 3


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_selection_matters(world, arch):
    """Control for the parity test: attending to every key (index_topk raised to 4096) on the 300-token
    prompt moves the logprobs far beyond the 1e-3 tolerance, so agreeing with transformers there really
    checks the indexer's top-k selection."""
    dense_dir = world.variant(arch, "dense", {"index_topk": 4096})
    prompt = prompt_ids(300)
    out = world.llm(dense_dir).generate([prompt], SamplingParams(max_tokens=1, logprobs=TOPK_LOGPROBS))[0]
    _, hf_logprobs = world.hf_greedy(arch, prompt)
    assert max_logprob_diff(out.logprobs, hf_logprobs[:1]) > 1e-2
    # ... while below top-k the dense and sparse models are the same model
    short = prompt_ids(5)
    out = world.llm(dense_dir).generate([short], GREEDY)[0]
    _check_against_hf(out, *world.hf_greedy(arch, short))


def _hf_class(arch: str):
    import transformers

    return {"deepseek_v32": transformers.DeepseekV32ForCausalLM,
            "glm_moe_dsa": transformers.GlmMoeDsaForCausalLM}[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_save_pretrained_folder(world, arch, tmp_path):
    """A folder written by transformers' save_pretrained (fp32 weights, transformers' own config.json, no
    tokenizer, no MTP layer) loads in LLM and matches that model for token-id prompts; text prompts fail
    with a message that says why."""
    from transformers import CONFIG_MAPPING

    from dsaserve.checkpoint.tiny import tiny_config_dict

    raw = tiny_config_dict(arch)
    config = CONFIG_MAPPING[arch](**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    hf = _hf_class(arch)(config).eval()
    hf.save_pretrained(tmp_path)
    llm = world.llm(str(tmp_path), dtype="auto")
    assert llm.engine.dtype == torch.float32  # "auto" follows the saved dtype
    assert llm.tokenizer is None
    for length in (33, 90):
        prompt = prompt_ids(length, seed=7)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=None,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        hf_tokens = ref.sequences[0, length:].tolist()
        hf_logprobs = torch.stack([lg[0].float() for lg in ref.logits]).log_softmax(-1)
        out = llm.generate([prompt], GREEDY)[0]
        _check_against_hf(out, hf_tokens, hf_logprobs)
        assert out.text == ""  # nothing to decode with
    with pytest.raises(ValueError, match="no tokenizer.json.*token ids"):
        llm.generate("Hello there", GREEDY)
