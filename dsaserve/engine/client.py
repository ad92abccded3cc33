"""``EngineClient``: what a front end (the OpenAI server's engine thread) needs from an engine.

``LLMEngine`` is the implementation; the server tests drive a fake with the same interface. Every method
is called from one thread (the engine is single-threaded), except ``liveness_problem``. An engine may
also have ``is_ready()`` (False while it warms up): the server answers 503 until it returns True.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from dsaserve.engine.types import SamplingParams, StepOutput
from dsaserve.tokenizer import Tokenizer


@runtime_checkable
class EngineClient(Protocol):
    """The engine interface the OpenAI server drives (see the module docstring); ``LLMEngine`` implements it."""

    tokenizer: Tokenizer | None      # None: requests carry token ids and outputs have no text
    model_name: str                  # what clients send as "model"
    max_model_len: int               # prompt + generated tokens
    vocab_size: int                  # the model's: token ids (prompt, stop_token_ids) must be in [0, vocab_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; ValueError naming the problem for bad input (the request is then not queued)."""
        ...

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (no-op for unknown or finished ones); ``index``: only that one of its n sequences
        (only called so for requests with n > 1)."""
        ...

    def step(self) -> list[StepOutput]:
        """Run what can run; return the token deltas of the step that finished (EngineDeadError when dead)."""
        ...

    def has_unfinished_requests(self) -> bool:
        ...

    def num_waiting(self) -> int:
        ...

    def num_running(self) -> int:
        ...

    def is_healthy(self) -> bool:
        ...

    def liveness_problem(self, step_timeout_s: float | None = None) -> str | None:
        """Thread-safe, called by the server's watchdog while ``step()`` may be running: why the engine
        cannot make progress (a rank stopped sending heartbeats or is stuck in a step), or None."""
        ...

    def shutdown(self) -> None:
        """Stop the workers; idempotent."""
        ...
