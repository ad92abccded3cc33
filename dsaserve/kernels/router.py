"""The MoE router's selection in one launch (Triton): sigmoid, correction bias, group-limited top-k, weights.

PyTorch runs DeepSeek's ``noaux_tc`` selection (``reference.moe_route``) as ~15 kernels per MoE layer
(sigmoid, add, two top-k's, a scatter, repeat_interleave, masked_fill, a third top-k, gather, sum, divide,
scale): in a decode step, that is a tenth of all launches. Here one program takes one token's E router
logits (E <= 1024) and does it all in registers.

Selection rule (the reference's): score = sigmoid(logit); biased = score + bias; with n_group > 1 each
group's strength is the sum of its two largest biased scores and only the topk_group strongest groups
stay; the top_k largest biased scores of what stays are chosen; weights are their *unbiased* scores,
normalized to sum 1 when norm_topk_prob, times routed_scaling_factor. Ties go to the lower index (group
or expert): ``torch.topk`` leaves tie order unspecified, so exact ties are the only place the two may
choose differently; the tests use tie-free inputs and check one tie explicitly.
"""

from __future__ import annotations

import torch

from ._common import tl, triton

if triton is not None:

    @triton.jit
    def _argmax_low(v, idx, BIG: tl.constexpr):
        """(max of v, the lowest index holding it): a tie-breaking argmax over a 1-D block."""
        m = tl.max(v, axis=0)
        i = tl.min(tl.where(v == m, idx, BIG), axis=0)
        return m, i

    @triton.jit
    def _moe_route_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, stride_l, scaling,
                          TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                          GROUP: tl.constexpr, GP: tl.constexpr, NORM: tl.constexpr):
        """One token. Experts are laid out as N_GROUP groups of GP = next_pow2(GROUP) lanes; the lanes past
        GROUP are padding (-inf, never chosen); ``e_real`` maps a lane to its expert id."""
        BLOCK_E: tl.constexpr = N_GROUP * GP
        row = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, BLOCK_E)
        e_real = (lane // GP) * GROUP + lane % GP
        valid = (lane % GP) < GROUP
        x = tl.load(logits_ptr + row * stride_l + e_real, mask=valid, other=0.0)
        score = 1.0 / (1.0 + tl.exp(-x))                                # [BLOCK_E] fp32
        biased = tl.where(valid, score + tl.load(bias_ptr + e_real, mask=valid, other=0.0), float("-inf"))
        if N_GROUP > 1:
            # group strength: the sum of its two largest biased scores
            g2 = tl.reshape(biased, (N_GROUP, GP))
            j = tl.arange(0, GP)[None, :]
            m1 = tl.max(g2, axis=1)
            first = tl.min(tl.where(g2 == m1[:, None], j, GP), axis=1)
            m2 = tl.max(tl.where(j == first[:, None], float("-inf"), g2), axis=1)
            strength = m1 + m2                                           # [G]
            gidx = tl.arange(0, N_GROUP)
            keep = gidx < 0
            for _ in tl.static_range(TOPK_GROUP):
                _, gi = _argmax_low(tl.where(keep, float("-inf"), strength), gidx, N_GROUP)
                keep = keep | (gidx == gi)
            kept = tl.reshape(tl.broadcast_to(keep[:, None], (N_GROUP, GP)), (BLOCK_E,))
            biased = tl.where(kept, biased, float("-inf"))
        total = 0.0
        chosen_w = tl.zeros((BLOCK_E,), dtype=tl.float32)
        slot = tl.full((BLOCK_E,), -1, dtype=tl.int32)
        for s in tl.static_range(TOP_K):
            _, li = _argmax_low(biased, lane, BLOCK_E)
            hit = lane == li
            total += tl.sum(tl.where(hit, score, 0.0), axis=0)
            tl.store(ids_ptr + row * TOP_K + s, ((li // GP) * GROUP + li % GP).to(tl.int64))
            slot = tl.where(hit, s, slot)
            chosen_w = tl.where(hit, score, chosen_w)
            biased = tl.where(hit, float("-inf"), biased)
        if NORM:
            chosen_w = chosen_w / (total + 1e-20)
        # each chosen lane writes its weight at its slot
        tl.store(w_ptr + row * TOP_K + slot, chosen_w * scaling, mask=slot >= 0)


def moe_route_triton(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                     norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher; see ``dsaserve.kernels.moe_route`` for the contract."""
    n, e = logits.shape
    ids = torch.empty(n, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(n, top_k, dtype=torch.float32, device=logits.device)
    if n:
        group = e // n_group
        _moe_route_kernel[(n,)](logits, bias, ids, weights, logits.stride(0), float(scaling),
                                TOP_K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP=group,
                                GP=triton.next_power_of_2(group), NORM=norm_topk_prob, num_warps=4)
    return ids, weights
