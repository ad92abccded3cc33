"""Request-level types shared by the engine, the ``LLM`` API and the server."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from dsaserve.engine.structured import GrammarSpec
from dsaserve.parallel.errors import EngineDeadError

__all__ = ["CompletionOutput", "EngineDeadError", "FinishReason", "GrammarSpec", "SamplingParams", "StepOutput"]


MAX_N = 128                     # sequences per request


@dataclass
class SamplingParams:
    """How to sample one request. Validated on construction; bad values raise ValueError naming the field.

    ``n`` sequences share one prefill of the prompt (their KV pages are forked). Processors applied to the
    logits before temperature / top-k / top-p, in order: the ``structured_output`` grammar mask,
    ``logit_bias``, the ``min_tokens`` ban of eos / stop tokens, then repetition / frequency / presence
    penalties (``runtime.logits_processors`` says exactly how). ``max_tokens=0`` computes only the prompt
    (useful with ``prompt_logprobs`` to score a text).
    """

    max_tokens: int = 16
    temperature: float = 0.0        # 0 = greedy
    top_p: float = 1.0              # in (0, 1]
    top_k: int = -1                 # -1 = off
    seed: int | None = None
    logprobs: int | None = None     # return the top-k logprobs of each generated token (plus the sampled one)
    prompt_logprobs: int | None = None   # return every prompt token's logprob (+ its position's top-k)
    stop: list[str] = field(default_factory=list)           # stop strings (text is cut before them)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1                      # independent sequences for the prompt
    min_tokens: int = 0             # eos / stop tokens / stop strings are not allowed before this many tokens
    presence_penalty: float = 0.0   # in [-2, 2]: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # in [-2, 2]: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0: divides (multiplies, if negative) the logit of tokens seen anywhere
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit, in [-100, 100]
    structured_output: GrammarSpec | None = None  # constrain the output (JSON object / schema, regex, EBNF)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop = list(self.stop)
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_tokens must be a positive integer (0 only with prompt_logprobs, to score the "
                             "prompt without generating)")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {v!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer from 1 to {MAX_N}, got {self.n!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= max(self.max_tokens, 0):
            raise ValueError(f"min_tokens must be an integer from 0 to max_tokens ({self.max_tokens}), "
                             f"got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 100:
            raise ValueError(f"repetition_penalty must be a number in (0, 100] (1 = off), got "
                             f"{self.repetition_penalty!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            for t, b in self.logit_bias.items():
                if not _is_int(t) or t < 0:
                    raise ValueError(f"logit_bias keys must be token ids >= 0, got {t!r}")
                if not _is_number(b) or not -100 <= b <= 100:
                    raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {t}")
        if self.structured_output is not None and not isinstance(self.structured_output, GrammarSpec):
            raise ValueError("structured_output must be a GrammarSpec (GrammarSpec.json_schema(...), .regex(...), "
                             f"...), got {type(self.structured_output).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class FinishReason(str, enum.Enum):
    """Why a sequence ended (the OpenAI ``finish_reason`` values; ``abort`` is this engine's own)."""

    STOP = "stop"        # EOS, stop token or stop string
    LENGTH = "length"    # max_tokens or the context limit
    ABORT = "abort"      # cancelled (client gone) or engine error


@dataclass
class CompletionOutput:
    """The result of one sequence of one prompt, as returned by ``LLM.generate`` (``index``: which of the
    prompt's ``n`` sequences)."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    index: int = 0
    # with prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class StepOutput:
    """What one engine step produced for one sequence of one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    index: int = 0                   # which of the request's n sequences
    prompt_logprobs: list[dict[int, float] | None] | None = None   # once, with the sequence's first output
