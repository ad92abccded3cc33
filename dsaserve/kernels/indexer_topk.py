"""Fused indexer top-k in Triton: the top-k keys per query straight from q and k, no [S x Skv] logits.

The kernel is the persistent prefill logits kernel (``indexer_logits``: a program owns BQ queries and
walks all their key tiles, tile product K @ Q^T, same epilogue, so the logits are the same numbers) with
a streaming selection per query row in place of the [S, Skv] output:

* Key tiles are visited from the highest column down, in segments of up to R tiles. The segment's loop is
  the logits kernel's, storing each [BK, BQ] logits tile into a per-program ring of R tiles (L2-resident)
  instead of the output; it holds no selection code, so Triton software-pipelines it exactly like the
  logits kernel (a loop with a nested loop or a barrier is not pipelined; benchmarks/compile_report.py
  shows what the compiler made of it).
* After a segment all BQ rows' new logits are filtered at once: keys (uint32, order-preserving) above the
  row's threshold ``thr`` are appended to its candidate list (C slots in a per-program workspace), in
  descending column order.
* A list with more than C - R * BK entries (the next segment could overflow it) is cut in place: bisection
  on the key finds T <= the k-th largest listed key with k <= count(>= T) <= k + SLACK (or T exact); the
  list keeps keys >= T (ties at an exact T cut in list order, i.e. to the highest columns, k in total) and
  thr = T. A later key equal to T can be dropped: k listed keys >= T sit at higher columns and win the tie.
* After the last segment the same cut with SLACK = 0 leaves exactly min(k, count) entries, written out
  with the offset, -1 padded.

Tie rule (``reference.select_topk_ordered``): among equal logits the higher column wins; the selected set is
unique. Memory: the output [S, k] int32 plus the workspace, programs x BQ x (C x 8 + R x BK x 4) bytes
(~74 MB at k = 2048 on 132 SMs), independent of S and Skv. Rows come out in descending column order.
Speed and the profile of where the time goes (H200, 2026-12-02): benchmarks/KERNELS_NOTES.md.
Columns outside a row's range have logit -inf, whose key the threshold starts at, so they are never
listed (a valid column is listed only with a finite or NaN logit, which finite inputs always give).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import device_sm_count, tl, triton
from .indexer_logits import _logits_epilogue, default_config as default_logits_config


@dataclass(frozen=True)
class TopkConfig:
    """Tiles and selection knobs of the fused kernel (tiles as in ``indexer_logits.LogitsConfig``)."""

    bq: int = 4  # queries per program block (MMA N = bq * H)
    bk: int = 64  # keys per tile (MMA M)
    num_warps: int = 4
    num_stages: int = 3
    ctas_per_sm: int = 2
    ring_tiles: int = 16  # R: key tiles per segment (logits kept in the ring before they are filtered)
    capacity_factor: int = 2  # candidate slots per row C = next_pow2(capacity_factor * k + 2 * R * bk)
    key_splits: int | None = None  # programs per query block, each over a slice of its keys (None: auto)


MAX_KEY_SPLITS = 8  # the merge selects among key_splits x k candidates per row in one program


def auto_key_splits(n_qb: int, skv: int, programs: int, bk: int, ring_tiles: int) -> int:
    """Programs per query block: few query blocks (a short chunk at a long context: 256 queries at 64K
    context fill 64 of 264 program slots) split their keys so every slot works; each split still walks at
    least two segments of keys, so its list cuts stay rare."""
    if n_qb >= programs:
        return 1
    by_keys = skv // (2 * ring_tiles * bk)
    return max(1, min(MAX_KEY_SPLITS, programs // n_qb, by_keys))


def list_slots(k: int, bk: int, ring_tiles: int, factor: int = 2) -> int:
    """Candidate slots per row C (a power of two): room for k, a cut's slack and one segment's appends; a
    larger factor means fewer cuts (each cut costs a pass over C slots)."""
    return triton.next_power_of_2(factor * k + 2 * ring_tiles * bk)


def cut_slack(k: int, bk: int, ring_tiles: int, c: int) -> int:
    """Entries above k a cut may leave: half the room left after k and one segment's worth of appends."""
    return (c - k - ring_tiles * bk) // 2


