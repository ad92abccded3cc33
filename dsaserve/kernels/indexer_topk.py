"""Fused indexer top-k in Triton: the top-k keys per query straight from q and k, no [S x Skv] logits.

The kernel is the persistent prefill logits kernel (``indexer_logits``: a program owns BQ queries and
walks all their key tiles, tile product K @ Q^T, same epilogue, so the logits are the same numbers) with
the logits store replaced by a streaming selection per query row:

* Key tiles are visited from the highest column down. Each row keeps a candidate list in a per-program
  workspace of C slots (uint32 order-preserving keys + columns, C >= 2k), in descending column order, and a
  threshold ``thr``: a tile's valid logits with key > thr are appended (a prefix sum gives the slots).
* When a row's list could overflow with the next tile (count > C - BK), it is cut in place: bisection on
  the key finds T <= the k-th largest listed key with k <= count(>= T) <= k + SLACK (or T exact), the list
  keeps keys >= T (ties at an exact T cut in list order, so at most k + SLACK stay), and thr = T. A later
  key equal to T can be dropped: k listed keys >= T sit at higher columns and win the tie.
* After the last tile the same routine with SLACK = 0 cuts each list to exactly min(k, count) entries,
  written out with the offset, -1 padded.

Tie rule (``reference.select_topk_ordered``): among equal logits the higher column wins; the selected set is
unique. Memory: the output [S, k] int32 plus the workspace, programs x BQ x C x 8 bytes (35 MB at k = 2048
on 132 SMs), independent of S and Skv. Order within an output row: descending column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import device_sm_count, tl, triton
from .indexer_logits import _logits_epilogue


@dataclass(frozen=True)
class TopkConfig:
    """Tiles and selection knobs of the fused kernel (tiles as in ``indexer_logits.LogitsConfig``)."""

    bq: int = 4  # queries per program block (MMA N = bq * H)
    bk: int = 64  # keys per tile (MMA M)
    num_warps: int = 4
    num_stages: int = 3
    ctas_per_sm: int = 2
    capacity_factor: int = 2  # candidate slots per row C = next_pow2(capacity_factor * k) (at least k + 2 * bk)


DEFAULT_TOPK_CONFIG = TopkConfig()


def capacity(k: int, bk: int, factor: int = 2) -> int:
    """Candidate slots per row: a power of two >= factor * k and >= k + 2 * bk."""
    return triton.next_power_of_2(max(factor * k, k + 2 * bk))


def default_bq(h: int) -> int:
    """Queries per block so the MMA N dimension (bq * H) is 256 where possible (>= 16 always)."""
    return max(1, min(16, 256 // h))


if triton is not None:

    @triton.jit
    def _sortable_key(x):
        """fp32 -> uint32 whose unsigned order is the float order (-inf < ... < +inf)."""
        u = x.to(tl.uint32, bitcast=True)
        return tl.where((u >> 31) != 0, u ^ 0xFFFFFFFF, u | 0x80000000)

    @triton.jit
    def _cut_list(key_ptr, col_ptr, n, thr, K, SLACK, C: tl.constexpr):
        """Cut one row's list of n candidates (all keys >= thr, every key >= 1) down to those that can win.

        Bisection on the key finds T: the largest key with count(>= T) >= K, or any T with
        K <= count(>= T) <= K + SLACK (it stops there). Keeps every key >= T, except that an exact T whose
        ties leave more than K + SLACK keeps only the first ties in list order (= higher columns), K in
        total. Returns the listed keys and columns, the keep mask, each kept entry's new slot, the new count
        and T. 32 steps always reach the exact T; they run in guarded blocks of 4 so a cut that stops early
        skips the rest (the blocks are unrolled: the key loop around the in-loop cut must stay loop-free
        to be software-pipelined).
        """
        j = tl.arange(0, C)
        live = j < n
        keys = tl.load(key_ptr + j, mask=live, other=0).to(tl.uint32, bitcast=True)  # empty slots: 0 < any key
        lo = tl.maximum(thr.to(tl.int64), 1)  # count(>= lo) = n
        hi = tl.max(keys, 0).to(tl.int64)
        n_lo = n
        for _blk in tl.static_range(8):
            if (lo < hi) & (n_lo > K + SLACK):
                for _ in tl.static_range(4):
                    go = (lo < hi) & (n_lo > K + SLACK)
                    mid = lo + (hi - lo + 1) // 2
                    c = tl.sum((keys >= mid.to(tl.uint32)).to(tl.int32), 0)
                    take = go & (c >= K)
                    lo = tl.where(take, mid, lo)
                    n_lo = tl.where(take, c, n_lo)
                    hi = tl.where(go & (c < K), mid - 1, hi)
        t = lo.to(tl.uint32)
        gt = keys > t
        eq = keys == t  # empty slots never equal t (t >= 1)
        need = tl.where(n_lo > K + SLACK, K - tl.sum(gt.to(tl.int32), 0), C)  # tie cut only when needed
        eq_rank = tl.cumsum(eq.to(tl.int32), 0) - 1
        keep = gt | (eq & (eq_rank < need))
        keep_i = keep.to(tl.int32)
        pos = tl.cumsum(keep_i, 0) - 1
        cols = tl.load(col_ptr + j, mask=live, other=0)
        n_new = tl.sum(keep_i, 0)
        return keys, cols, keep, pos, n_new, t

    @triton.jit
    def _mqa_topk_kernel(
        q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, off_ptr, out_ptr, wkey_ptr, wcol_ptr,
        S, SKV, K, SLACK, NUM_PROGS, off_scalar,
        H: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
        HAS_OFF: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_qb = tl.cdiv(S, BQ)
        cols = tl.arange(0, BQ * H)  # MMA columns: (query, head) pairs
        d = tl.arange(0, D)
        kr = tl.arange(0, BK)
        rows = tl.arange(0, BQ)
        ws_row = (pid * BQ + rows).to(tl.int64) * C  # [BQ] this program's candidate lists
        j = tl.arange(0, C)
        for qb in range(pid, n_qb, NUM_PROGS):
            q0 = qb * BQ
            qrow = q0 + cols // H  # [BQ*H]
            qmask = qrow < S
            q = tl.load(q_ptr + (qrow.to(tl.int64) * H + cols % H)[:, None] * D + d[None, :],
                        mask=qmask[:, None], other=0.0)  # [BQ*H, D] fp8
            qt = tl.trans(q)  # [D, BQ*H]
            w = tl.load(w_ptr + qrow.to(tl.int64) * H + cols % H, mask=qmask, other=0.0)  # [BQ*H]
            qi = q0 + rows  # [BQ]
            qim = qi < S
            ks = tl.maximum(tl.load(ks_ptr + qi, mask=qim, other=0), 0)
            ke = tl.minimum(tl.load(ke_ptr + qi, mask=qim, other=0), SKV)
            live = qim & (ke > ks)
            lo = tl.min(tl.where(live, ks, SKV), axis=0)
            hi = tl.max(tl.where(live, ke, 0), axis=0)
            kb_lo = lo // BK
            kb_hi = tl.where(hi > lo, tl.cdiv(hi, BK), kb_lo)
            cnt = tl.zeros((BQ,), tl.int32)  # candidates listed per row
            thr = tl.zeros((BQ,), tl.uint32)  # keys <= thr are not listed
            for i in range(0, kb_hi - kb_lo):
                kb = kb_hi - 1 - i  # highest keys first (the tie rule depends on this order)
                kk = kb * BK + kr  # [BK]
                kmask = kk < SKV
                k = tl.load(k_ptr + kk.to(tl.int64)[:, None] * D + d[None, :], mask=kmask[:, None], other=0.0)
                s = tl.dot(k, qt)  # [BK, BQ*H] fp32
                ksc = tl.load(ksc_ptr + kk, mask=kmask, other=0.0)
                lg = _logits_epilogue(s, w, ksc, kk, ks, ke, BK, BQ, H)  # [BK, BQ]
                valid = (kk[:, None] >= ks[None, :]) & (kk[:, None] < ke[None, :])
                key = _sortable_key(lg)
                sel = valid & (key > thr[None, :])
                sel_i = sel.to(tl.int32)
                n_sel = tl.sum(sel_i, 0)  # [BQ]
                # slot = listed + selected at higher columns in this tile (keeps the list in column order)
                slot = cnt[None, :] + n_sel[None, :] - tl.cumsum(sel_i, 0)
                dst = ws_row[None, :] + slot
                tl.store(wkey_ptr + dst, key.to(tl.int32, bitcast=True), mask=sel)
                tl.store(wcol_ptr + dst, kk[:, None] + tl.zeros((BK, BQ), tl.int32), mask=sel)
                cnt += n_sel
                if tl.max(cnt, 0) > C - BK:  # a list could overflow with the next tile: shrink it
                    tl.debug_barrier()  # the appends of every thread are visible
                    for r in tl.static_range(BQ):
                        n_r = tl.sum(tl.where(rows == r, cnt, 0), 0)
                        if n_r > C - BK:
                            t_r = tl.max(tl.where(rows == r, thr, 0), 0)
                            base = (pid * BQ + r).to(tl.int64) * C
                            keys_r, cols_r, keep, pos, n_new, t_new = _cut_list(
                                wkey_ptr + base, wcol_ptr + base, n_r, t_r, K, SLACK, C)
                            tl.debug_barrier()  # every thread has read the list before it is rewritten
                            tl.store(wkey_ptr + base + pos, keys_r.to(tl.int32, bitcast=True), mask=keep)
                            tl.store(wcol_ptr + base + pos, cols_r, mask=keep)
                            cnt = tl.where(rows == r, n_new, cnt)
                            thr = tl.where(rows == r, t_new, thr)
                    tl.debug_barrier()
            # final cut of each row to exactly min(k, count) and the output row
            tl.debug_barrier()
            for r in tl.static_range(BQ):
                row = q0 + r
                if row < S:
                    n_r = tl.sum(tl.where(rows == r, cnt, 0), 0)
                    t_r = tl.max(tl.where(rows == r, thr, 0), 0)
                    base = (pid * BQ + r).to(tl.int64) * C
                    keys_r, cols_r, keep, pos, n_new, t_new = _cut_list(
                        wkey_ptr + base, wcol_ptr + base, n_r, t_r, K, 0, C)
                    if HAS_OFF:
                        off = tl.load(off_ptr + row).to(tl.int32)
                    else:
                        off = off_scalar
                    out_row = out_ptr + row.to(tl.int64) * K
                    tl.store(out_row + pos, cols_r + off, mask=keep)
                    tl.store(out_row + j, tl.full((C,), -1, tl.int32), mask=(j >= n_new) & (j < K))
            tl.debug_barrier()  # the next block reuses the lists


def mqa_topk_triton(q_fp8, k_fp8, k_scale, weights, ks, ke, k: int, offset=0, num_sms=None,
                    config: TopkConfig | None = None) -> torch.Tensor:
    """Triton launcher (inputs checked by ``dsaserve.kernels.mqa_topk_indices``) -> int32 [S, k]."""
    s, h, d = q_fp8.shape
    skv = k_fp8.shape[0]
    cfg = config or TopkConfig(bq=default_bq(h))
    out = torch.empty(s, k, dtype=torch.int32, device=q_fp8.device)
    if s == 0:
        return out
    bq = max(cfg.bq, 16 // h if h < 16 else 1)  # MMA N = bq * H must be >= 16
    cap = capacity(k, cfg.bk, cfg.capacity_factor)
    slack = (cap - k - cfg.bk) // 4
    sms = num_sms if num_sms is not None else device_sm_count(q_fp8.device)
    n_qb = triton.cdiv(s, bq)
    progs = max(1, min(sms * cfg.ctas_per_sm, n_qb))
    ws = torch.empty(2, progs * bq * cap, dtype=torch.int32, device=q_fp8.device)  # keys, columns
    has_off = isinstance(offset, torch.Tensor)
    off_t = offset.to(device=q_fp8.device, dtype=torch.int32).contiguous() if has_off else ks
    _mqa_topk_kernel[(progs,)](
        q_fp8, k_fp8, k_scale, weights, ks, ke, off_t, out, ws[0], ws[1],
        s, skv, k, slack, progs, 0 if has_off else int(offset),
        H=h, D=d, BQ=bq, BK=cfg.bk, C=cap, HAS_OFF=has_off,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
