"""Request-level types shared by the engine, the ``LLM`` API and the server."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dsaserve.parallel.errors import EngineDeadError

__all__ = ["CompletionOutput", "EngineDeadError", "FinishReason", "SamplingParams", "StepOutput"]


@dataclass
class SamplingParams:
    """How to sample one request. Validated on construction; bad values raise ValueError naming the field."""

    max_tokens: int = 16
    temperature: float = 0.0        # 0 = greedy
    top_p: float = 1.0              # in (0, 1]
    top_k: int = -1                 # -1 = off
    seed: int | None = None
    logprobs: int | None = None     # return the top-k logprobs of each generated token (plus the sampled one)
    stop: list[str] = field(default_factory=list)           # stop strings (text is cut before them)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, stop token or stop string
    LENGTH = "length"    # max_tokens or the context limit
    ABORT = "abort"      # cancelled (client gone) or engine error


@dataclass
class CompletionOutput:
    """The result of one prompt, as returned by ``LLM.generate``."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class StepOutput:
    """What one engine step produced for one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
