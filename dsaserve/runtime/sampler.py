"""Turning logits into tokens: greedy, temperature, top-k, top-p, seeded, with optional logprobs.

Sampling is stateless per token (the generator is seeded from (request seed, output index)), so the
rank that samples may change from step to step without changing results.
"""

from __future__ import annotations

import torch

from dsaserve.runtime.plan import SampleSpec, SampledToken


def _draw(logits: torch.Tensor, spec: SampleSpec) -> int:
    """logits [V] fp32 -> one token id, following the spec's filters."""
    if spec.temperature == 0.0:
        return int(logits.argmax())
    logits = logits / spec.temperature
    if spec.top_k > 0 and spec.top_k < logits.numel():
        kth = logits.topk(spec.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if spec.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= spec.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    gen = torch.Generator(device="cpu").manual_seed((spec.seed * 1_000_003 + spec.output_index) % (1 << 63))
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def sample(logits: torch.Tensor, specs: list[SampleSpec], req_ids: list[int]) -> list[SampledToken]:
    """logits [m, V] fp32, one row per spec -> one SampledToken per row."""
    out = []
    for row, spec, req_id in zip(logits.float(), specs, req_ids):
        token = _draw(row, spec)
        lp = None
        if spec.logprobs is not None:
            logp = row.log_softmax(-1)
            k = min(spec.logprobs, logp.numel())
            vals, ids = logp.topk(k) if k > 0 else (logp[:0], torch.zeros(0, dtype=torch.long))
            lp = {int(i): float(v) for i, v in zip(ids.tolist(), vals.tolist())}
            lp[token] = float(logp[token])
        out.append(SampledToken(req_id, token, lp))
    return out
