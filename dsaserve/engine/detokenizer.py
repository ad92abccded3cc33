"""Incremental detokenization with stop strings.

Generated tokens arrive a few at a time. Decoding each token on its own is wrong for byte-level BPE (one
character can be split over several tokens, and some tokenizers change a token's text depending on its
neighbours), and decoding the whole output every step is quadratic. ``IncrementalDetokenizer`` decodes a
short sliding window of tokens instead and emits only the text that became final:

* text that ends in an incomplete UTF-8 sequence (decoded as U+FFFD) is held until the next token
  completes it (at most ``_MAX_PENDING_TOKENS`` tokens, after which the replacement character is real);
* text that could be the beginning of a stop string is held until it is known not to be one;
* when a stop string appears, the output is cut just before it and ``stopped`` is set; the caller then
  aborts the request in the engine.

Pure Python, no torch: the server and the ``LLM`` API both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

_REPLACEMENT = "\ufffd"
# A UTF-8 character is at most 4 bytes: with this many tokens pending, a trailing U+FFFD may be final.
_MAX_PENDING_TOKENS = 4
# Prompt tokens used as left context so the first generated token decodes as it would mid-text
# (e.g. SentencePiece-style tokenizers drop a leading space at the start of a decode).
_PROMPT_CONTEXT_TOKENS = 4


@dataclass
class DetokenizerOutput:
    """Result of one ``IncrementalDetokenizer.step``."""

    text: str                   # new text that is final and may be sent to the client
    stopped: bool = False       # a stop string was found; the output ends here
    stop_string: str | None = None


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas, detecting stop strings.

    ``tokenizer`` needs ``decode(ids, skip_special_tokens=...) -> str``. ``prompt_token_ids`` (optional)
    gives left context for the first tokens; its text is never emitted. Stop strings are matched against
    the generated text only (never the prompt), and only once ``min_tokens`` tokens were generated.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ) -> None:
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = list(dict.fromkeys(stop))  # de-duplicated, order kept
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._min_tokens = min_tokens   # stop strings count only once this many tokens were generated
        self._generated = 0

        self._ids: list[int] = list(prompt_token_ids)[-_PROMPT_CONTEXT_TOKENS:]
        # Window: ids[_start:] are re-decoded each step; ids[_start:_read] decode to _start_text, whose
        # text was already accounted for (context or emitted).
        self._start = 0
        self._read = len(self._ids)
        self._start_text_len = len(self._decode(self._ids[self._start:self._read]))

        self.text = ""             # generated text so far (cut at the stop string once stopped)
        self._emitted = 0          # chars of self.text already returned to the caller
        self.stopped = False
        self.stop_string: str | None = None

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special)

    def _decode_new(self, final: bool) -> str:
        """Decode the tokens after ``_read``; returns '' while they end in an incomplete character."""
        if self._read == len(self._ids):
            return ""
        window_text = self._decode(self._ids[self._start:])
        if window_text.endswith(_REPLACEMENT) and not final:
            pending = len(self._ids) - self._read
            if pending < _MAX_PENDING_TOKENS:
                return ""  # wait for the rest of the character
            # Many tokens pending and still a U+FFFD at the end: emit the longest prefix that decodes
            # cleanly (the tail may still be an incomplete character); if none does, the bytes are
            # invalid and the replacement characters are the real text.
            for k in range(pending - 1, 0, -1):
                text = self._decode(self._ids[self._start:self._read + k])
                if not text.endswith(_REPLACEMENT):
                    return self._commit(self._read + k, text)
        return self._commit(len(self._ids), window_text)

    def _commit(self, end: int, window_text: str) -> str:
        """Accept ``ids[_read:end]`` (``window_text`` = decode(ids[_start:end])); return their new text."""
        new_text = window_text[self._start_text_len:]
        # Slide the window: the tokens just decoded become the left context of the next ones.
        self._start, self._read = self._read, end
        self._start_text_len = len(self._decode(self._ids[self._start:self._read]))
        return new_text

    def _held_back(self) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def step(self, new_token_ids: Sequence[int], finished: bool = False) -> DetokenizerOutput:
        """Add generated tokens; return the text that is now final.

        ``finished=True`` (the engine ended the request) flushes everything held back. After a stop
        string was found, further calls return empty text.
        """
        if self.stopped:
            return DetokenizerOutput("", True, self.stop_string)
        self._ids.extend(int(t) for t in new_token_ids)
        self._generated += len(new_token_ids)
        new_text = self._decode_new(final=finished)
        if new_text:
            prev_len = len(self.text)
            self.text += new_text
            if self._stop and self._generated >= self._min_tokens:
                # Only a match that ends inside the new text can be new.
                search_from = max(0, prev_len - self._max_stop_len + 1)
                best: tuple[int, str] | None = None
                for s in self._stop:
                    idx = self.text.find(s, search_from)
                    if idx >= 0 and (best is None or idx < best[0]):
                        best = (idx, s)
                if best is not None:
                    self.text = self.text[: best[0]]
                    self.stopped, self.stop_string = True, best[1]
                    return DetokenizerOutput(self._flush(len(self.text)), True, best[1])
        end = len(self.text) if finished else len(self.text) - self._held_back()
        return DetokenizerOutput(self._flush(end))

    def _flush(self, end: int) -> str:
        end = max(end, self._emitted)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
