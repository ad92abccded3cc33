"""Issue 16 acceptance: the official ``openai`` client against the real engine on a tiny checkpoint (CPU), one
server per layout (1 process, and PP2 x CP2 = 4 ranks), covering every field the issue lists.

The oracles are independent of the server: a single-process ``LLM`` given the same ``SamplingParams``
(tokens and text of every choice, seeded sampling with penalties / logit_bias / min_tokens / n), transformers'
fp32 log-softmax (echoed prompt logprobs, 1e-4, also when every CP rank scores its own tokens), ``jsonschema``
/ ``re`` (structured output), and recorded-format markup forced through the ``regex`` extension (tool calls
and reasoning parsed back into ``tool_calls`` / ``reasoning_content``, streamed and not)."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from dsaserve import LLM, SamplingParams  # noqa: E402
from dsaserve.checkpoint.tiny import make_tiny_checkpoint  # noqa: E402
from dsaserve.engine.engine import LLMEngine  # noqa: E402

from .conftest import InProcessServer  # noqa: E402

pytestmark = pytest.mark.timeout(600)

MAX_LEN = 2048                                 # the DeepSeek-V3.2 tool section is ~1K byte tokens
KV_TOKENS = 8192
TOL = 1e-4
EOS = 1                                        # the tiny checkpoint's eos id
D = "｜DSML｜"                                  # DeepSeek-V3.2's tool-call markup delimiter
# every sampling field of the issue at once; penalties and bias are strong enough to change the output
SAMPLING = dict(temperature=1.0, seed=1234, presence_penalty=0.7, frequency_penalty=0.4, logit_bias={"42": 5.0,
                                                                                                    "77": -100.0})
SAMPLING_EXTRA = dict(repetition_penalty=1.3, min_tokens=3, ignore_eos=True)
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"type": "boolean"}},
          "required": ["a", "b"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("compat") / "tiny-dsa"))


@pytest.fixture(scope="module")
def ref(tiny_dir):
    """The single-process engine: what every layout's server must return."""
    llm = LLM(tiny_dir, max_model_len=MAX_LEN, kv_cache_tokens=KV_TOKENS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[(1, 1), (2, 2)], ids=["PP1xCP1", "PP2xCP2"])
def server(request, tiny_dir):
    pp, cp = request.param
    srv = InProcessServer(LLMEngine(tiny_dir, pp_size=pp, cp_size=cp, max_model_len=MAX_LEN,
                                    kv_cache_tokens=KV_TOKENS))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=300)


def model_of(server) -> str:
    return server.server.model_name


