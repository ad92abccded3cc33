"""Bad input gets a clear error naming the problem, and the engine keeps working afterwards."""

from __future__ import annotations

import pytest

from dsaserve import LLM, SamplingParams
from dsaserve.config import ConfigError
from tests.model._shared import prompt_ids

pytestmark = pytest.mark.timeout(300)

ARCH = "deepseek_v32"


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(logprobs=-1), "logprobs"),
    (dict(seed="7"), "seed"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def llm(world):
    return world.arch_llm(ARCH, max_model_len=64)


def _still_works(llm, world):
    out = llm.generate([prompt_ids(33)], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.token_ids == world.base_output(ARCH, 33).token_ids[:4]
    assert not llm.engine.has_unfinished_requests()


def test_empty_prompt(llm, world):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    _still_works(llm, world)


def test_too_long_prompt(llm, world):
    with pytest.raises(ValueError, match="64 tokens.*max_model_len"):
        llm.generate([prompt_ids(64)], SamplingParams())
    _still_works(llm, world)


@pytest.mark.parametrize("bad", [512, -1, 10**9])
def test_token_id_out_of_range(llm, world, bad):
    with pytest.raises(ValueError, match=rf"{bad}.*outside the vocabulary \[0, 512\)"):
        llm.generate([[5, 6, bad]], SamplingParams())
    _still_works(llm, world)


def test_bad_prompt_type(llm):
    with pytest.raises(TypeError, match="string or a list of token ids"):
        llm.generate([[5, 6.0]], SamplingParams())
    with pytest.raises(TypeError, match="string or a list of token ids"):
        llm.generate([[True, 5]], SamplingParams())


def test_one_bad_prompt_fails_the_whole_call_cleanly(llm, world):
    """The good prompts queued before the bad one are aborted: nothing leaks into the next call."""
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([prompt_ids(10), prompt_ids(12), [1000]], SamplingParams())
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.allocator.num_free == llm.engine.scheduler.allocator.num_pages
    _still_works(llm, world)


def test_params_count_mismatch(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([prompt_ids(5)], [SamplingParams(), SamplingParams()])


def test_bad_engine_options(world):
    path = world.ckpt(ARCH)
    with pytest.raises(ConfigError, match="indexer_mode"):
        LLM(path, indexer_mode="int4")
    with pytest.raises(ConfigError, match="chunked_prefill_size"):
        LLM(path, chunked_prefill_size=0)
    with pytest.raises(ConfigError, match="dtype"):
        LLM(path, dtype="float64")
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(path + "-missing")
    with pytest.raises(TypeError, match="no_such_option"):
        LLM(path, no_such_option=1)
