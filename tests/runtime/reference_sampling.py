"""Plain PyTorch references of the logits processors and the seeded draw, one request at a time, written
from the definitions (no vectorization, no shared code with dsaserve.runtime): the oracle of the processor
tests here and of the engine-level tests in tests/engine/test_api_sampling.py."""

from __future__ import annotations

from collections import Counter

import torch


def process_row(logits: torch.Tensor, *, prompt: list[int], output: list[int], presence: float = 0.0,
                frequency: float = 0.0, repetition: float = 1.0, logit_bias: dict[int, float] | None = None,
                banned: list[int] = (), allowed_mask: list[int] | None = None) -> torch.Tensor:
    """One request's processed logits [V] fp32: grammar mask, logit_bias, bans, then penalties."""
    x = logits.float().clone()
    vocab = x.numel()
    if allowed_mask is not None:
        for t in range(vocab):
            word = allowed_mask[t // 32] & 0xFFFFFFFF
            if not (word >> (t % 32)) & 1:
                x[t] = float("-inf")
    for t, b in (logit_bias or {}).items():
        x[t] = x[t] + b
    for t in banned:
        x[t] = float("-inf")
    if presence or frequency or repetition != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
        for t, c in Counter(output).items():
            x[t] = x[t] - (frequency * c + presence)
    return x


def noise_key(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (1 << 63)


def draw(x: torch.Tensor, *, temperature: float, seed: int, index: int, top_k: int = -1, top_p: float = 1.0) -> int:
    """The token for processed logits ``x`` [V]: greedy, or temperature / top-k / top-p then
    ``torch.multinomial`` with a generator seeded by (seed, index) (the CPU stream dsaserve reproduces)."""
    if temperature == 0.0:
        return int(x.argmax())
    x = x / temperature
    if 0 < top_k < x.numel():
        kth = x.topk(top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    if top_p < 1.0:
        sp, order = probs.sort(descending=True)
        sp = sp.masked_fill((sp.cumsum(-1) - sp) >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sp)
    gen = torch.Generator(device="cpu").manual_seed(noise_key(seed, index))
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))
