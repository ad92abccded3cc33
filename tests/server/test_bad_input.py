"""Bad-input battery: each case gets HTTP 400 with an OpenAI-style body naming the field, and the server
keeps serving (a good request succeeds right after each one)."""

from __future__ import annotations

import json

import pytest

MODEL = "fake-model"
C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
LONG = "x" * 300  # the fake engine's max_model_len is 256 (one token per byte)

# (name, path, body (dict, or raw str/bytes), expected param, text the message must contain)
CASES = [
    ("prompt_too_long", C, {"model": MODEL, "prompt": LONG}, "prompt", "maximum context length"),
    ("chat_too_long", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, "messages",
     "maximum context length"),
    ("prompt_plus_max_tokens_too_long", C, {"model": MODEL, "prompt": "x" * 200, "max_tokens": 100},
     "max_tokens", "max_tokens"),
    ("empty_prompt", C, {"model": MODEL, "prompt": ""}, "prompt", "empty"),
    ("empty_token_list", C, {"model": MODEL, "prompt": []}, "prompt", "empty"),
    ("empty_messages", CHAT, {"model": MODEL, "messages": []}, "messages", "at least one"),
    ("max_tokens_zero", C, {"model": MODEL, "prompt": "a", "max_tokens": 0}, "max_tokens", "at least 1"),
    ("max_tokens_negative", CHAT, {"model": MODEL, "messages": MSG, "max_tokens": -3}, "max_tokens", "at least 1"),
    ("max_completion_tokens_zero", CHAT, {"model": MODEL, "messages": MSG, "max_completion_tokens": 0},
     "max_completion_tokens", "at least 1"),
    ("temperature_negative", C, {"model": MODEL, "prompt": "a", "temperature": -0.1}, "temperature", ">= 0"),
    ("top_p_zero", C, {"model": MODEL, "prompt": "a", "top_p": 0}, "top_p", "(0, 1]"),
    ("top_p_above_one", CHAT, {"model": MODEL, "messages": MSG, "top_p": 1.5}, "top_p", "(0, 1]"),
    ("top_k_negative", C, {"model": MODEL, "prompt": "a", "top_k": -5}, "top_k", "top_k"),
    ("unknown_model", C, {"model": "gpt-4", "prompt": "a"}, "model", "does not exist"),
    ("unknown_model_chat", CHAT, {"model": "nope", "messages": MSG}, "model", "does not exist"),
    ("model_not_a_string", C, {"model": 5, "prompt": "a"}, "model", "string"),
    ("missing_prompt", C, {"model": MODEL}, "prompt", "required"),
    ("malformed_json", C, '{"model": "fake-model", "prompt": ', None, "JSON"),
    ("body_not_object", CHAT, "[1, 2, 3]", None, "JSON object"),
    ("empty_body", C, b"", None, "empty"),
    ("max_tokens_wrong_type", C, {"model": MODEL, "prompt": "a", "max_tokens": "5"}, "max_tokens", "integer"),
    ("temperature_wrong_type", CHAT, {"model": MODEL, "messages": MSG, "temperature": "hot"}, "temperature",
     "number"),
    ("prompt_wrong_type", C, {"model": MODEL, "prompt": 5}, "prompt", "wrong type"),
    ("mixed_token_list", C, {"model": MODEL, "prompt": [1, "a"]}, "prompt", "wrong type"),
    ("stream_wrong_type", C, {"model": MODEL, "prompt": "a", "stream": "yes"}, "stream", "boolean"),
    ("bad_role", CHAT, {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
     "robot"),
    ("content_wrong_type", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 7}]},
     "messages[0].content", "wrong type"),
    ("messages_not_list", CHAT, {"model": MODEL, "messages": "hi"}, "messages", "array"),
    ("token_id_out_of_vocab", C, {"model": MODEL, "prompt": [1, 2, 99999]}, "prompt", "99999"),
    ("negative_token_id", C, {"model": MODEL, "prompt": [1, -2]}, "prompt", ">= 0"),
    ("n_zero", C, {"model": MODEL, "prompt": "a", "n": 0}, "n", "between 1 and"),
    ("n_too_big", CHAT, {"model": MODEL, "messages": MSG, "n": 1000}, "n", "between 1 and"),
    ("prompts_times_n_too_many", C, {"model": MODEL, "prompt": ["a"] * 3, "n": 100}, "n", "at most"),
    ("empty_prompt_in_batch", C, {"model": MODEL, "prompt": ["a", ""]}, "prompt", "prompt 1 is empty"),
    ("best_of_not_n", C, {"model": MODEL, "prompt": "a", "n": 2, "best_of": 3}, "best_of", "equal n"),
    ("suffix", C, {"model": MODEL, "prompt": "a", "suffix": "b"}, "suffix", "not supported"),
    ("min_tokens_over_max_tokens", C, {"model": MODEL, "prompt": "a", "max_tokens": 2, "min_tokens": 5},
     "min_tokens", "larger than max_tokens"),
    ("logit_bias_key_not_an_id", C, {"model": MODEL, "prompt": "a", "logit_bias": {"abc": 1}}, "logit_bias",
     "token ids"),
    ("logit_bias_out_of_range", CHAT, {"model": MODEL, "messages": MSG, "logit_bias": {"5": 200}}, "logit_bias",
     "between -100 and 100"),
    ("logit_bias_token_out_of_vocab", C, {"model": MODEL, "prompt": "a", "logit_bias": {"99999": 1}}, "logit_bias",
     "99999"),
    ("repetition_penalty_zero", C, {"model": MODEL, "prompt": "a", "repetition_penalty": 0}, "repetition_penalty",
     "(0, 100]"),
    ("response_format_unknown", CHAT, {"model": MODEL, "messages": MSG, "response_format": {"type": "xml"}},
     "response_format.type", "json_object"),
    ("json_schema_without_schema", CHAT, {"model": MODEL, "messages": MSG,
                                          "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "schema"),
    ("two_constraints", C, {"model": MODEL, "prompt": "a", "regex": "a+", "grammar": "root ::= \"a\""}, "regex",
     "at most one"),
    ("tool_choice_required", CHAT, {"model": MODEL, "messages": MSG, "tool_choice": "required",
                                    "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice",
     "not supported"),
    ("tool_choice_without_tools", CHAT, {"model": MODEL, "messages": MSG, "tool_choice": "required"}, "tool_choice",
     "needs tools"),
    ("bad_tool_name", CHAT, {"model": MODEL, "messages": MSG, "tools": [{"type": "function",
                                                                        "function": {"name": "a b"}}]},
     "tools[0].function.name", "function names"),
    ("empty_stop_string", C, {"model": MODEL, "prompt": "a", "stop": [""]}, "stop", "non-empty"),
    ("stream_options_without_stream", C, {"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}},
     "stream_options", "stream"),
    ("logprobs_too_many", C, {"model": MODEL, "prompt": "a", "logprobs": 50}, "logprobs", "between"),
    ("top_logprobs_without_logprobs", CHAT, {"model": MODEL, "messages": MSG, "top_logprobs": 2}, "top_logprobs",
     "logprobs"),
    ("penalty_out_of_range", C, {"model": MODEL, "prompt": "a", "presence_penalty": 3.0}, "presence_penalty",
     "between -2 and 2"),
    # issue 14 item 5: JSON numbers that overflow to infinity, ids outside the vocabulary, lone surrogates
    ("temperature_1e400", C, '{"model": "fake-model", "prompt": "a", "temperature": 1e400}', "temperature",
     "finite"),
    ("temperature_infinity", CHAT, '{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], '
     '"temperature": Infinity}', "temperature", "finite"),
    ("stop_token_id_negative", C, {"model": MODEL, "prompt": "a", "stop_token_ids": [-1]}, "stop_token_ids",
     ">= 0"),
    ("stop_token_id_out_of_vocab", CHAT, {"model": MODEL, "messages": MSG, "stop_token_ids": [5, 1000000000]},
     "stop_token_ids", "1000000000"),
    ("lone_surrogate", C, '{"model": "fake-model", "prompt": "ab\\ud800cd"}', None, "lone UTF-16 surrogate"),
    ("lone_low_surrogate_in_chat", CHAT, '{"model": "fake-model", "messages": [{"role": "user", "content": '
     '"\\udc00"}]}', None, "lone UTF-16 surrogate"),
    ("body_not_utf8", C, b'{"model": "fake-model", "prompt": "\xff"}', None, "not UTF-8"),
]


@pytest.mark.parametrize("name,path,body,param,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_400_and_server_keeps_serving(client, name, path, body, param, needle):
    if isinstance(body, dict):
        r = client.post(path, json=body)
    else:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert needle.lower() in err["message"].lower(), err["message"]
    # The server still works.
    ok = client.post(C, json={"model": MODEL, "prompt": "still alive?", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert client.get("/health").status_code == 200


def test_battery_covers_at_least_12_kinds():
    assert len({c[0] for c in CASES}) >= 12


def test_openai_client_sees_bad_request(fake_server):
    openai = pytest.importorskip("openai")
    oai = openai.OpenAI(base_url=fake_server.base_url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=MODEL, prompt="a", temperature=-1)
    assert exc.value.status_code == 400 and exc.value.param == "temperature"


def test_streaming_request_rejected_before_stream_starts(client):
    r = client.post(C, json={"model": MODEL, "prompt": LONG, "stream": True})
    assert r.status_code == 400 and json.loads(r.text)["error"]["param"] == "prompt"
