"""Chat formats and output parsers of DeepSeek-V3.2 and GLM-5 (dsaserve/server/parsers): recorded outputs in
each model's markup parsed whole and streamed split at every point, malformed markup kept as content, the
rendering of tools / tool calls / tool results / thinking, and the render -> parse round trip."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from dsaserve.server.parsers import (
    ChatFormatError,
    DeepSeekV32ChatFormat,
    GlmChatFormat,
    ParsedDelta,
    make_output_parser,
    messages_for_jinja,
    resolve,
    thinking_from_request,
)
from dsaserve.server.parsers.base import partial_marker_len
from dsaserve.server.parsers.deepseek_v32 import render_tools_section

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Web search",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "filters": {"type": "object"}}}}},
    {"type": "function", "function": {"name": "list_files", "parameters": {"type": "object", "properties": {}}}},
]

D = "｜DSML｜"


def dsml_param(k, v, s):
    return f'<{D}parameter name="{k}" string="{s}">{v}</{D}parameter>'


DS_CALLS = (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n' + dsml_param("city", "Zürich", "true") + "\n"
            + dsml_param("days", "3", "false") + f'\n</{D}invoke>\n<{D}invoke name="search">\n'
            + dsml_param("q", 'rain "alerts" <today>', "true") + "\n"
            + dsml_param("filters", '{"lang": ["de", "en"], "safe": true}', "false")
            + f"\n</{D}invoke>\n</{D}function_calls>")
WEATHER = ("get_weather", {"city": "Zürich", "days": 3})
SEARCH = ("search", {"q": 'rain "alerts" <today>', "filters": {"lang": ["de", "en"], "safe": True}})

# (name, parser names, prompt's end, output text, expected (reasoning, content, [(tool, args)]))
SAMPLES = [
    ("ds_think_calls", "deepseek_v32", "<think>",
     "The user wants a 3-day forecast.\nCall get_weather.</think>Let me check the forecast." + DS_CALLS,
     ("The user wants a 3-day forecast.\nCall get_weather.", "Let me check the forecast.", [WEATHER, SEARCH])),
    ("ds_chat_answer", "deepseek_v32", "</think>", "Paris is the capital of France.  \n",
     (None, "Paris is the capital of France.  \n", [])),
    ("ds_calls_only", "deepseek_v32", "</think>", DS_CALLS.lstrip("\n"), (None, None, [WEATHER, SEARCH])),
    ("ds_think_answer", "deepseek_v32", "<think>", "Simple fact: 2+2=4 </think>The answer is 4.",
     ("Simple fact: 2+2=4 ", "The answer is 4.", [])),
    ("ds_unclosed_think", "deepseek_v32", "<think>", "Still thinking about </thi", ("Still thinking about </thi", "", [])),
    ("ds_model_opens_think", "deepseek_v32", "</think>", "\n<think>hmm</think>ok", ("hmm", "ok", [])),
    ("ds_empty_args", "deepseek_v32", "</think>",
     f'Listing.\n\n<{D}function_calls>\n<{D}invoke name="list_files">\n\n</{D}invoke>\n</{D}function_calls>',
     (None, "Listing.", [("list_files", {})])),
    ("glm_think_calls", "glm47", "<think>",
     "User asks for weather.</think>I'll look that up.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Zürich"
     "</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call><tool_call>search<arg_key>q</arg_key>"
     "<arg_value>123</arg_value><arg_key>filters</arg_key><arg_value>{\"lang\": [\"de\", \"en\"], \"safe\": true}"
     "</arg_value></tool_call>",
     ("User asks for weather.", "I'll look that up.",
      [WEATHER, ("search", {"q": "123", "filters": {"lang": ["de", "en"], "safe": True}})])),
    ("glm45_layout", "glm45", "</think>",
     "Checking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>New York</arg_value>\n</tool_call>\n"
     "<tool_call>list_files</tool_call>",
     (None, "Checking.", [("get_weather", {"city": "New York"}), ("list_files", {})])),
    ("glm_no_think_answer", "glm47", "</think>", "Sure: a < b and c > d, <not a tag>.",
     (None, "Sure: a < b and c > d, <not a tag>.", [])),
    ("glm_text_after_call", "glm47", "<think>", "r</think><tool_call>list_files</tool_call> done",
     ("r", " done", [("list_files", {})])),
]

# Malformed markup: kept as content, never an exception.
MALFORMED = [
    ("ds_bad_param", "deepseek_v32",
     f'Hi\n\n<{D}function_calls>\n<{D}invoke name="search">\n<{D}parameter name="q">x</{D}parameter>\n</{D}invoke>\n'
     f"</{D}function_calls>", None),
    ("ds_duplicate_param", "deepseek_v32",
     f'<{D}function_calls>\n<{D}invoke name="search">\n' + dsml_param("q", "a", "true") + dsml_param("q", "b", "true")
     + f"\n</{D}invoke>\n</{D}function_calls>", None),
    ("ds_stray_text", "deepseek_v32", f"<{D}function_calls>\nI will now call\n</{D}function_calls>", None),
    ("ds_unfinished_invoke", "deepseek_v32",
     f'x\n\n<{D}function_calls>\n<{D}invoke name="search">\n' + dsml_param("q", "cut o", "true"), None),
    ("glm_no_name", "glm47", "a<tool_call><arg_key>x</arg_key><arg_value>1</arg_value></tool_call>b", None),
    ("glm_junk_args", "glm47", "<tool_call>f<arg_key>a</arg_key>oops</tool_call>", None),
    ("glm_unfinished", "glm47", "Text <tool_call>get_weather<arg_key>city</arg", None),
]


def counter_ids():
    n = itertools.count(1)
    return lambda: f"call_{next(n)}"


def parser(tool_parser, prompt_end, tools=TOOLS):
    reasoning = {"deepseek_v32": "deepseek_v32", "glm47": "glm45", "glm45": "glm45"}[tool_parser]
    return make_output_parser(tool_parser, reasoning, prompt="..." + prompt_end, tools=tools, id_factory=counter_ids())


def as_tuple(msg):
    return (msg.reasoning_content, msg.content, [(c.name, json.loads(c.arguments)) for c in msg.tool_calls])


def stream(p, pieces):
    """Feed pieces, return (reasoning, content, [(id, name, arguments)]) joined from the deltas."""
    deltas = [p.feed(x) for x in pieces] + [p.finish()]
    calls = [(t.id, t.name, t.arguments) for d in deltas for t in d.tool_calls]
    assert [t.index for d in deltas for t in d.tool_calls] == list(range(len(calls)))
    return "".join(d.reasoning_content for d in deltas), "".join(d.content for d in deltas), calls


def whole(p):
    m = p.message()
    return m.reasoning_content or "", m.content or "", [(c.id, c.name, c.arguments) for c in m.tool_calls]


@pytest.mark.parametrize("name,tp,prompt_end,text,expected", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_recorded_output_parses(name, tp, prompt_end, text, expected):
    msg = parser(tp, prompt_end).parse(text)
    assert as_tuple(msg) == expected
    assert [c.id for c in msg.tool_calls] == [f"call_{i + 1}" for i in range(len(msg.tool_calls))]
    out = msg.to_openai_message()
    assert out["role"] == "assistant" and msg.finish_reason_override == ("tool_calls" if expected[2] else None)
    for call in out.get("tool_calls", []):
        assert call["type"] == "function" and isinstance(call["function"]["arguments"], str)


@pytest.mark.parametrize("name,tp,prompt_end,text,expected", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_streaming_equals_whole_at_every_split(name, tp, prompt_end, text, expected):
    ref = parser(tp, prompt_end)
    ref.parse(text)
    want = whole(ref)
    for k in range(len(text) + 1):  # every two-piece split, empty pieces included
        assert stream(parser(tp, prompt_end), [text[:k], text[k:]]) == want, f"split at {k}: {text[:k]!r}|"
    assert stream(parser(tp, prompt_end), list(text)) == want  # one character at a time
    rng = random.Random(len(text))
    for _ in range(30):  # random multi-piece splits
        cuts = sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream(parser(tp, prompt_end), pieces) == want, pieces


@pytest.mark.parametrize("name,tp,text,_", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_markup_is_content(name, tp, text, _):
    msg = parser(tp, "</think>").parse(text)
    assert msg.tool_calls == [] and msg.content == text
    for k in range(len(text) + 1):
        assert stream(parser(tp, "</think>"), [text[:k], text[k:]]) == ("", text, []), k


def test_valid_call_after_a_malformed_one_is_still_parsed():
    bad = f'<{D}function_calls>\n<{D}invoke name="x">\nnot a parameter\n</{D}invoke>'
    good = f'\n\n<{D}function_calls>\n<{D}invoke name="list_files">\n</{D}invoke>\n</{D}function_calls>'
    text = bad + " then" + good
    msg = parser("deepseek_v32", "</think>").parse(text)
    assert [c.name for c in msg.tool_calls] == ["list_files"] and msg.content == bad + " then"
    assert stream(parser("deepseek_v32", "</think>"), list(text)) == whole(parser_parsed("deepseek_v32", text))
    glm = "<tool_call>f<arg_key>a</arg_key>x</tool_call> and <tool_call>list_files</tool_call>"
    msg = parser("glm47", "</think>").parse(glm)
    assert [c.name for c in msg.tool_calls] == ["list_files"]
    assert msg.content == "<tool_call>f<arg_key>a</arg_key>x</tool_call> and"


def parser_parsed(tp, text):
    p = parser(tp, "</think>")
    p.parse(text)
    return p


def test_dsml_value_typing_and_unclosed_block():
    text = (f'<{D}function_calls>\n<{D}invoke name="search">\n' + dsml_param("q", "42", "true") + "\n"
            + dsml_param("filters", "not json", "false") + f"\n</{D}invoke>\n")  # block never closed (cut off)
    msg = parser("deepseek_v32", "</think>").parse(text)
    assert [json.loads(c.arguments) for c in msg.tool_calls] == [{"q": "42", "filters": "not json"}]


def test_glm_values_follow_the_tool_schema():
    text = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>1984</arg_value>"
            "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>")
    call = parser("glm47", "</think>").parse(text).tool_calls[0]
    assert json.loads(call.arguments) == {"city": "1984", "days": 2}  # city is a string in the schema
    call = parser("glm47", "</think>", tools=[{"type": "function", "function": {"name": "get_weather"}}]).parse(text).tool_calls[0]
    assert json.loads(call.arguments) == {"city": 1984, "days": 2}  # no schema: JSON-looking values are JSON


def test_without_tools_markup_stays_content_and_no_reasoning_parser():
    p = make_output_parser("deepseek_v32", None, prompt="x</think>", tools=None)
    msg = p.parse("a</think>b" + DS_CALLS)
    assert msg.content == "a</think>b" + DS_CALLS and msg.reasoning_content is None and not msg.tool_calls


def test_parsed_delta_to_openai():
    p = parser("glm47", "<think>")
    d = p.feed("reason</think>ans<tool_call>list_files</tool_call>")
    assert d.to_openai_delta() == {
        "reasoning_content": "reason", "content": "ans",
        "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                        "function": {"name": "list_files", "arguments": "{}"}}]}
    assert ParsedDelta().is_empty() and ParsedDelta().to_openai_delta() == {}
    p.finish()
    with pytest.raises(RuntimeError):
        p.feed("more")


def test_partial_marker_len():
    assert partial_marker_len("abc</thi", "</think>") == 5
    assert partial_marker_len("abc<", "</think>") == 1
    assert partial_marker_len("abc", "</think>") == 0
    assert partial_marker_len("</think>", "</think>") == 0  # a whole marker is not a partial one


# ---- rendering ------------------------------------------------------------------------------------------------
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": json.dumps({"city": "Zürich", "days": 3})}},
         {"id": "call_2", "type": "function", "function": {"name": "search", "arguments": {"q": "rain"}}}]
TOOL_ROUND = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "Checking.", "reasoning_content": "Use tools.", "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "none"},
]


def test_deepseek_renders_tools_calls_results_and_thinking():
    fmt = DeepSeekV32ChatFormat()
    section = render_tools_section(TOOLS)
    assert section.startswith("## Tools\n\nYou have access to a set of tools")
    assert '\n<functions>\n{"name": "get_weather", "description": "Weather of a city", "parameters": ' in section
    assert section.endswith('{"name": "list_files", "parameters": {"type": "object", "properties": {}}}\n</functions>\n')
    calls = (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n' + dsml_param("city", "Zürich", "true") + "\n"
             + dsml_param("days", "3", "false") + f'\n</{D}invoke>\n<{D}invoke name="search">\n'
             + dsml_param("q", "rain", "true") + f"\n</{D}invoke>\n</{D}function_calls>")
    turns = ("<｜User｜>Weather in Zürich?<｜Assistant｜>{think}{reasoning}Checking." + calls + "<｜end▁of▁sentence｜>"
             "\n\n<function_results>\n<result>{{\"temp\": 21}}</result>\n<result>none</result>\n</function_results>\n\n{after}")
    assert fmt.render(TOOL_ROUND, TOOLS, thinking=True) == (
        "<｜begin▁of▁sentence｜>Be brief.\n\n" + section
        + turns.format(think="<think>", reasoning="Use tools.</think>", after="<think>"))
    # chat mode (the default): no reasoning rendered, every turn opened with </think>
    assert fmt.render(TOOL_ROUND, TOOLS) == ("<｜begin▁of▁sentence｜>Be brief.\n\n" + section
                                             + turns.format(think="</think>", reasoning="", after="</think>"))
    # tools without a system message: an empty one carries them; earlier reasoning is dropped
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "old"},
            {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]}]
    assert fmt.render(msgs, TOOLS[:1], thinking=True) == (
        "<｜begin▁of▁sentence｜>\n\n" + render_tools_section(TOOLS[:1]) + "<｜User｜>a<｜Assistant｜></think>b"
        "<｜end▁of▁sentence｜><｜User｜>cd<｜Assistant｜><think>")


def test_glm_renders_tools_calls_results_and_thinking():
    fmt = GlmChatFormat()
    tools_block = ("<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                   "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                   + "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in TOOLS) + "</tools>\n\n"
                   "For each function call, output the function name and arguments within the following XML format:\n"
                   "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
                   "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>")
    body = ("<|system|>Be brief.<|user|>Weather in Zürich?<|assistant|><think>Use tools.</think>Checking."
            "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Zürich</arg_value><arg_key>days</arg_key>"
            "<arg_value>3</arg_value></tool_call><tool_call>search<arg_key>q</arg_key><arg_value>rain</arg_value>"
            "</tool_call><|observation|><tool_response>{\"temp\": 21}</tool_response><tool_response>none"
            "</tool_response><|assistant|>")
    assert fmt.render(TOOL_ROUND, TOOLS) == "[gMASK]<sop>" + tools_block + body + "<think>"
    assert fmt.render(TOOL_ROUND, TOOLS, thinking=False) == "[gMASK]<sop>" + tools_block + body + "</think>"
    # reasoning before the last user turn is cleared; a <think> prefix in content is read as reasoning
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>old</think>\nb"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>new</think>\n d "}]
    assert fmt.render(msgs) == ("[gMASK]<sop><|user|>a<|assistant|></think>b<|user|>c<|assistant|><think>new</think>d"
                                "<|assistant|><think>")


def test_messages_for_jinja_turns_arguments_into_dicts():
    out = messages_for_jinja(TOOL_ROUND)
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Zürich", "days": 3}
    assert out[2]["tool_calls"][0]["id"] == "call_1"
    assert TOOL_ROUND[2]["tool_calls"][0]["function"]["arguments"] == json.dumps({"city": "Zürich", "days": 3})


@pytest.mark.parametrize("fmt", [DeepSeekV32ChatFormat(), GlmChatFormat()], ids=["deepseek_v32", "glm47"])
def test_render_errors_name_the_problem(fmt):
    with pytest.raises(ChatFormatError, match=r"messages\[1\].tool_calls\[0\].function.arguments is not valid JSON"):
        fmt.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}])
    with pytest.raises(ChatFormatError, match="tools\\[0\\]"):
        fmt.render([{"role": "user", "content": "a"}], tools=[{"type": "function"}])
    with pytest.raises(ChatFormatError, match="role 'robot'"):
        fmt.render([{"role": "robot", "content": "a"}])
    with pytest.raises(ChatFormatError, match="only text content parts"):
        fmt.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_deepseek_tool_result_needs_a_call():
    with pytest.raises(ChatFormatError, match=r"messages\[1\]: a tool result must follow"):
        DeepSeekV32ChatFormat().render([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}])


@pytest.mark.parametrize("fmt,tp", [(DeepSeekV32ChatFormat(), "deepseek_v32"), (GlmChatFormat(), "glm47")],
                         ids=["deepseek_v32", "glm47"])
def test_render_then_parse_round_trip(fmt, tp):
    """What the format writes for an assistant turn is what the parser reads back from the model."""
    user = [{"role": "user", "content": "Weather in Zürich?"}]
    prompt = fmt.render(user, TOOLS, thinking=True)
    assistant = {"role": "assistant", "content": "Checking.", "reasoning_content": "Use tools.", "tool_calls": CALLS}
    full = fmt.render(user + [assistant], TOOLS, thinking=True)
    assert full.startswith(prompt)
    # the assistant turn as the model would write it: up to DeepSeek's eos / GLM's next generation prompt
    output = full[len(prompt):].removesuffix("<｜end▁of▁sentence｜>").removesuffix("<|assistant|><think>")
    msg = make_output_parser(tp, resolve("deepseek_v32" if tp == "deepseek_v32" else "glm_moe_dsa")[1],
                             prompt=prompt, tools=TOOLS).parse(output)
    assert msg.reasoning_content == "Use tools." and msg.content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Zürich", "days": 3}), ("search", {"q": "rain"})]


# ---- registry ---------------------------------------------------------------------------------------------------
def test_registry_defaults_and_names():
    assert resolve("deepseek_v32") == ("deepseek_v32", "deepseek_v32", "deepseek_v32")
    assert resolve("glm_moe_dsa") == ("glm47", "glm45", "glm47")
    assert resolve("llama") == (None, None, None)
    assert resolve("glm_moe_dsa", tool_call_parser="none", reasoning_parser="deepseek_v32") == (None, "deepseek_v32", "glm47")
    with pytest.raises(ValueError, match="unknown --tool-call-parser 'hermes': choose one of deepseek_v32, glm45, glm47"):
        resolve("deepseek_v32", tool_call_parser="hermes")
    with pytest.raises(ValueError, match="--reasoning-parser"):
        resolve("deepseek_v32", reasoning_parser="qwen3")
    assert thinking_from_request({"thinking": True}) is True
    assert thinking_from_request({"enable_thinking": False}) is False
    assert thinking_from_request(None) is None
