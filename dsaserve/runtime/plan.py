"""The step plan: the small, picklable description of one engine step that rank 0 sends to every rank.

It names tokens, positions and KV pages for the *whole* step; each rank derives its own CP shard from it,
so no per-rank data is ever sent separately. Besides the forward it carries the little state changes every
rank applies in plan order: KV pages to copy (a fork of ``n`` > 1 sequences) and rows of the last stage's
token-count table to copy (the same fork, for penalties).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


FED_TOKEN = -1   # a decode entry's token id when it is the one the step named by ``StepPlan.fed_from`` samples


@dataclass
class SampleSpec:
    """How to pick the next token of one request (filled by the scheduler from its SamplingParams).

    The processor fields are applied to the raw logits in this order, before temperature / top-k / top-p:
    grammar bitmask, ``logit_bias``, ``banned_token_ids``, penalties (``runtime.logits_processors``).
    """

    temperature: float
    top_p: float
    top_k: int
    seed: int                 # per-request seed; the draw for output token n uses (seed, n): stateless
    output_index: int         # n: index of the token being sampled among the request's outputs
    logprobs: int | None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    counts_slot: int = -1     # row of the last stage's TokenCounts the penalties read (-1: no penalties)
    logit_bias: tuple[tuple[int, float], ...] = ()       # (token id, added to its logit)
    banned_token_ids: tuple[int, ...] = ()               # -inf (min_tokens not reached: eos and stop ids)
    allowed_bitmask: torch.Tensor | None = None          # [ceil(V / 32)] int32 grammar mask (bit set = allowed)

    @property
    def has_penalties(self) -> bool:
        return self.counts_slot >= 0


@dataclass
class CountsRef:
    """Where a plan entry's tokens are recorded in the last stage's token-count table (penalties)."""

    slot: int
    prompt_len: int           # positions below are prompt tokens, the others output tokens


@dataclass
class PlanEntry:
    """One request's part of a step: a prefill chunk or one decode token."""

    req_id: int
    token_ids: list[int]
    start_pos: int            # position of token_ids[0]
    block_table: list[int]    # KV page ids covering positions 0 .. start_pos + len(token_ids) - 1
    sample: SampleSpec | None = None  # set when this step yields the request's next token
    # n > 1: more requests sampled from the same last row (their KV is forked from this one): (req id, spec)
    forks: list[tuple[int, SampleSpec]] = field(default_factory=list)
    counts: CountsRef | None = None   # record these tokens for penalties (start_pos 0 resets the row)
    prompt_logprobs: int | None = None  # return every prompt token's logprob (+ top n) computed in this chunk
    next_token_id: int | None = None    # with prompt_logprobs: the prompt token after this chunk (None: none)

    @property
    def seq_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class StepPlan:
    """One engine step, the same on every rank: its entries (one per request) and the copies to apply first."""

    step_id: int
    is_decode: bool
    entries: list[PlanEntry] = field(default_factory=list)
    cp_split: str = "round-robin"   # how prefill tokens are split over CP ranks (decode: replicated)
    # applied by every rank before this step's forward, in order: KV page src -> dst (forked sequences)
    page_copies: list[tuple[int, int]] = field(default_factory=list)
    # applied by last-stage ranks before recording this step's tokens: token-count row src -> dst
    counts_copies: list[tuple[int, int]] = field(default_factory=list)
    # a decode step queued before the step it follows has returned its tokens (one process only): entries whose
    # token id is FED_TOKEN take the token that step ``fed_from`` sampled for the same request, on the device
    fed_from: int | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(e.token_ids) for e in self.entries)


@dataclass
class SampledToken:
    """A sampled token (and its logprobs when asked) for one plan entry, sent back to rank 0."""

    req_id: int
    token_id: int
    logprobs: dict[int, float] | None = None


@dataclass
class PromptLogprobs:
    """Logprobs of prompt tokens computed on one rank: ``logprobs[i]`` is for the token at ``positions[i]``
    (its own id and the top n of that position). Rank 0 merges the parts of every rank and chunk."""

    req_id: int
    positions: list[int]
    logprobs: list[dict[int, float]]


StepItem = SampledToken | PromptLogprobs   # what a step returns to rank 0
