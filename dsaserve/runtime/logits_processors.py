"""The per-request logits processors: grammar bitmask, logit_bias, banned tokens (min_tokens), penalties.

Each is a factory ``(specs, ctx) -> processor | None`` registered in ``runtime.sampler.LOGITS_PROCESSORS``
(None when no row of the step uses it), applied to the step's raw logits [m, V] fp32 in this order:

1. grammar bitmask: tokens whose bit is clear -> -inf (``SampleSpec.allowed_bitmask``, built by rank 0's
   grammar matcher and shipped in the plan);
2. ``logit_bias``: logit[t] += bias (OpenAI's -100..100);
3. ``banned_token_ids``: -inf (eos and stop ids while ``min_tokens`` is not reached);
4. penalties, from the request's token counts (``TokenCounts``): the repetition penalty r divides positive
   and multiplies negative logits of every token seen in the prompt or the output; then
   logit[t] -= frequency * count[t] + presence * (count[t] > 0) over output tokens.

Nothing here reads device values on the host: the variable-length data (bias pairs, banned pairs, masks)
goes host -> device (pinned, non-blocking on CUDA), the per-row scalars come with ``SamplingTensors``
(staged with the rest of a decode step's inputs), and the counts live on the device.

``TokenCounts`` is the only state: per request *slot* (given by rank 0's scheduler), how often each token
occurred in the output and whether it occurred in the prompt. Every last-stage rank keeps the same table
because it is a pure function of the plan stream: an entry starting at position 0 resets its slot, its
tokens are added (prompt positions to the prompt row, later ones to the output counts), a decode entry's
one token is the previous step's sample, and a fork of ``n`` > 1 sequences copies the parent's row
(``StepPlan.counts_copies``). So whichever CP rank samples a request next has its history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsaserve.runtime.plan import SampleSpec, StepPlan

BITS_PER_WORD = 32


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a host sync (pinned + non-blocking on CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, allowed_vocab: int | None = None) -> torch.Tensor:
    """Set disallowed logits to -inf, in place; returns ``logits``.

    logits: [rows, V] float (any device); bitmask: [rows, W] int32 (moved to the logits' device).
    Token ``i`` is allowed iff bit ``i % 32`` of ``bitmask[:, i // 32]`` is set, ``i < 32 * W`` and
    ``i < allowed_vocab`` (default V). Plain PyTorch: one gather + shifts, no host sync.
    """
    if logits.dim() != 2 or bitmask.dim() != 2 or logits.shape[0] != bitmask.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and bitmask {tuple(bitmask.shape)} must be [rows, V] "
                         f"and [rows, W] with the same number of rows")
    if bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask must be int32, got {bitmask.dtype}")
    vocab = logits.shape[1]
    words = bitmask.shape[1]
    ids = torch.arange(vocab, device=logits.device)                        # [V]
    word_idx = torch.clamp(ids // BITS_PER_WORD, max=words - 1)            # [V]
    mask = bitmask.to(logits.device, non_blocking=True)
    bits = (mask[:, word_idx] >> (ids % BITS_PER_WORD).to(torch.int32)) & 1  # [rows, V]
    limit = min(vocab, words * BITS_PER_WORD, vocab if allowed_vocab is None else allowed_vocab)
    allowed = (bits != 0) & (ids < limit)
    return logits.masked_fill_(~allowed, float("-inf"))


# ---- the token counts behind the penalties ---------------------------------------------------------------
class TokenCounts:
    """Per-slot token history on one last-stage rank: output counts [slots, V] int32, prompt presence
    [slots, V] bool. Row ``capacity`` is a sink that padding rows of a static decode step write to."""

    def __init__(self, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.capacity = 0
        self.output = torch.zeros(1, vocab, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(1, vocab, dtype=torch.bool, device=device)

    @property
    def sink(self) -> int:
        return self.capacity

    def ensure(self, slots: int) -> None:
        """Room for slot ids < ``slots`` (grows by doubling; existing rows are kept)."""
        if slots <= self.capacity:
            return
        cap = max(slots, 2 * self.capacity, 8)
        output = torch.zeros(cap + 1, self.vocab, dtype=torch.int32, device=self.device)
        prompt = torch.zeros(cap + 1, self.vocab, dtype=torch.bool, device=self.device)
        output[:self.capacity] = self.output[:self.capacity]
        prompt[:self.capacity] = self.prompt[:self.capacity]
        self.output, self.prompt, self.capacity = output, prompt, cap

    def apply_plan(self, plan: StepPlan, record_entries: bool = True) -> None:
        """The plan's row copies, then (``record_entries``) its entries' resets and tokens. A static decode
        step records its tokens with ``record_decode`` instead (from the staged device inputs)."""
        slots = [s for pair in plan.counts_copies for s in pair]
        slots += [e.counts.slot for e in plan.entries if e.counts is not None]
        slots += [s.counts_slot for e in plan.entries for s in _specs_of(e) if s.has_penalties]
        if not slots:
            return
        self.ensure(max(slots) + 1)
        if plan.counts_copies:
            src = to_device(torch.tensor([a for a, _ in plan.counts_copies]), self.device)
            dst = to_device(torch.tensor([b for _, b in plan.counts_copies]), self.device)
            self.output[dst] = self.output[src]
            self.prompt[dst] = self.prompt[src]
        if not record_entries:
            return
        resets, p_rows, p_toks, o_rows, o_toks = [], [], [], [], []
        for e in plan.entries:
            if e.counts is None:
                continue
            slot, plen = e.counts.slot, e.counts.prompt_len
            if e.start_pos == 0:
                resets.append(slot)
            n_prompt = max(0, min(len(e.token_ids), plen - e.start_pos))
            p_toks += e.token_ids[:n_prompt]
            p_rows += [slot] * n_prompt
            o_toks += e.token_ids[n_prompt:]
            o_rows += [slot] * (len(e.token_ids) - n_prompt)
        if resets:
            r = to_device(torch.tensor(resets), self.device)
            self.output[r] = 0
            self.prompt[r] = False
        if p_toks:
            idx = to_device(torch.tensor([p_rows, p_toks]), self.device)
            self.prompt[idx[0], idx[1]] = True
        if o_toks:
            idx = to_device(torch.tensor([o_rows, o_toks]), self.device)
            self.output.index_put_((idx[0], idx[1]), torch.ones_like(idx[0], dtype=torch.int32), accumulate=True)

    def record_decode(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """A static decode step: output[slot, token] += 1 per row, on the device (slot -1: the sink row).
        slots [rows] int64, tokens [rows] int64 (the step's input ids: the previous samples)."""
        rows = torch.where(slots >= 0, slots, torch.full_like(slots, self.sink))
        self.output.index_put_((rows, tokens), torch.ones_like(rows, dtype=torch.int32), accumulate=True)

    def penalize(self, x: torch.Tensor, slots: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                 repetition: torch.Tensor) -> torch.Tensor:
        """Penalties of k rows: x [k, V] fp32, slots / presence / frequency / repetition [k] -> x [k, V]."""
        counts = self.output[slots]                                               # [k, V] int32
        used = counts > 0
        seen = used | self.prompt[slots]
        rep = repetition[:, None]
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        return x - frequency[:, None] * counts.to(x.dtype) - presence[:, None] * used.to(x.dtype)


def _specs_of(entry) -> list[SampleSpec]:
    return ([entry.sample] if entry.sample is not None else []) + [s for _, s in entry.forks]


# ---- the processors --------------------------------------------------------------------------------------
@dataclass
class ProcessorContext:
    """What a processor factory may use besides the specs: the logits' device, the per-row scalars and
    this rank's token counts (None when no request of the world asked for penalties yet)."""

    device: torch.device
    params: Any                       # sampler.SamplingTensors (that module imports this one)
    counts: TokenCounts | None


def grammar_bitmask(specs: list[SampleSpec], ctx: ProcessorContext):
    rows = [i for i, s in enumerate(specs) if s.allowed_bitmask is not None]
    if not rows:
        return None
    masks = to_device(torch.stack([specs[i].allowed_bitmask for i in rows]), ctx.device)     # [k, W] int32
    idx = to_device(torch.tensor(rows), ctx.device)

    def apply(x: torch.Tensor) -> torch.Tensor:
        x[idx] = apply_token_bitmask(x[idx], masks)
        return x
    return apply


def logit_bias(specs: list[SampleSpec], ctx: ProcessorContext):
    pairs = [(i, t, b) for i, s in enumerate(specs) for t, b in s.logit_bias]
    if not pairs:
        return None
    idx = to_device(torch.tensor([[i for i, _, _ in pairs], [t for _, t, _ in pairs]]), ctx.device)
    bias = to_device(torch.tensor([b for _, _, b in pairs], dtype=torch.float32), ctx.device)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return x.index_put_((idx[0], idx[1]), bias, accumulate=True)
    return apply


def banned_tokens(specs: list[SampleSpec], ctx: ProcessorContext):
    pairs = [(i, t) for i, s in enumerate(specs) for t in s.banned_token_ids]
    if not pairs:
        return None
    idx = to_device(torch.tensor(pairs).T.contiguous(), ctx.device)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return x.index_put_((idx[0], idx[1]), torch.tensor(float("-inf"), device=x.device))
    return apply


def penalties(specs: list[SampleSpec], ctx: ProcessorContext):
    rows = [i for i, s in enumerate(specs) if s.has_penalties]
    if not rows:
        return None
    if ctx.counts is None:
        raise RuntimeError("a request asks for penalties but this rank keeps no token counts")
    idx = to_device(torch.tensor(rows), ctx.device)
    p = ctx.params

    def apply(x: torch.Tensor) -> torch.Tensor:
        x[idx] = ctx.counts.penalize(x[idx], p.counts_slot[idx], p.presence[idx], p.frequency[idx],
                                     p.repetition[idx])
        return x
    return apply


BUILTIN_PROCESSORS = [grammar_bitmask, logit_bias, banned_tokens, penalties]