def ref_params(n: int, max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(n=n, max_tokens=max_tokens, temperature=SAMPLING["temperature"], seed=SAMPLING["seed"],
                          presence_penalty=SAMPLING["presence_penalty"],
                          frequency_penalty=SAMPLING["frequency_penalty"],
                          logit_bias={int(k): v for k, v in SAMPLING["logit_bias"].items()}, **SAMPLING_EXTRA,
                          **extra)


def chat_prompt_ids(server, messages, **extra) -> list[int]:
    r = httpx.post(server.base_url + "/tokenize", json={"messages": messages, **extra}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def rx(text: str) -> str:
    """``text`` as a regex matching exactly it (xgrammar's syntax: escape the metacharacters, \\n for newline)."""
    return "".join("\\n" if c == "\n" else "\\" + c if c in ".^$*+?()[]{}|\\/-" else c for c in text)


# ---- completions -------------------------------------------------------------------------------------
def test_completions_batch_n_penalties_bias_logprobs(server, oai, ref):
    """prompt list x n = 2, seeded sampling with penalties, logit_bias, min_tokens, ignore_eos, stop, logprobs;
    choice index = prompt * n + sequence; each equals the single-process engine; streaming equals non-streaming."""
    prompts = ["The quick brown fox", "Once upon a time"]
    kw = dict(model=model_of(server), prompt=prompts, n=2, max_tokens=6, logprobs=2, **SAMPLING,
              extra_body=SAMPLING_EXTRA)
    r = oai.completions.create(**kw)
    tok = ref.tokenizer
    want = [ref.generate([tok.encode(p)], ref_params(2, 6, logprobs=2)) for p in prompts]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        o = want[c.index // 2][c.index % 2]
        assert c.text == o.text and c.finish_reason == o.finish_reason == "length"
        assert len(c.logprobs.tokens) == 6 and all(len(t) <= 3 for t in c.logprobs.top_logprobs)
        lps = [lp[t] for lp, t in zip(o.logprobs, o.token_ids)]
        assert max(abs(a - b) for a, b in zip(c.logprobs.token_logprobs, lps)) < TOL
        assert 77 not in o.token_ids                                    # the -100 bias bans it
    assert len({c.text for c in r.choices}) == 4
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts) and r.usage.completion_tokens == 24
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = {}
    for ch in chunks:
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in r.choices}
    assert chunks[-1].usage.completion_tokens == 24


def test_completions_echo_prompt_logprobs_scoring(server, oai, hf):
    """echo + logprobs + max_tokens = 0 (how harnesses score a prompt): the prompt's logprobs, first null, equal
    transformers' log-softmax within 1e-4 (under PP2 x CP2 each CP rank computed those of its own tokens)."""
    prompt = torch.randint(5, 480, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    r = oai.completions.create(model=model_of(server), prompt=prompt, echo=True, logprobs=3, max_tokens=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.text == httpx.post(server.base_url + "/detokenize", json={"tokens": prompt}, timeout=30).json()["prompt"]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)[:-1]     # row i predicts token i + 1
    lp = c.logprobs
    assert len(lp.tokens) == len(prompt) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    worst = max(abs(v - float(ref[i, prompt[i + 1]])) for i, v in enumerate(lp.token_logprobs[1:]))
    assert worst < TOL, f"echoed prompt logprobs differ from transformers by {worst:.2e}"
    for i, top in enumerate(lp.top_logprobs[1:]):
        # keyed by token text, so byte tokens that print alike share a key: check values, not the count
        allowed = ref[i].topk(3).values.tolist() + [float(ref[i, prompt[i + 1]])]
        assert all(min(abs(v - a) for a in allowed) < TOL for v in top.values()), (i, top, allowed)
    # echo with generated tokens: the prompt's logprobs come first, then the completion's
    r2 = oai.completions.create(model=model_of(server), prompt=prompt, echo=True, logprobs=1, max_tokens=3,
                                temperature=0, extra_body={"ignore_eos": True})
    lp2 = r2.choices[0].logprobs
    assert len(lp2.tokens) == len(prompt) + 3 and lp2.token_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(lp2.token_logprobs[1:len(prompt)], lp.token_logprobs[1:])) < TOL


def test_completions_structured_regex_grammar_json_object(server, oai):
    m = model_of(server)
    r = oai.completions.create(model=m, prompt="x", n=3, max_tokens=40, temperature=1.0, seed=5,
                               extra_body={"regex": r"(cat|dog)-[0-9]{2,4}"})
    assert all(re.fullmatch(r"(cat|dog)-[0-9]{2,4}", c.text) and c.finish_reason == "stop" for c in r.choices)
    chunks = list(oai.completions.create(model=m, prompt="x", max_tokens=40, temperature=1.0, seed=6, stream=True,
                                         extra_body={"grammar": 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c]+'}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert re.fullmatch(r"\([a-c]+(,[a-c]+)*\)", text), text
    close = httpx.post(server.base_url + "/tokenize", json={"prompt": "}", "add_special_tokens": False},
                       timeout=30).json()["tokens"]
    r = oai.completions.create(model=m, prompt="x", n=2, max_tokens=80, temperature=1.0, seed=7,
                               logit_bias={str(close[0]): 6.0}, extra_body={"response_format": {"type": "json_object"}})
    for c in r.choices:
        assert isinstance(json.loads(c.text), dict) and c.finish_reason == "stop", c.text


# ---- chat --------------------------------------------------------------------------------------------
def test_chat_n_penalties_bias_logprobs_stream(server, oai, ref):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    kw = dict(model=model_of(server), messages=messages, n=2, max_completion_tokens=5, logprobs=True, top_logprobs=2,
              stop=["\n\n\n"], **SAMPLING, extra_body=SAMPLING_EXTRA)
    r = oai.chat.completions.create(**kw)
    ids = chat_prompt_ids(server, messages)
    want = ref.generate([ids], ref_params(2, 5, logprobs=2, stop=["\n\n\n"]))
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == sum(len(o.token_ids) for o in want)
    for c in r.choices:
        o = want[c.index]
        assert c.message.content == o.text and c.finish_reason == o.finish_reason
        assert len(c.logprobs.content) == len(o.token_ids)
        for entry, t, lp in zip(c.logprobs.content, o.token_ids, o.logprobs):
            assert abs(entry.logprob - lp[t]) < TOL and len(entry.top_logprobs) == 2
    assert r.choices[0].message.content != r.choices[1].message.content
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = {}
    for ch in chunks:
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert streamed == {c.index: c.message.content for c in r.choices}
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_json_schema(server, oai):
    r = oai.chat.completions.create(
        model=model_of(server), messages=[{"role": "user", "content": "Reply in JSON"}], n=4, max_tokens=60,
        temperature=1.0, seed=11, response_format={"type": "json_schema",
                                                   "json_schema": {"name": "thing", "schema": SCHEMA}})
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CALL = (f'Checking.\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
        f'<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>\n</{D}function_calls>')


def test_chat_tools_round_trip(server, oai):
    """tools + tool_choice rendered in DeepSeek-V3.2's format; the model's call markup (forced through the regex
    extension: a random tiny model cannot choose to call) comes back as OpenAI tool_calls, streamed and not."""
    kw = dict(model=model_of(server), messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
              tool_choice="auto", max_tokens=600, temperature=1.0, seed=3, extra_body={"regex": rx(CALL)})
    r = oai.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Checking."
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    chunks = list(oai.chat.completions.create(stream=True, **kw))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    args = "".join(tc.function.arguments or "" for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or [])
    names = [tc.function.name for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []
             if tc.function.name]
    assert content == "Checking." and names == ["get_weather"] and json.loads(args) == {"city": "Paris", "days": 3}
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
    # the prompt really carries the tools (DeepSeek-V3.2's tool section names the function)
    ids = chat_prompt_ids(server, kw["messages"], tools=TOOLS)
    text = httpx.post(server.base_url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    assert "get_weather" in text and "Weather of a city" in text


def test_chat_reasoning_split(server, oai):
    """Thinking mode (chat_template_kwargs): text before </think> is reasoning_content, the rest the answer."""
    kw = dict(model=model_of(server), messages=[{"role": "user", "content": "2+2?"}], max_tokens=60,
              temperature=1.0, seed=4, extra_body={"regex": rx("Add them. 2+2=4</think>It is 4."),
                                                  "chat_template_kwargs": {"thinking": True}})
    m = oai.chat.completions.create(**kw).choices[0].message
    assert m.reasoning_content == "Add them. 2+2=4" and m.content == "It is 4."
    chunks = [ch.choices[0].delta for ch in oai.chat.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in chunks) == "Add them. 2+2=4"
    assert "".join(d.content or "" for d in chunks) == "It is 4."


# ---- other endpoints ---------------------------------------------------------------------------------
def test_tokenize_detokenize_version_models(server, oai, ref):
    base = server.base_url
    t = httpx.post(base + "/tokenize", json={"prompt": "Zoë jumped", "return_token_strs": True}, timeout=30).json()
    assert t["tokens"] == ref.tokenizer.encode("Zoë jumped") and t["count"] == len(t["tokens"])
    assert t["max_model_len"] == MAX_LEN and len(t["token_strs"]) == t["count"]
    d = httpx.post(base + "/detokenize", json={"tokens": t["tokens"][1:]}, timeout=30).json()
    assert d["prompt"] == "Zoë jumped"
    import dsaserve

    assert httpx.get(base + "/version", timeout=30).json() == {"version": dsaserve.__version__}
    (m,) = oai.models.list().data
    assert m.id == model_of(server) and m.model_extra["max_model_len"] == MAX_LEN
