"""DeepSeek-V3.2: its chat format (prompt rendering) and its tool-call markup ("DSML") parser.

DeepSeek-V3.2 publishes its chat format as a Python encoder (``encoding/encoding_dsv32.py`` in the model
repository) instead of a Jinja chat template. This module renders the same format with its own code:

* ``<｜begin▁of▁sentence｜>``, then the system text; tools are listed after it (a "## Tools" section with
  one JSON schema per line inside ``<functions>``, see TOOLS_SECTION); with tools and no system message an
  empty system message carries them.
* a user turn is ``<｜User｜>{text}<｜Assistant｜>`` followed by ``<think>`` (thinking mode, last user turn:
  the model reasons first) or ``</think>`` (otherwise: it answers directly).
* an assistant turn is ``{reasoning}</think>`` (thinking mode, only after the last user turn; earlier
  reasoning is dropped), ``{content}``, the tool calls, then ``<｜end▁of▁sentence｜>``. Tool calls are::

      \\n\\n<｜DSML｜function_calls>
      <｜DSML｜invoke name="get_weather">
      <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
      <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
      </｜DSML｜invoke>
      </｜DSML｜function_calls>

  (string parameters raw with ``string="true"``, every other value as JSON with ``string="false"``).
* tool results of one assistant turn form one block: ``\\n\\n<function_results>``, then
  ``\\n<result>{content}</result>`` per result, then ``\\n</function_results>`` and ``\\n\\n<think>`` or
  ``\\n\\n</think>`` (like a user turn, the model continues from there).
* ``developer`` messages are user turns that carry the tools and end with ``# The user's message is: ...``.

The tool parser reads the DSML block back into OpenAI tool calls; see :class:`DeepSeekV32ToolParser`.
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

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
DSML = "｜DSML｜"
BLOCK_START, BLOCK_END = f"<{DSML}function_calls>", f"</{DSML}function_calls>"
INVOKE_START, INVOKE_END = f"<{DSML}invoke", f"</{DSML}invoke>"

# The tools section the model was trained on (DeepSeek's published prompt text, reproduced as data: the model
# expects these exact words); {dsml} is the DSML token, {schemas} one JSON function schema per line.
TOOLS_SECTION = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<{dsml}function_calls>
...
</{dsml}function_calls>

<function_results>
...
</function_results>

{think_start}...thinking about results{think_end}

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""


# ---- rendering ----------------------------------------------------------------------------------------------
def render_tools_section(tools: list[dict]) -> str:
    schemas = "\n".join(json.dumps(fn, ensure_ascii=False) for fn in tool_functions(tools))
    return TOOLS_SECTION.format(dsml=DSML, schemas=schemas, think_start=THINK_START, think_end=THINK_END)


def render_tool_calls(calls: list[dict], where: str) -> str:
    invokes = []
    for j, call in enumerate(calls):
        name, args = tool_call_arguments(call, f"{where}.tool_calls[{j}]")
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}</{DSML}parameter>"
            for k, v in args.items())
        invokes.append(f'<{DSML}invoke name="{name}">\n{params}\n{INVOKE_END}')
    return f"\n\n{BLOCK_START}\n" + "\n".join(invokes) + f"\n{BLOCK_END}"


class DeepSeekV32ChatFormat:
    """Renders OpenAI messages (+ tools, thinking mode) as a DeepSeek-V3.2 prompt."""

    name = "deepseek_v32"
    default_thinking = False  # DeepSeek-V3.2 answers directly unless thinking is asked for

    def render(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool | None = None) -> str:
        thinking = self.default_thinking if thinking is None else bool(thinking)
        msgs = [dict(m) for m in messages]
        if not msgs:
            raise ChatFormatError("messages must contain at least one message")
        if tools:
            if msgs[0].get("role") == "system":
                msgs[0]["tools"] = tools
            else:
                msgs.insert(0, {"role": "system", "content": "", "tools": tools})
        last_user = max((i for i, m in enumerate(msgs) if m.get("role") in ("user", "developer")), default=-1)
        out = [BOS]
        for i, m in enumerate(msgs):
            role, where = m.get("role"), f"messages[{i}]"
            text = message_text(m.get("content"))
            if role == "system":
                out.append(text)
                if m.get("tools"):
                    out.append("\n\n" + render_tools_section(m["tools"]))
            elif role in ("user", "developer"):
                if role == "developer":
                    if not text:
                        raise ChatFormatError(f"{where}: a developer message needs content")
                    tools_part = "\n\n" + render_tools_section(m["tools"]) if m.get("tools") else ""
                    text = f"{tools_part}\n\n# The user's message is: {text}"
                out.append(USER + text + ASSISTANT + (THINK_START if thinking and i == last_user else THINK_END))
            elif role == "assistant":
                if thinking and i > last_user:
                    out.append((m.get("reasoning_content") or "") + THINK_END)
                out.append(text)
                if m.get("tool_calls"):
                    out.append(render_tool_calls(m["tool_calls"], where))
                out.append(EOS)
            elif role == "tool":
                out.append(self._tool_result(msgs, i, text, thinking and i >= last_user))
            else:
                raise ChatFormatError(f"{where}: role {role!r} cannot be rendered (use system, developer, user, "
                                      f"assistant or tool)")
        return "".join(out)

    @staticmethod
    def _tool_result(msgs: list[dict], i: int, text: str, think: bool) -> str:
        owner = i - 1
        while owner >= 0 and msgs[owner].get("role") == "tool":
            owner -= 1
        calls = msgs[owner].get("tool_calls") if owner >= 0 and msgs[owner].get("role") == "assistant" else None
        order = i - owner  # 1 for the first result of the group
        if not calls or order > len(calls):
            raise ChatFormatError(f"messages[{i}]: a tool result must follow an assistant message with at least "
                                  f"as many tool_calls as results")
        out = "\n\n<function_results>" if order == 1 else ""
        out += f"\n<result>{text}</result>"
        if order == len(calls):
            out += "\n</function_results>\n\n" + (THINK_START if think else THINK_END)
        return out


# ---- parsing ------------------------------------------------------------------------------------------------
_INVOKE_RE = re.compile(rf'<{DSML}invoke\s+name="([^"<>]+)"\s*>(.*){re.escape(INVOKE_END)}\Z', re.S)
_PARAM_RE = re.compile(rf'<{DSML}parameter\s+name="([^"<>]*)"\s+string="(true|false)"\s*>(.*?)</{DSML}parameter>',
                       re.S)


def parse_invoke(text: str, new_id: IdFactory) -> ToolCall | None:
    """One ``<｜DSML｜invoke ...>...</｜DSML｜invoke>`` as a tool call; None if it is malformed."""
    m = _INVOKE_RE.match(text)
    if m is None:
        return None
    name, body = m.group(1).strip(), m.group(2)
    args: dict[str, Any] = {}
    pos = 0
    for pm in _PARAM_RE.finditer(body):
        key, is_string, raw = pm.groups()
        if body[pos:pm.start()].strip() or key in args:
            return None
        args[key] = raw if is_string == "true" else json_value_or_text(raw)
        pos = pm.end()
    if body[pos:].strip() or not name:
        return None
    return ToolCall(new_id(), name, arguments_json(args))


class DeepSeekV32ToolParser(StreamingToolParser):
    """Incremental DSML tool-call parser for one response.

    Text before ``<｜DSML｜function_calls>`` is answer content (the whitespace right before the block is
    dropped). Inside the block each ``invoke`` becomes one tool call when its closing tag arrives (arguments
    are not streamed piecemeal: a call is emitted whole, once it is known to be well formed). Parameter
    values: ``string="true"`` as the raw text, ``string="false"`` as JSON (raw text if it is not JSON).
    Malformed markup is not an error: from the malformed point on, the raw text is answer content and the
    parser looks for a new block. A block left open at the end keeps its finished calls; an unfinished
    invoke is returned as content.
    """

    block_start = BLOCK_START

    def __init__(self, tools: list[dict] | None = None, id_factory: IdFactory = new_tool_call_id):
        super().__init__(id_factory)  # ``tools`` is not needed: DSML marks each string parameter itself

    def _scan_block(self, buf: str, final: bool) -> BlockStep | None:
        body = buf.lstrip()
        skipped = len(buf) - len(body)  # whitespace between tags
        if body.startswith(BLOCK_END):
            return BlockStep(skipped + len(BLOCK_END), closes=True)
        if body.startswith(INVOKE_START):
            j = body.find(INVOKE_END)
            if j < 0 and not final:
                return None  # the invoke is still coming
            end = j + len(INVOKE_END) if j >= 0 else len(body)
            call = parse_invoke(body[:end], self._new_id) if j >= 0 else None
            if call is not None:
                return BlockStep(skipped + end, call=call)
        elif not body:
            # At the end, a block the model never closed: keep its finished calls.
            return BlockStep(len(buf), closes=True) if final else None
        elif not final and (BLOCK_END.startswith(body) or INVOKE_START.startswith(body)):
            return None  # a tag split across deltas
        else:
            end = 1  # stray text where a tag should be
        # Malformed (or unfinished at the end): that raw text is content.
        return BlockStep(skipped + end, malformed=True)