if triton is not None:

    @triton.jit
    def _sortable_key(x):
        """fp32 -> uint32 whose unsigned order is the float order (-inf < ... < +inf)."""
        u = x.to(tl.uint32, bitcast=True)
        return tl.where((u >> 31) != 0, u ^ 0xFFFFFFFF, u | 0x80000000)

    @triton.jit(noinline=True)
    def _cut(key_ptr, col_ptr, n, thr, K, SLACK, dst_ptr, col_off, C: tl.constexpr, IN_PLACE: tl.constexpr):
        """Cut one row's list of n candidates (every key >= thr > 0, list order = descending column).

        Bisection on the key for T: the largest key with count(>= T) >= K, stopping early once
        K <= count(>= T) <= K + SLACK. Keeps keys > T and keys == T while their rank among the ties (list
        order) is below ``need``: unlimited, unless T is exact and its ties would leave more than K + SLACK;
        then the first ties fill up to K. At most 32 halvings reach T. IN_PLACE: the kept keys and columns
        are packed to the front of the list (order kept); else the kept columns + col_off go to dst_ptr.
        Returns (kept count, T as int32 bits). Not inlined: its [C]-wide registers then never crowd the
        key loop's allocation (the key loop keeps its logits-kernel register budget).
        """
        j = tl.arange(0, C)
        live = j < n
        keys = tl.load(key_ptr + j, mask=live, other=0).to(tl.uint32, bitcast=True)  # empty slots: 0
        lo = thr.to(tl.uint32, bitcast=True).to(tl.int64)  # count(>= lo) = n
        hi = tl.max(keys, 0).to(tl.int64)
        n_lo = n
        while (lo < hi) & (n_lo > K + SLACK):
            mid = lo + (hi - lo + 1) // 2
            c = tl.sum((keys >= mid.to(tl.uint32)).to(tl.int32), 0)
            take = c >= K
            hi = tl.where(take, hi, mid - 1)
            lo = tl.where(take, mid, lo)
            n_lo = tl.where(take, c, n_lo)
        t = lo.to(tl.uint32)
        gt = keys > t
        eq = keys == t  # empty slots (0) never equal t (t >= thr > 0)
        need = tl.where(n_lo > K + SLACK, K - tl.sum(gt.to(tl.int32), 0), C)
        keep = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))
        cols = tl.load(col_ptr + j, mask=live, other=0)
        slot = tl.cumsum(keep.to(tl.int32), 0) - 1
        if IN_PLACE:
            tl.debug_barrier()  # every thread has read the list before it is rewritten
            tl.store(key_ptr + slot, keys.to(tl.int32, bitcast=True), mask=keep)
            tl.store(col_ptr + slot, cols, mask=keep)
        else:
            tl.store(dst_ptr + slot, cols + col_off, mask=keep)
        return tl.sum(keep.to(tl.int32), 0), t.to(tl.int32, bitcast=True)

    # Sizes that change from call to call are not specialised on (Triton would compile a variant per
    # "divisible by 16" / "== 1" pattern, each ~5 s: a stall in the middle of serving)
    @triton.jit(do_not_specialize=["S", "SKV", "NUM_PROGS", "SPLITS", "off_scalar"])
    def _mqa_topk_kernel(
        q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, off_ptr, out_ptr, wkey_ptr, wcol_ptr, ring_ptr,
        S, SKV, K, SLACK, NUM_PROGS, off_scalar, SPLITS,
        H: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
        R: tl.constexpr, HAS_OFF: tl.constexpr, SPLIT: tl.constexpr,
    ):
        """not SPLIT: rows' top-k columns (+ offset) to out_ptr [S, K]. SPLIT (SPLITS key splits, a run-time
        count): work item = (query block, key split); split sp walks the sp-th slice of the block's key tiles
        from the top, and its rows' top-k (uint32 key bits, 0 = empty; raw column, -1 = empty) go to slab sp of
        out_ptr / out_ptr + S * SPLITS * K ([S, SPLITS, K] each), in descending column order, for
        ``_merge_splits_topk``."""
        pid = tl.program_id(0)
        n_qb = tl.cdiv(S, BQ)
        cols = tl.arange(0, BQ * H)  # MMA columns: (query, head) pairs
        d = tl.arange(0, D)
        kr = tl.arange(0, BK)
        rows = tl.arange(0, BQ)
        wkey_prog = wkey_ptr + pid.to(tl.int64) * (BQ * C)  # this program's BQ candidate lists
        wcol_prog = wcol_ptr + pid.to(tl.int64) * (BQ * C)
        ring = ring_ptr + pid.to(tl.int64) * (R * BQ * BK)  # [R, BQ, BK] logits of the current segment
        e = tl.arange(0, R * BK)  # a row's segment entries in descending column order
        e_tile = e // BK
        e_key = BK - 1 - e % BK
        jc = tl.arange(0, C)
        n_sp = SPLITS if SPLIT else 1
        for item in range(pid, n_qb * n_sp, NUM_PROGS):
            qb = item // n_sp
            sp = item % n_sp
            q0 = qb * BQ
            qrow = q0 + cols // H  # [BQ*H]
            qmask = qrow < S
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
            if SPLIT:  # this split's slice of the tiles, counted from the top
                per = tl.cdiv(kb_hi - kb_lo, n_sp)
                kb_hi = tl.maximum(kb_hi - sp * per, kb_lo)
                kb_lo = tl.maximum(kb_hi - per, kb_lo)
            n_tiles = kb_hi - kb_lo
            cnt = tl.zeros((BQ,), tl.int32)  # listed candidates per row
            # per row, uint32 key bits: keys <= thr are not listed; starts at the key of -inf
            thr = tl.full((BQ,), 0x007FFFFF, tl.int32)
            for done in range(0, n_tiles, R):
                seg = tl.minimum(n_tiles - done, R)
                # Q is loaded per segment: its shared-memory copy must not be live across the cut, whose
                # (not inlined) code uses shared memory from offset 0 (seen in the allocation of Triton 3.6)
                q = tl.load(q_ptr + (qrow.to(tl.int64) * H + cols % H)[:, None] * D + d[None, :],
                            mask=qmask[:, None], other=0.0)  # [BQ*H, D] fp8
                qt = tl.trans(q)  # [D, BQ*H]
                for i in range(0, seg):  # the logits kernel's loop, storing into the ring
                    kb = kb_hi - 1 - done - i  # highest keys first (the tie rule depends on this order)
                    kk = kb * BK + kr  # [BK]
                    kmask = kk < SKV
                    k = tl.load(k_ptr + kk.to(tl.int64)[:, None] * D + d[None, :], mask=kmask[:, None],
                                other=0.0)
                    s = tl.dot(k, qt)  # [BK, BQ*H] fp32
                    ksc = tl.load(ksc_ptr + kk, mask=kmask, other=0.0)
                    lg = _logits_epilogue(s, w, ksc, kk, ks, ke, BK, BQ, H)  # [BK, BQ], -inf outside the rows
                    tl.store(ring + (i * BQ + rows[None, :]) * BK + kr[:, None], lg)
                tl.debug_barrier()  # the ring is visible to every thread
                # filter all rows at once: [BQ, R * BK] logits in descending column order per row
                col0 = (kb_hi - 1 - done) * BK  # column of the segment's first ring tile
                lgs = tl.load(ring + (e_tile[None, :] * BQ + rows[:, None]) * BK + e_key[None, :],
                              mask=(e_tile < seg)[None, :], other=float("-inf"))
                keys = _sortable_key(lgs)
                sel = keys > thr.to(tl.uint32, bitcast=True)[:, None]
                sel_i = sel.to(tl.int32)
                pos = cnt[:, None] + tl.cumsum(sel_i, 1) - 1
                dst = rows[:, None] * C + pos
                tl.store(wkey_prog + dst, keys.to(tl.int32, bitcast=True), mask=sel)
                tl.store(wcol_prog + dst, (col0 - e_tile * BK + e_key)[None, :] + tl.zeros((BQ, 1), tl.int32),
                         mask=sel)
                cnt += tl.sum(sel_i, 1)
                if (tl.max(cnt, 0) > C - R * BK) & (done + R < n_tiles):  # a list could overflow next segment
                    tl.debug_barrier()  # the appends are visible
                    for r in range(0, BQ):
                        n_r = tl.sum(tl.where(rows == r, cnt, 0), 0)
                        if n_r > C - R * BK:
                            t_r = tl.sum(tl.where(rows == r, thr, 0), 0)
                            n_r, t_r = _cut(wkey_prog + r * C, wcol_prog + r * C, n_r, t_r, K, SLACK,
                                            wcol_prog, 0, C, True)
                            cnt = tl.where(rows == r, n_r, cnt)
                            thr = tl.where(rows == r, t_r, thr)
                tl.debug_barrier()  # the lists are visible; the ring may be overwritten
            # final cut of each row to exactly min(k, count), written as the output row (or the split's slab)
            for r in range(0, tl.minimum(BQ, S - q0)):
                row = q0 + r
                n_r = tl.sum(tl.where(rows == r, cnt, 0), 0)
                t_r = tl.sum(tl.where(rows == r, thr, 0), 0)
                if not SPLIT:
                    if HAS_OFF:
                        off = tl.load(off_ptr + row).to(tl.int32)
                    else:
                        off = off_scalar
                    out_row = out_ptr + row.to(tl.int64) * K
                    n_out, _t = _cut(wkey_prog + r * C, wcol_prog + r * C, n_r, t_r, K, 0, out_row, off, C, False)
                    tl.store(out_row + jc, tl.full((C,), -1, tl.int32), mask=(jc >= n_out) & (jc < K))
                else:
                    n_out, _t = _cut(wkey_prog + r * C, wcol_prog + r * C, n_r, t_r, K, 0, wcol_prog, 0, C, True)
                    tl.debug_barrier()  # the packed list is visible
                    got = jc < n_out
                    kk_ = tl.load(wkey_prog + r * C + jc, mask=got, other=0)
                    cc_ = tl.load(wcol_prog + r * C + jc, mask=got, other=-1)
                    slab = (row.to(tl.int64) * n_sp + sp) * K
                    tl.store(out_ptr + slab + jc, kk_, mask=jc < K)
                    tl.store(out_ptr + S.to(tl.int64) * n_sp * K + slab + jc, cc_, mask=jc < K)
            tl.debug_barrier()  # the next block reuses the lists

    @triton.jit(do_not_specialize=["S", "SPLITS", "off_scalar"])
    def _merge_splits_topk(cand_ptr, off_ptr, out_ptr, S, K, off_scalar, SPLITS, M: tl.constexpr,
                           HAS_OFF: tl.constexpr):
        """One row: the top-k of its SPLITS x K candidates (key 0 = empty), the tie rule kept (the slabs come
        in descending column order, so list order is still 'higher column first'). The candidates are
        packed to the front of the row's slab region in place, then cut like a split's list. M: a power of
        two >= MAX_KEY_SPLITS x K (one compiled variant for every split count)."""
        row = tl.program_id(0)
        j = tl.arange(0, M)
        inb = j < SPLITS * K
        base = row.to(tl.int64) * SPLITS * K
        cols_base = S.to(tl.int64) * SPLITS * K + base
        keys = tl.load(cand_ptr + base + j, mask=inb, other=0)
        cols = tl.load(cand_ptr + cols_base + j, mask=inb, other=-1)
        sel = keys != 0
        pos = tl.cumsum(sel.to(tl.int32), 0) - 1
        n = tl.sum(sel.to(tl.int32), 0)
        tl.debug_barrier()  # every thread has read the slabs before they are rewritten
        tl.store(cand_ptr + base + pos, keys, mask=sel)
        tl.store(cand_ptr + cols_base + pos, cols, mask=sel)
        tl.debug_barrier()
        if HAS_OFF:
            off = tl.load(off_ptr + row).to(tl.int32)
        else:
            off = off_scalar
        out_row = out_ptr + row.to(tl.int64) * K
        n_out, _t = _cut(cand_ptr + base, cand_ptr + cols_base, n, tl.full((), 0x007FFFFF, tl.int32),
                         K, 0, out_row, off, M, False)
        tl.store(out_row + j, tl.full((M,), -1, tl.int32), mask=(j >= n_out) & (j < K))


