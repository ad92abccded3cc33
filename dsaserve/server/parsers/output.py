"""One response's output parser: reasoning first, then tool calls in the answer text."""

from __future__ import annotations

from typing import Protocol

from dsaserve.server.parsers.base import ParsedDelta, ParsedMessage, ToolCall, ToolCallDelta
from dsaserve.server.parsers.reasoning import ThinkReasoningParser


class ToolParser(Protocol):
    """A model's tool-call parser (``parsers.base``): ``feed`` answer text -> (the answer content it resolved,
    finished tool calls); ``finish`` flushes what was held back at the end of the response."""

    def feed(self, text: str) -> tuple[str, list[ToolCall]]: ...
    def finish(self) -> tuple[str, list[ToolCall]]: ...


class ChatOutputParser:
    """Splits one chat response into reasoning, answer and tool calls, streaming or at once.

    ``reasoning`` / ``tools`` may each be None (that part is not parsed). Feed the text deltas in order with
    :meth:`feed`, call :meth:`finish` once at the end; :meth:`message` is the whole parsed response. Tool
    calls are only looked for in the answer, never inside the reasoning.
    """

    def __init__(self, reasoning: ThinkReasoningParser | None = None, tools: ToolParser | None = None):
        self._reasoning = reasoning
        self._tools = tools
        self._content: list[str] = []
        self._reasoning_text: list[str] = []
        self._calls: list[ToolCall] = []
        self._finished = False

    def feed(self, text: str) -> ParsedDelta:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        reasoning, answer = self._reasoning.feed(text) if self._reasoning else ("", text)
        content, calls = self._tools.feed(answer) if self._tools else (answer, [])
        return self._record(reasoning, content, calls)

    def finish(self) -> ParsedDelta:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        reasoning, answer = self._reasoning.finish() if self._reasoning else ("", "")
        content, calls = self._tools.feed(answer) if self._tools else (answer, [])
        if self._tools:
            tail, more = self._tools.finish()
            content, calls = content + tail, calls + more
        return self._record(reasoning, content, calls)

    def _record(self, reasoning: str, content: str, calls: list[ToolCall]) -> ParsedDelta:
        base = len(self._calls)
        self._reasoning_text.append(reasoning)
        self._content.append(content)
        self._calls.extend(calls)
        return ParsedDelta(content=content, reasoning_content=reasoning,
                           tool_calls=[ToolCallDelta(base + k, c.id, c.name, c.arguments) for k, c in enumerate(calls)])

    def message(self) -> ParsedMessage:
        """The whole response parsed so far (call after :meth:`finish` for the final one)."""
        content = "".join(self._content)
        reasoning = "".join(self._reasoning_text)
        return ParsedMessage(content=content if content or not self._calls else None,
                             reasoning_content=reasoning if self._reasoning and reasoning else None,
                             tool_calls=list(self._calls))

    def parse(self, text: str) -> ParsedMessage:
        """Non-streaming: the whole response at once."""
        self.feed(text)
        self.finish()
        return self.message()
