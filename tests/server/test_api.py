"""The OpenAI endpoints over the fake engine, driven by the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import json
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from .fake_engine import TOKENIZER, expected_greedy_ids  # noqa: E402

MODEL = "fake-model"


def expected_text(prompt_ids, n):
    return TOKENIZER.decode(expected_greedy_ids(prompt_ids, n))


def chat_ids(messages):
    return TOKENIZER.encode(TOKENIZER.apply_chat_template(messages), add_bos=False)


@pytest.fixture(scope="module")
def oai(fake_server):
    return openai.OpenAI(base_url=fake_server.base_url + "/v1", api_key="none", max_retries=0, timeout=30)


def test_models_and_health(client):
    r = client.get("/v1/models")
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_non_streaming(oai):
    r = oai.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0)
    ids = TOKENIZER.encode("Hello there")
    assert r.choices[0].text == expected_text(ids, 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_completion_token_id_prompt(oai):
    ids = [72, 105, 33]
    r = oai.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].text == expected_text(ids, 5) and r.usage.prompt_tokens == 3


def test_completion_streaming_with_usage(oai):
    chunks = list(oai.completions.create(model=MODEL, prompt="Stream me", max_tokens=15, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    ids = TOKENIZER.encode("Stream me")
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected_text(ids, 15)
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 3  # really incremental
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_non_streaming(oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    ids = chat_ids(messages)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected_text(ids, 10)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10


def test_model_field_may_be_left_out(client):
    """As in vLLM and SGLang: a request without "model" goes to the served model, and the response names it."""
    ids = [72, 105, 33]
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == MODEL
    assert r.json()["choices"][0]["text"] == expected_text(ids, 4)
    messages = [{"role": "user", "content": "Hi!"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == MODEL
    assert r.json()["choices"][0]["message"]["content"] == expected_text(chat_ids(messages), 3)


def test_chat_streaming(oai):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell "}, {"type": "text", "text": "me"}]}]
    stream = oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=9, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    ids = chat_ids([{"role": "user", "content": "Tell me"}])
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(ids, 9)
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == 9


def test_chat_default_max_tokens_fills_context(oai, fake_server):
    messages = [{"role": "user", "content": "x" * 100}]
    r = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    n = len(chat_ids(messages))
    assert r.usage.completion_tokens == fake_server.engine.max_model_len - n
    assert r.choices[0].finish_reason == "length"


def test_stop_string_via_api(oai):
    ids = TOKENIZER.encode("Hello there")
    full = expected_text(ids, 30)
    stop = full[10:13]
    assert stop.strip(), full
    r = oai.completions.create(model=MODEL, prompt="Hello there", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30  # the engine was told to stop early
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=30, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == full[: full.index(stop)]


def test_eos_finish_reason(oai):
    r = oai.completions.create(model=MODEL, prompt="please EOS", max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4


def test_seeded_sampling_is_reproducible(oai):
    kw = dict(model=MODEL, prompt="sample", max_tokens=8, temperature=0.8, seed=123)
    assert oai.completions.create(**kw).choices[0].text == oai.completions.create(**kw).choices[0].text


def test_logprobs(oai):
    r = oai.completions.create(model=MODEL, prompt="lp", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(len(t) == 3 for t in lp.top_logprobs)
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "lp"}], max_tokens=3,
                                    temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)


def test_metrics(client, oai):
    oai.completions.create(model=MODEL, prompt="metrics", max_tokens=5, temperature=0)
    text = client.get("/metrics").text
    for name in ("dsaserve_time_to_first_token_seconds_count", "dsaserve_inter_token_latency_seconds_count",
                 "dsaserve_e2e_request_latency_seconds_count", "dsaserve_num_requests_waiting",
                 "dsaserve_num_requests_running", "dsaserve_prompt_tokens_total",
                 "dsaserve_generation_tokens_total", "dsaserve_request_success_total"):
        assert name in text, name

    def value(name):
        line = next(l for l in text.splitlines() if l.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert value("dsaserve_generation_tokens_total") >= 5
    assert value("dsaserve_time_to_first_token_seconds_count") >= 1


def _wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_streaming_client_disconnect_aborts(fake_server):
    engine = fake_server.engine
    body = {"model": MODEL, "prompt": "long one", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    old_delay, engine.step_delay = engine.step_delay, 0.02
    try:
        with httpx.Client(base_url=fake_server.base_url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                rid = json.loads(next(l for l in lines if l.startswith("data:"))[5:])["id"]
                # leaving the block closes the connection mid-stream
        assert _wait_for(lambda: rid in engine.aborted), "engine.abort_request was not called"
        assert _wait_for(lambda: not engine.has_unfinished_requests())
    finally:
        engine.step_delay = old_delay


def test_non_streaming_client_disconnect_aborts(fake_server):
    engine = fake_server.engine
    old_delay, engine.step_delay = engine.step_delay, 0.02
    n_aborted = len(engine.aborted)
    try:
        with httpx.Client(base_url=fake_server.base_url, timeout=0.5) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json={"model": MODEL, "prompt": "slow", "max_tokens": 200,
                                                "temperature": 0})
        assert _wait_for(lambda: len(engine.aborted) > n_aborted), "engine.abort_request was not called"
        assert _wait_for(lambda: not engine.has_unfinished_requests())
    finally:
        engine.step_delay = old_delay


def test_unknown_route_is_openai_style_404(client):
    r = client.get("/v1/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_inter_token_latency_is_per_sequence_with_n(client, oai):
    """With n > 1 the sequences advance in the same engine step: each gap is measured from the sequence's own
    previous token (a request-wide timestamp recorded 0 s for every sequence after the first)."""
    def itl():
        text = client.get("/metrics").text
        get = lambda name: float(next(l for l in text.splitlines() if l.startswith(name + "{")).rsplit(" ", 1)[1])
        return get("dsaserve_inter_token_latency_seconds_count"), get("dsaserve_inter_token_latency_seconds_sum")

    count0, sum0 = itl()
    r = oai.completions.create(model=MODEL, prompt="itl per sequence", max_tokens=6, n=3, temperature=0.5, seed=1,
                               extra_body={"ignore_eos": True})
    assert len(r.choices) == 3 and all(c.finish_reason == "length" for c in r.choices)
    count1, sum1 = itl()
    assert count1 - count0 == 3 * 5                       # 5 gaps for each of the 3 sequences of 6 tokens
    step_delay = 0.002                                    # conftest's FakeEngine: every step sleeps this long
    assert (sum1 - sum0) / (count1 - count0) >= 0.9 * step_delay, "some gaps were measured across sequences"