def mqa_topk_triton(q_fp8, k_fp8, k_scale, weights, ks, ke, k: int, offset=0, num_sms=None,
                    config: TopkConfig | None = None) -> torch.Tensor:
    """Triton launcher (inputs checked by ``dsaserve.kernels.mqa_topk_indices``) -> int32 [S, k]."""
    s, h, d = q_fp8.shape
    skv = k_fp8.shape[0]
    cfg = config or TopkConfig(bq=default_logits_config(h).bq)  # the logits kernel's tiles: the same logits
    out = torch.empty(s, k, dtype=torch.int32, device=q_fp8.device)
    if s == 0:
        return out
    bq = max(cfg.bq, 16 // h if h < 16 else 1)  # MMA N = bq * H must be >= 16
    c = list_slots(k, cfg.bk, cfg.ring_tiles, cfg.capacity_factor)
    sms = num_sms if num_sms is not None else device_sm_count(q_fp8.device)
    n_qb = triton.cdiv(s, bq)
    slots = sms * cfg.ctas_per_sm
    splits = cfg.key_splits or auto_key_splits(n_qb, skv, slots, cfg.bk, cfg.ring_tiles)
    if not 1 <= splits <= MAX_KEY_SPLITS:
        raise ValueError(f"key_splits must be in 1..{MAX_KEY_SPLITS}, got {splits}")
    progs = max(1, min(slots, n_qb * splits))
    ws = torch.empty(2, progs * bq * c, dtype=torch.int32, device=q_fp8.device)  # keys, columns
    ring = torch.empty(progs * cfg.ring_tiles * bq * cfg.bk, dtype=torch.float32, device=q_fp8.device)
    has_off = isinstance(offset, torch.Tensor)
    off_t = offset.to(device=q_fp8.device, dtype=torch.int32).contiguous() if has_off else ks
    # splits > 1: every (row, split)'s own top-k first ([2, S, splits, k] keys | columns), then one merge per row
    cand = out if splits == 1 else torch.empty(2, s, splits, k, dtype=torch.int32, device=q_fp8.device)
    _mqa_topk_kernel[(progs,)](
        q_fp8, k_fp8, k_scale, weights, ks, ke, off_t, cand, ws[0], ws[1], ring,
        s, skv, k, cut_slack(k, cfg.bk, cfg.ring_tiles, c), progs, 0 if has_off else int(offset),
        splits, H=h, D=d, BQ=bq, BK=cfg.bk, C=c, R=cfg.ring_tiles, HAS_OFF=has_off, SPLIT=splits > 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        _merge_splits_topk[(s,)](cand, off_t, out, s, k, 0 if has_off else int(offset), splits,
                                 M=triton.next_power_of_2(MAX_KEY_SPLITS * k), HAS_OFF=has_off, num_warps=16)
    return out
