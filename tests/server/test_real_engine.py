"""The server over the real ``LLMEngine`` and a tiny random checkpoint (CPU): the official openai client,
a bad-input sample, 64 concurrent requests vs sequential, and the fault test on a multi-process layout."""

from __future__ import annotations

import signal

import pytest

openai = pytest.importorskip("openai")

from dsaserve.checkpoint.tiny import make_tiny_checkpoint  # noqa: E402
from dsaserve.engine.engine import LLMEngine  # noqa: E402

from .conftest import InProcessServer  # noqa: E402
from .fault_util import run_fault_scenario  # noqa: E402
from .load_util import make_requests, run_load  # noqa: E402
from .proc_util import ServerProcess  # noqa: E402

MAX_LEN = 256


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "tiny-dsa"))


@pytest.fixture(scope="module")
def real_server(tiny_dir):
    # The multi-process PP2 x CP2 runtime behind the server (4 ranks, gloo), as users run it.
    srv = InProcessServer(LLMEngine(tiny_dir, pp_size=2, cp_size=2, max_model_len=MAX_LEN))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(real_server):
    return openai.OpenAI(base_url=real_server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_completions_stream_and_not(real_server, oai):
    tok = real_server.engine.tokenizer
    model = real_server.server.model_name
    assert model == "tiny-dsa"
    prompt = "The quick brown fox"
    r = oai.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    chunks = list(oai.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_chat_uses_checkpoint_template(real_server, oai):
    tok = real_server.engine.tokenizer
    assert tok.chat_template, "the tiny checkpoint should ship a chat template"
    model = real_server.server.model_name
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    expected_prompt = len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)))
    r = oai.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == expected_prompt and r.usage.completion_tokens == 5
    chunks = list(oai.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == expected_prompt


def test_bad_input_sample(real_server, oai):
    model = real_server.server.model_name
    for kwargs, param in [(dict(prompt="word " * 400), "prompt"), (dict(prompt="hi", max_tokens=0), "max_tokens"),
                          (dict(prompt="hi", top_p=2.0), "top_p"), (dict(prompt=[10**6]), "prompt")]:
        with pytest.raises(openai.BadRequestError) as exc:
            oai.completions.create(model=model, **kwargs)
        assert exc.value.param == param
    r = oai.completions.create(model=model, prompt="still ok", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_vocabulary_rule_is_the_model_s(real_server, oai):
    """Issue 14 item 17: the server rejected ids the CLI accepted ('the vocabulary has 480 tokens'); both now
    apply the engine's rule, the model's vocabulary [0, 512), also to stop_token_ids."""
    model = real_server.server.model_name
    r = oai.completions.create(model=model, prompt=[5, 500], max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == 2
    for kwargs, param in [(dict(prompt=[5, 512]), "prompt"), (dict(prompt=[5], extra_body={"stop_token_ids": [512]}),
                                                              "stop_token_ids")]:
        with pytest.raises(openai.BadRequestError) as exc:
            oai.completions.create(model=model, max_tokens=1, **kwargs)
        assert exc.value.param == param and "outside the model's vocabulary [0, 512)" in str(exc.value)


def test_64_concurrent_equal_sequential(real_server):
    # Short outputs: the tiny model takes ~0.1 s per step on 2 CPU cores.
    reqs = make_requests(64, seed=7, max_prompt_words=12, max_tokens=3)
    model = real_server.server.model_name
    sequential = run_load(real_server.base_url, model, reqs, concurrent=False, timeout=300)
    concurrent = run_load(real_server.base_url, model, reqs, concurrent=True, timeout=300)
    assert len(concurrent) == 64
    mismatches = [(i, s, c) for i, (s, c) in enumerate(zip(sequential, concurrent)) if s != c]
    assert not mismatches, f"{len(mismatches)} concurrent outputs differ from sequential: {mismatches[:5]}"
    assert not real_server.engine.has_unfinished_requests()


def test_fault_worker_killed(tiny_dir):
    server = ServerProcess(["--model", tiny_dir, "--max-model-len", str(MAX_LEN), "--fault-exit-delay", "2",
                            "--pp-size", "2"])
    try:
        # Start-up of the engine itself (spawning + loading ranks) must finish in 90 s on CPU.
        run_fault_scenario(server, "tiny-dsa", ready_timeout=90)
    finally:
        server.kill()


def test_fault_worker_stopped(tiny_dir):
    """Issue 14 item 2: a worker stopped with SIGSTOP (alive but silent) is named within seconds by the
    heartbeats (before: the stream stalled, /health said ok, and after 120 s an error named no rank)."""
    server = ServerProcess(["--model", tiny_dir, "--max-model-len", str(MAX_LEN), "--fault-exit-delay", "2",
                            "--cp-size", "2", "--heartbeat-timeout-s", "2"])
    try:
        reason = run_fault_scenario(server, "tiny-dsa", ready_timeout=90, sig=signal.SIGSTOP, needle="rank 1 (host",
                                    within_s=20)
        assert "no heartbeat" in reason and "rank 1 (host" in reason, reason
    finally:
        server.kill()
