"""An even split of query blocks' key tiles over persistent programs, computed on the device in one launch.

Why: a persistent kernel that strides whole query blocks over the SMs leaves its last wave short (the indexer
logits at 8K queries and 64 heads: 2048 blocks over 132 SMs is 16 waves for 15.5 of work, ~3% of the SMs idle).
Numbering the live key tiles of all blocks in block order and giving program p the tiles [T p / P, T (p + 1) / P)
balances the programs to one tile. A block's tiles may then be split between neighbouring programs (the logits
need no reduction over keys). The plan depends on the rows' key ranges, which live on the device, so it is
computed there: one Triton program (a host-side torch version took ~25 small launches, ~0.3 ms of host time per
call, H200 2026-12-05). ``reference.tile_split`` is the executable spec.
"""

from __future__ import annotations

import torch

from . import reference
from ._common import HAVE_TRITON, interpret_mode, tl, triton

if HAVE_TRITON:

    @triton.jit
    def _tile_split_kernel(ks_ptr, ke_ptr, blk_ptr, prog_ptr, S, SKV, n_qb, P, n_iter,
                           BQ: tl.constexpr, BKV: tl.constexpr, CH: tl.constexpr, PB: tl.constexpr):
        """One program. Pass 1, CH blocks at a time: each block's live tiles (kb_lo, count), their running
        prefix sums into blk. Pass 2, PB programs at a time: each program's share [t0, t1) of the total and, by
        binary search over the prefix sums just written, its first and end blocks."""
        r = tl.arange(0, BQ)
        total = 0
        tl.store(blk_ptr, 0)
        for c0 in range(0, n_qb, CH):
            b = c0 + tl.arange(0, CH)  # [CH] blocks
            bm = b < n_qb
            rows = b[:, None] * BQ + r[None, :]  # [CH, BQ]
            rm = rows < S
            ks = tl.maximum(tl.load(ks_ptr + rows, mask=rm, other=0), 0)
            ke = tl.minimum(tl.load(ke_ptr + rows, mask=rm, other=0), SKV)
            live = rm & (ke > ks)
            lo = tl.min(tl.where(live, ks, SKV), axis=1)
            hi = tl.max(tl.where(live, ke, 0), axis=1)
            kb_lo = lo // BKV
            cnt = tl.where(bm & (hi > lo), (hi + BKV - 1) // BKV - kb_lo, 0)
            tl.store(blk_ptr + 1 + b, tl.cumsum(cnt, axis=0) + total, mask=bm)
            tl.store(blk_ptr + (n_qb + 1) + b, kb_lo, mask=bm)
            total += tl.sum(cnt, axis=0)
        tl.debug_barrier()  # the prefix sums are in global memory for every thread of the program
        for p0 in range(0, P, PB):
            p = p0 + tl.arange(0, PB)
            pm = p < P
            t0 = (total.to(tl.int64) * p // P).to(tl.int32)
            t1 = (total.to(tl.int64) * (p + 1) // P).to(tl.int32)
            # b0 = first block whose key >= t0, key = its last tile number if it has tiles, else its first
            # (nondecreasing); b1 = first block whose first tile number >= t1. Searches over [lo, hi).
            lo0 = tl.zeros([PB], tl.int32)
            hi0 = tl.zeros([PB], tl.int32) + n_qb
            lo1 = tl.zeros([PB], tl.int32)
            hi1 = tl.zeros([PB], tl.int32) + n_qb
            for _ in range(n_iter):  # ceil(log2(n_qb + 1)) halvings empty every range
                open0 = lo0 < hi0
                m0 = (lo0 + hi0) // 2
                a0 = tl.load(blk_ptr + m0, mask=open0, other=0, cache_modifier=".cg")
                a1 = tl.load(blk_ptr + m0 + 1, mask=open0, other=0, cache_modifier=".cg")
                at0 = tl.where(a1 > a0, a1 - 1, a0) >= t0
                hi0 = tl.where(open0 & at0, m0, hi0)
                lo0 = tl.where(open0 & ~at0, m0 + 1, lo0)
                open1 = lo1 < hi1
                m1 = (lo1 + hi1) // 2
                at1 = tl.load(blk_ptr + m1, mask=open1, other=0, cache_modifier=".cg") >= t1
                hi1 = tl.where(open1 & at1, m1, hi1)
                lo1 = tl.where(open1 & ~at1, m1 + 1, lo1)
            b1 = tl.where(p == P - 1, n_qb, lo1)
            row = prog_ptr + 4 * p
            tl.store(row, lo0, mask=pm)
            tl.store(row + 1, b1, mask=pm)
            tl.store(row + 2, t0, mask=pm)
            tl.store(row + 3, t1, mask=pm)


def tile_split(ks: torch.Tensor, ke: torch.Tensor, skv: int, bq: int, bkv: int, programs: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(blk int32 [2 n_qb + 1], prog int32 [programs, 4]) as ``reference.tile_split``: the Triton kernel on CUDA
    tensors (or under the CPU interpreter), else the reference. Needs fewer than 2^31 tiles (the caller checks)."""
    if not (HAVE_TRITON and (ks.is_cuda or interpret_mode())):
        return reference.tile_split(ks, ke, skv, bq, bkv, programs)
    n_qb = -(-ks.shape[0] // bq)
    blk = torch.empty(2 * n_qb + 1, dtype=torch.int32, device=ks.device)
    prog = torch.empty(programs, 4, dtype=torch.int32, device=ks.device)
    _tile_split_kernel[(1,)](ks, ke, blk, prog, ks.shape[0], skv, n_qb, programs, n_qb.bit_length(), BQ=bq,
                             BKV=bkv, CH=max(64, min(1024, 4096 // bq)), PB=min(1024, triton.next_power_of_2(programs)),
                             num_warps=4)
    return blk, prog
