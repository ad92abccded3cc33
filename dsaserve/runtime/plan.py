"""The step plan: the small, picklable description of one engine step that rank 0 sends to every rank.

It names tokens, positions and KV pages for the *whole* step; each rank derives its own CP shard from it,
so no per-rank data is ever sent separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampleSpec:
    """How to pick the next token of one request (filled by the scheduler from its SamplingParams)."""

    temperature: float
    top_p: float
    top_k: int
    seed: int                 # per-request seed; the draw for output token n uses (seed, n): stateless
    output_index: int         # n: index of the token being sampled among the request's outputs
    logprobs: int | None


@dataclass
class PlanEntry:
    """One request's part of a step: a prefill chunk or one decode token."""

    req_id: int
    token_ids: list[int]
    start_pos: int            # position of token_ids[0]
    block_table: list[int]    # KV page ids covering positions 0 .. start_pos + len(token_ids) - 1
    sample: SampleSpec | None = None  # set when this step yields the request's next token

    @property
    def seq_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class StepPlan:
    step_id: int
    is_decode: bool
    entries: list[PlanEntry] = field(default_factory=list)
    cp_split: str = "round-robin"   # how prefill tokens are split over CP ranks (decode: replicated)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.token_ids) for e in self.entries)


@dataclass
class SampledToken:
    """A sampled token (and its logprobs when asked) for one plan entry, sent back to rank 0."""

    req_id: int
    token_id: int
    logprobs: dict[int, float] | None = None
