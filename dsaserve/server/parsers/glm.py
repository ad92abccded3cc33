"""GLM-5 (``glm_moe_dsa``): its chat format (prompt rendering) and its tool-call markup parser.

GLM-5, like GLM-4.5 .. 4.7, publishes its chat format as a Jinja template (``chat_template.jinja`` in the
model repository); GLM-5 uses the GLM-4.7 layout, which vLLM and SGLang serve with their ``glm47`` tool
parser and ``glm45`` reasoning parser. When a checkpoint ships that template the server should render with
it (see :func:`messages_for_jinja`); :class:`GlmChatFormat` writes the same layout with its own code for
checkpoints without one (and documents it):

* ``[gMASK]<sop>``; with tools a ``<|system|>`` block: the "# Tools" instructions with one JSON tool per line
  inside ``<tools>`` (TOOLS_SECTION);
* ``<|system|>{text}``, ``<|user|>{text}``;
* ``<|assistant|>`` then ``<think>{reasoning}</think>`` (only for turns after the last user turn that have
  reasoning) or ``</think>``, the stripped content, and each call as
  ``<tool_call>{name}<arg_key>{key}</arg_key><arg_value>{value}</arg_value>...</tool_call>`` (string values
  raw, other values as JSON);
* tool results: ``<|observation|>`` once per run of results, each ``<tool_response>{text}</tool_response>``;
* the generation prompt ``<|assistant|><think>`` (thinking, the default) or ``<|assistant|></think>``.

The parser also accepts the GLM-4.5 layout (newlines between name and arguments).
"""

from __future__ import annotations

import json
import re
from typing import Any

from dsaserve.server.parsers.base import (
    THINK_END,
    THINK_START,
    BlockStep,
    ChatFormatError,
    IdFactory,
    StreamingToolParser,
    ToolCall,
    arguments_json,
    json_value_or_text,
    message_text,
    new_tool_call_id,
    tool_call_arguments,
    tool_functions,
)

PREFIX = "[gMASK]<sop>"
SYSTEM, USER, ASSISTANT, OBSERVATION = "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"

