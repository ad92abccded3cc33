"""Types shared by the chat formats and output parsers, and the streaming helpers they are built on.

Streaming model: the server feeds each request's detokenized text deltas, in order, to one
:class:`~dsaserve.server.parsers.output.ChatOutputParser`; every feed returns a :class:`ParsedDelta`
(reasoning text, answer text, finished tool calls) that maps 1:1 onto an OpenAI chat-completion chunk
``delta``. Text that might be the start of markup (``</thi`` of ``</think>``) is held back until the
next delta decides it, so markup split across any chunk boundaries is never shown as content.
Non-streaming parsing is the same machine fed the whole text at once, so both modes agree exactly.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable


class ChatFormatError(ValueError):
    """Messages or tools that a model's chat format cannot express; the message names the problem."""


def new_tool_call_id() -> str:
    """An OpenAI-style tool call id."""
    return "call_" + uuid.uuid4().hex[:24]


IdFactory = Callable[[], str]


@dataclass
class ToolCall:
    """One complete function call: ``arguments`` is a JSON object as text (the OpenAI wire shape)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """A streamed piece of tool call ``index``: the first piece carries id, type and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index}
        fn: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            d["id"] = self.id
            d["type"] = "function"
        if self.name is not None:
            fn["name"] = self.name
        d["function"] = fn
        return d


@dataclass
class ParsedDelta:
    """What one fed text delta resolved to; empty when everything was held back."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.content or self.reasoning_content or self.tool_calls)

    def to_openai_delta(self) -> dict[str, Any]:
        """The ``delta`` of a chat.completion.chunk (only the fields that have something)."""
        d: dict[str, Any] = {}
        if self.reasoning_content:
            d["reasoning_content"] = self.reasoning_content
        if self.content:
            d["content"] = self.content
        if self.tool_calls:
            d["tool_calls"] = [t.to_openai() for t in self.tool_calls]
        return d


@dataclass
class ParsedMessage:
    """A whole response split into answer, reasoning and tool calls (None when absent, as OpenAI does)."""

    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall]

    def to_openai_message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [t.to_openai() for t in self.tool_calls]
        return msg

    @property
    def finish_reason_override(self) -> str | None:
        """OpenAI reports ``tool_calls`` as the finish reason of a response that ends in calls."""
        return "tool_calls" if self.tool_calls else None


# ---- streaming helpers --------------------------------------------------------------------------------------
def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker`` (0 if none)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def emittable_prefix_len(buf: str, marker: str, hold_whitespace: bool) -> int:
    """How much of ``buf`` (which does not contain ``marker``) can be emitted now: all but a possible start
    of the marker at its end and, with ``hold_whitespace``, the whitespace right before that (whitespace
    directly before a tool-call marker is dropped, so it is decided only once the marker is ruled out)."""
    end = len(buf) - partial_marker_len(buf, marker)
    if hold_whitespace:
        while end > 0 and buf[end - 1].isspace():
            end -= 1
    return end


@dataclass(frozen=True)
class BlockStep:
    """What one look inside an open tool-call block resolved: ``buf[:end]`` of the buffer is used up.

    ``call``: a finished, well-formed call (the block opener is no longer re-emitted). ``closes``: the block
    is over. ``malformed``: ``buf[:end]`` is not markup; it becomes content, after the held-back opener,
    and the parser looks for a new block after it (a malformed step always closes the block).
    """

    end: int
    call: ToolCall | None = None
    closes: bool = False
    malformed: bool = False


class StreamingToolParser(ABC):
    """The streaming mechanics of a tool-call parser for one response; a model's parser adds its markup.

    Text outside blocks is answer content. Content is emitted as soon as it cannot be the start of
    ``block_start`` (a possible partial opener at the end of the buffer waits for the next delta), and the
    whitespace right before an opener is dropped. Inside a block, :meth:`_scan_block` (the model's part)
    reads the buffered block text one step at a time; a malformed step re-emits the opener (with the
    whitespace dropped before it) and the raw text as content. Where the cuts fall depends only on the
    text, never on how it was split into deltas, so streaming and parsing a whole response at once agree.
    """

    block_start: str  # the opener of a tool-call block (set by each model's parser)

    def __init__(self, id_factory: IdFactory = new_tool_call_id):
        self._new_id = id_factory
        self._buf = ""
        self._in_block = False
        self._opener = ""  # the block opener (and whitespace before it), re-emitted if the block is malformed

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Returns (answer content, finished tool calls) resolved by this delta."""
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Flush what was held back at the end of the response."""
        return self._drain(final=True)

    @abstractmethod
    def _scan_block(self, buf: str, final: bool) -> BlockStep | None:
        """One step of reading ``buf``, the text after the opener (or after the previous step) of an open
        block; None when it needs more text (never when ``final``: then everything must resolve)."""

    def _drain(self, final: bool) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._in_block:
                i = self._buf.find(self.block_start)
                if i < 0:
                    n = len(self._buf) if final else emittable_prefix_len(self._buf, self.block_start,
                                                                          hold_whitespace=True)
                    content.append(self._buf[:n])
                    self._buf = self._buf[n:]
                    return "".join(content), calls
                before = self._buf[:i]
                kept = before.rstrip()
                content.append(kept)
                self._opener = before[len(kept):] + self.block_start
                self._buf = self._buf[i + len(self.block_start):]
                self._in_block = True
                continue
            step = self._scan_block(self._buf, final)
            if step is None:
                return "".join(content), calls
            if step.call is not None:
                calls.append(step.call)
                self._opener = ""
            elif step.malformed:
                content.append(self._opener + self._buf[:step.end])
                self._opener = ""
            self._buf = self._buf[step.end:]
            self._in_block = not (step.closes or step.malformed)


def json_value_or_text(raw: str) -> Any:
    """``raw`` parsed as JSON when it is JSON, else the text itself."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def arguments_json(args: dict[str, Any]) -> str:
    return json.dumps(args, ensure_ascii=False)


def message_text(content: Any) -> str:
    """OpenAI message content (a string, None, or a list of {"type": "text", "text": ...} parts) as text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise ChatFormatError(f"only text content parts can be rendered, got {p!r:.80}")
        return "".join(parts)
    raise ChatFormatError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def tool_call_arguments(call: dict, where: str) -> tuple[str, dict[str, Any]]:
    """(name, arguments as a dict) of an OpenAI ``tool_calls`` entry of a request's assistant message."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}")
    raw = fn.get("arguments", {})
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise ChatFormatError(f"{where}.function.arguments is not valid JSON: {raw[:80]!r}") from None
    if not isinstance(raw, dict):
        raise ChatFormatError(f"{where}.function.arguments must be a JSON object, got {type(raw).__name__}")
    return fn["name"], raw


def tool_functions(tools: list[dict] | None) -> list[dict]:
    """The ``function`` objects of an OpenAI ``tools`` list (validated)."""
    out = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatFormatError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        out.append(fn)
    return out


THINK_START, THINK_END = "<think>", "</think>"
