"""Reasoning ("thinking") parser: splits ``<think>reasoning</think>answer`` into reasoning and answer text.

DeepSeek-V3.2 and GLM-5 both mark reasoning with ``<think>`` / ``</think>``. In thinking mode their chat
formats end the prompt with ``<think>`` itself, so the output starts inside the reasoning and only the
``</think>`` shows up; in non-thinking mode the prompt ends with ``</think>`` (DeepSeek) or
``<|assistant|></think>`` (GLM) and the output is all answer. The parser therefore starts inside or outside
the reasoning as the rendered prompt says (``starts_in_reasoning``), and also accepts a ``<think>`` the model
writes itself at the very start. An unclosed reasoning block is all reasoning (the model was cut off while
thinking).
"""

from __future__ import annotations

from dsaserve.server.parsers.base import THINK_END, THINK_START, partial_marker_len


class ThinkReasoningParser:
    """Incremental ``<think>`` / ``</think>`` splitter for one response."""

    def __init__(self, starts_in_reasoning: bool, start_tag: str = THINK_START, end_tag: str = THINK_END):
        self.start_tag, self.end_tag = start_tag, end_tag
        self._in_reasoning = starts_in_reasoning
        self._at_start = True   # the model may still open with its own start tag
        self._done = False      # past the end tag: the rest is answer
        self._buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Returns (reasoning, answer) text resolved by this delta."""
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back at the end of the response."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning, answer = [], []
        if self._at_start:
            head = self._buf.lstrip()
            if head.startswith(self.start_tag):
                self._buf = head[len(self.start_tag):]
                self._in_reasoning, self._at_start = True, False
            elif head and not (self.start_tag.startswith(head) and not final):
                self._at_start = False
            elif not final:
                return "", ""  # only whitespace or a partial start tag so far
            else:
                self._at_start = False
        if self._done or not self._in_reasoning:
            answer.append(self._buf)
            self._buf = ""
            return "", "".join(answer)
        i = self._buf.find(self.end_tag)
        if i >= 0:
            reasoning.append(self._buf[:i])
            answer.append(self._buf[i + len(self.end_tag):])
            self._buf = ""
            self._done = True
        else:
            keep = 0 if final else partial_marker_len(self._buf, self.end_tag)
            reasoning.append(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
        return "".join(reasoning), "".join(answer)