# GLM's published tool instructions (reproduced as data: the model was trained on these exact words).
TOOLS_SECTION_HEAD = ("\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                      "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_SECTION_TAIL = ("</tools>\n\nFor each function call, output the function name and arguments within the "
                      "following XML format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>"
                      "{arg-value-1}</arg_value><arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>"
                      "...</tool_call>")


# ---- rendering ----------------------------------------------------------------------------------------------
def _split_reasoning(m: dict) -> tuple[str, str]:
    """(reasoning, content) of an assistant message: ``reasoning_content`` or a ``<think>...</think>`` prefix
    of the content (as the published template reads them)."""
    content = message_text(m.get("content"))
    if isinstance(m.get("reasoning_content"), str):
        return m["reasoning_content"], content
    if THINK_END in content:
        head, _, tail = content.partition(THINK_END)
        return head.rstrip("\n").split(THINK_START)[-1].lstrip("\n"), tail.lstrip("\n")
    return "", content


class GlmChatFormat:
    """Renders OpenAI messages (+ tools, thinking mode) in the GLM-4.7 / GLM-5 layout."""

    name = "glm47"
    default_thinking = True  # GLM-5 thinks unless told not to (enable_thinking=false)

    def render(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool | None = None) -> str:
        thinking = self.default_thinking if thinking is None else bool(thinking)
        if not messages:
            raise ChatFormatError("messages must contain at least one message")
        out = [PREFIX]
        if tools:
            tool_functions(tools)  # validates the shape
            out.append(SYSTEM + TOOLS_SECTION_HEAD
                       + "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools) + TOOLS_SECTION_TAIL)
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        for i, m in enumerate(messages):
            role, where = m.get("role"), f"messages[{i}]"
            if role == "user":
                out.append(USER + message_text(m.get("content")))
            elif role in ("system", "developer"):
                out.append(SYSTEM + message_text(m.get("content")))
            elif role == "assistant":
                reasoning, content = _split_reasoning(m)
                out.append(ASSISTANT)
                out.append(f"{THINK_START}{reasoning.strip()}{THINK_END}" if i > last_user and reasoning.strip()
                           else THINK_END)
                out.append(content.strip())
                for j, call in enumerate(m.get("tool_calls") or []):
                    name, args = tool_call_arguments(call, f"{where}.tool_calls[{j}]")
                    out.append(CALL_START + name + "".join(
                        f"<arg_key>{k}</arg_key><arg_value>"
                        f"{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}</arg_value>"
                        for k, v in args.items()) + CALL_END)
            elif role == "tool":
                if i == 0 or messages[i - 1].get("role") != "tool":
                    out.append(OBSERVATION)
                out.append(f"<tool_response>{message_text(m.get('content'))}</tool_response>")
            else:
                raise ChatFormatError(f"{where}: role {role!r} cannot be rendered "
                                      f"(use system, developer, user, assistant or tool)")
        out.append(ASSISTANT + (THINK_START if thinking else THINK_END))
        return "".join(out)


def messages_for_jinja(messages: list[dict]) -> list[dict]:
    """Messages as the published GLM (and most) Jinja templates expect them: tool call ``arguments`` as a
    dict (the OpenAI wire shape is a JSON string; the templates iterate ``arguments.items()``)."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                name, args = tool_call_arguments(call, f"messages[{i}].tool_calls[{j}]")
                calls.append({**call, "function": {**call["function"], "name": name, "arguments": args}})
            m["tool_calls"] = calls
        out.append(m)
    return out


# ---- parsing ------------------------------------------------------------------------------------------------
_ARG_RE = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def _string_params(tools: list[dict] | None) -> dict[str, set[str]]:
    """Per tool name, the parameters its schema types as string (their values are kept as raw text)."""
    out: dict[str, set[str]] = {}
    for fn in tool_functions(tools):
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[fn["name"]] = {k for k, s in props.items()
                           if isinstance(s, dict) and s.get("type") in ("string", ["string"])}
    return out


def parse_glm_call(inner: str, string_params: dict[str, set[str]], new_id: IdFactory) -> ToolCall | None:
    """The text between ``<tool_call>`` and ``</tool_call>`` as a tool call; None if it is malformed."""
    cut = inner.find("<arg_key>")
    name = (inner if cut < 0 else inner[:cut]).strip()
    if not name or any(c in name for c in "<>\n"):
        return None
    strings = string_params.get(name, set())
    args: dict[str, Any] = {}
    pos = len(inner) if cut < 0 else cut
    while pos < len(inner) and inner[pos:].strip():
        m = _ARG_RE.match(inner, pos)
        if m is None:
            return None
        key, raw = m.group(1).strip(), m.group(2)
        if not key or key in args:
            return None
        # Without a schema a value that reads as JSON is JSON (the template writes non-strings as JSON).
        args[key] = raw if key in strings else json_value_or_text(raw)
        pos = m.end()
    return ToolCall(new_id(), name, arguments_json(args))


class GlmToolParser(StreamingToolParser):
    """Incremental parser of GLM ``<tool_call>...</tool_call>`` markup for one response.

    Text outside calls is answer content (whitespace right before a call is dropped); each call becomes one
    tool call when ``</tool_call>`` arrives (emitted whole). Argument values are raw text for parameters
    the request's tool schema types as string, else JSON when they parse as JSON. A malformed call is
    returned as content, raw; an unfinished call at the end of the response too.
    """

    block_start = CALL_START

    def __init__(self, tools: list[dict] | None = None, id_factory: IdFactory = new_tool_call_id):
        super().__init__(id_factory)
        self._strings = _string_params(tools)

    def _scan_block(self, buf: str, final: bool) -> BlockStep | None:
        # A GLM block is one call: it ends at the first </tool_call>.
        j = buf.find(CALL_END)
        if j < 0:
            # Unfinished at the end: the raw markup is content.
            return BlockStep(len(buf), malformed=True) if final else None
        call = parse_glm_call(buf[:j], self._strings, self._new_id)
        end = j + len(CALL_END)
        return BlockStep(end, call=call, closes=True) if call is not None else BlockStep(end, malformed=True)
