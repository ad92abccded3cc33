"""Indexer top-k by a per-query threshold: its PyTorch reference and its GPU path (Hopper).

Design (benchmarks/KERNELS_NOTES.md, "Next: a fused top-k that costs one compare per logit"): the logits of a
sparse, regular sample of the keys give each query a threshold T that about ``margin * k`` of its keys reach; the logits
kernel's epilogue then appends only the keys with logit >= T to a per-query candidate buffer of ``cap`` slots;
the top-k of the candidates is the exact top-k of the row whenever k_eff <= count <= cap (every key above the
k-th largest, and every key tied with it, is >= T, so the tie rule sees the same ties). Rows outside that
window are redone exactly. Memory: the sample and the candidates, O(S x k); no [S x Skv] buffer.

This module holds the PyTorch reference of every step (``threshold_topk_reference``: the algorithm and its tie
rule, tested on the CPU in tests/kernels/test_threshold_topk.py; it samples every m-th tile, the GPU path every
``stride``-th key: the sample only sets T, the result is exact either way) and the GPU path
(``mqa_topk_threshold``): the sample through the logits kernel on every ``stride``-th key, the filter in the
Gluon logits kernel's epilogue (``indexer_logits_hopper.mqa_threshold_candidates``), the exact select of each
row's candidates (``_select_candidates_kernel``), and the redo through the fused Triton top-k on the flagged
rows' blocks, all without a host sync (benchmarks/KERNELS_NOTES.md, "The threshold top-k (session 10)"). The
row kernels (the sample's thresholds, the select) run in Gluon where it runs (``select_gluon``, same results;
``ThresholdTopkConfig.select``); the Triton ones here are what the CPU interpreter tests.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ._common import HAVE_TRITON, SELECT_KERNELS, tl, triton
from .indexer_logits_hopper import EMPTY_KEY, STREAMS, LogitsHopperConfig  # the filter kernel's candidates
from .reference import select_topk_ordered

TILE = 64  # keys per logits tile: the unit the sample takes or skips


def sample_stride(n_keys: int, k: int, per_row: int = 4) -> int:
    """m: every m-th tile is sampled, so a row of ``n_keys`` keys gets about ``per_row * k`` samples at most."""
    tiles = max(1, math.ceil(n_keys / TILE))
    return max(1, tiles * TILE // (per_row * k))


def sampled_columns(n_keys: int, m: int, device=None) -> torch.Tensor:
    """Columns of tiles 0, m, 2m, ... (int64 [n_s]), cut at n_keys."""
    starts = torch.arange(0, n_keys, m * TILE, device=device)
    cols = (starts[:, None] + torch.arange(TILE, device=device)[None, :]).reshape(-1)
    return cols[cols < n_keys]


def row_valid(ks: torch.Tensor, ke: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[S, len(cols)] bool: column inside the row's [ks, ke)."""
    return (cols[None, :] >= ks[:, None].long()) & (cols[None, :] < ke[:, None].long())


def thresholds(sample: torch.Tensor, sample_valid: torch.Tensor, n_valid: torch.Tensor, k: int,
               margin: float = 2.0) -> torch.Tensor:
    """T [S] fp32 from the sampled logits [S, n_s] (``sample_valid`` marks the row's own keys): the r-th largest
    valid sample, with r chosen so that about ``margin * k`` of the row's ``n_valid`` keys reach it. Rows with
    at most k keys, or no valid sample, get -inf (every key is a candidate)."""
    n_s = sample_valid.sum(1)  # [S]
    masked = torch.where(sample_valid, sample.float(), torch.full_like(sample, float("-inf"), dtype=torch.float32))
    r = torch.ceil(margin * k * n_s.double() / n_valid.clamp_min(1).double()).long()
    r = torch.minimum(r.clamp_min(1), n_s.clamp_min(1))  # 1 <= r <= the row's valid samples
    ordered = torch.sort(masked, dim=1, descending=True).values  # [S, n_s]
    t = torch.gather(ordered, 1, (r - 1).clamp_min(0)[:, None]).squeeze(1)
    take_all = (n_valid <= k) | (n_s == 0)
    return torch.where(take_all, torch.full_like(t, float("-inf")), t)


def filter_candidates(logits: torch.Tensor, valid: torch.Tensor, t: torch.Tensor, cap: int):
    """Reference of the kernel's epilogue filter: the valid columns with logit >= T[row], at most ``cap`` a row
    (the kernel counts past cap but stores no more). -> (positions int64 [S, cap] -1 padded, values fp32
    [S, cap], count int64 [S] = every key that passed, stored or not)."""
    keep = valid & (logits.float() >= t[:, None])  # [S, N]
    count = keep.sum(1)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :cap]  # passing columns first
    stored = torch.gather(keep, 1, order)
    pos = torch.where(stored, order, torch.full_like(order, -1))
    val = torch.where(stored, torch.gather(logits.float(), 1, order), torch.full_like(order, 0, dtype=torch.float32))
    return pos, val, count


def select_candidates(pos: torch.Tensor, val: torch.Tensor, count: torch.Tensor, n_valid: torch.Tensor, k: int):
    """Top-k of each row's candidates by (logit descending, position descending), -1 padded to k: int64 [S, k];
    and ``redo`` [S] bool, the rows whose candidates do not hold their exact top-k (fewer than min(k, n_valid)
    passed, or more than the buffer holds)."""
    cap = pos.shape[1]
    redo = (count < torch.clamp(n_valid, max=k)) | (count > cap)
    ok = pos >= 0
    # (value desc, position desc): sort by position descending, then stably by value descending
    by_pos = torch.sort(torch.where(ok, pos, torch.full_like(pos, -1)), dim=1, descending=True)
    v = torch.gather(torch.where(ok, val, torch.full_like(val, float("-inf"))), 1, by_pos.indices)
    by_val = torch.sort(v, dim=1, descending=True, stable=True).indices
    picked = torch.gather(by_pos.values, 1, by_val)[:, :k]  # [S, min(k, cap)]
    if picked.shape[1] < k:
        picked = torch.cat([picked, picked.new_full((picked.shape[0], k - picked.shape[1]), -1)], dim=1)
    return picked, redo


def threshold_topk_reference(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int,
                             cap: int | None = None, per_row: int = 4, margin: float = 2.0):
    """The whole planned path on dense logits [S, N] (the kernel never has them): sample every m-th tile,
    thresholds, filter into ``cap`` slots (default 4k), select, redo the rows outside the window exactly.
    -> (int64 [S, k] as ``select_topk_ordered(logits, valid, k)``, number of redone rows)."""
    s, n = logits.shape
    cap = cap or 4 * k
    cols = torch.arange(n, device=logits.device)
    valid = row_valid(ks, ke, cols)
    n_valid = valid.sum(1)
    scols = sampled_columns(n, sample_stride(n, k, per_row), logits.device)
    t = thresholds(logits[:, scols], valid[:, scols], n_valid, k, margin)
    pos, val, count = filter_candidates(logits, valid, t, cap)
    out, redo = select_candidates(pos, val, count, n_valid, k)
    if redo.any():
        out[redo] = select_topk_ordered(logits[redo], valid[redo], k)
    return out, int(redo.sum())


# ----------------------------------------------------------------------------------------------- GPU path
if HAVE_TRITON:

    @triton.jit
    def _order_u32(bits):
        """int32 fp32 bits -> uint32 in the fp32 order (-0.0 as +0.0); EMPTY_KEY's high word (-1, a NaN) -> 0,
        below every real value (-inf -> 0x007FFFFF)."""
        s = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        s = tl.where(s == -1, 0, s)
        return (s ^ -2147483648).to(tl.uint32, bitcast=True)

    @triton.jit
    def _highest_bit(x):
        """Index of the highest set bit of uint32 x (0 for x <= 1): scalar work only."""
        top = tl.zeros((), tl.int32)
        for b in tl.static_range(32):
            top = tl.where(x >= (1 << b), b, top)
        return top

    @triton.jit
    def _greedy_start(lo, hi):
        """Where the greedy bit search between uint32 keys lo <= hi starts: (v, b), v their common high bits
        with the bits below zero, b the highest bit where they differ (-1 when lo == hi: nothing to search)."""
        diff = hi ^ lo
        top = _highest_bit(diff)
        free = tl.where(diff == 0, 0, (tl.full((), 2, tl.int64) << top.to(tl.int64)) - 1)  # the bits still open
        v = (lo.to(tl.int64) & (4294967295 - free)).to(tl.uint32)
        return v, tl.where(diff == 0, -1, top)

    @triton.jit
    def _cut_u32(u, K, n):
        """For uint32 u (0 = empty) with n > 0 nonzero and K <= n: (V, c) with c = #(u >= V) >= K, V >= 1, and
        either c == K (the K largest are exactly u >= V) or V is the K-th largest value (ties at V). Greedy over
        the bits from the highest one where the largest and smallest nonzero values differ; stops as soon as
        the count is exactly K (about log2(n) steps on distinct values), one count a step."""
        hi = tl.max(u, axis=0)
        lo = tl.min(tl.where(u > 0, u, hi), axis=0)
        v, b = _greedy_start(lo, hi)
        # K == n: every nonzero value is among the K largest, so V = lo. The greedy's start (lo and hi's common
        # high bits) is 0 when they differ in the top bit (logits of both signs), and a caller's u >= V would then
        # take the empty slots too: a row with exactly r samples got a NaN threshold and was redone (found on H200
        # 2026-12-04: rows 4064..4095 of every layer's first 16K chunk, 32 of 128 samples a row)
        v = tl.where(n == K, lo, v)
        c = n
        while (b >= 0) & (c != K):
            cand = v | (tl.full((), 1, tl.uint32) << b.to(tl.uint32))
            cc = tl.sum((u >= cand).to(tl.int32), axis=0)
            v = tl.where(cc >= K, cand, v)
            c = tl.where(cc >= K, cc, c)
            b -= 1
        return v, c

    @triton.jit
    def _max_min_add(a_hi, a_lo, a_n, b_hi, b_lo, b_n):
        return tl.maximum(a_hi, b_hi), tl.minimum(a_lo, b_lo), a_n + b_n

    @triton.jit
    def _from_order_f32(u):
        """The inverse of ``_order_u32`` on real values: uint32 order key -> fp32 (the key of +-0.0 -> +0.0, and
        the one key between -0.0 and +0.0's, which no value has, -> -0.0: compares the same)."""
        s = u.to(tl.int32, bitcast=True) ^ -2147483648
        return tl.where(s < 0, s ^ 0x7FFFFFFF, s).to(tl.float32, bitcast=True)

    @triton.jit(do_not_specialize=["N", "K", "off_scalar", "CAPS", "skv"])
    def _select_candidates_kernel(words_ptr, cnt_ptr, ks_ptr, ke_ptr, redo_ptr, any_ptr, off_ptr, out_ptr, N, K,
                                  off_scalar, CAPS, skv, M: tl.constexpr, NS: tl.constexpr, FLAG: tl.constexpr,
                                  HAS_OFF: tl.constexpr, CH: tl.constexpr):
        """One row of N int64 candidates (raw fp32 logit bits high, column low; EMPTY_KEY empty), read as int32
        words (column at 2i, logit bits at 2i + 1): the columns of its K largest by (logit desc, column desc),
        + offset, in candidate order, -1 padded.

        The row's logits stay in registers as fp32 (an empty slot is NaN, which no comparison takes). The search
        is the greedy of ``_cut_u32`` on the logits' order keys, each step one count of f >= the key's fp32 value
        (exact: the order key is a bijection onto the real values, and a key the row's [lo, hi] does not reach
        needs no count). The tie pass and the output read the words again in CH-slot chunks, in loops the
        compiler does not unroll: ~126 registers a thread at 4 warps, 4 programs an SM (227 registers, 2
        programs, when the whole row's columns and positions were live at once). Tried and dropped (H200
        2026-12-03, 8K rows of 16 x 448): packing the last <= 256 open slots to step over them alone, 0.50 vs
        0.40 ms; the search in uint32 keys (5 ops a slot more to make them), 0.43 ms; 2 bits a step (three
        counts in one 3-way reduction), 0.51 ms: the kernel is issue-bound, so fewer reductions for more
        compares do not pay.
        FLAG: the row's NS stream counts (cnt [S, NS]) give its redo flag (int32: fewer candidates than the row's
        min(K, keys in [ks, ke) within [0, skv)), or a stream past its CAPS slots), written for the redo launch,
        and any_ptr [1] counts the flagged rows (the redo launch's programs exit at once when it stays 0)."""
        row = tl.program_id(0)
        words = words_ptr + row.to(tl.int64) * N * 2
        j = tl.arange(0, M)
        f = tl.load(words + 2 * j + 1, mask=j < N, other=-1).to(tl.float32, bitcast=True)  # [M], NaN: empty
        real = f == f
        hi_f, lo_f, n = tl.reduce((tl.where(real, f, float("-inf")), tl.where(real, f, float("inf")),
                                   real.to(tl.int32)), 0, _max_min_add)
        if FLAG:
            cnt = tl.load(cnt_ptr + row * NS + tl.arange(0, NS))                       # [NS] int32
            kv = tl.minimum(tl.maximum(tl.load(ke_ptr + row), 0), skv)
            ksv = tl.minimum(tl.maximum(tl.load(ks_ptr + row), 0), skv)
            need = tl.minimum(tl.maximum(kv - ksv, 0), K)
            redo = (tl.sum(cnt, axis=0) < need) | (tl.max(cnt, axis=0) > CAPS)
            tl.store(redo_ptr + row, redo.to(tl.int32))
            tl.atomic_add(any_ptr, 1, mask=redo)
        # the row takes f >= vf, except that among f == vf only columns + 1 >= tie_col (0: all of them)
        vf = tl.full((), float("-inf"), tl.float32)
        tie_col = tl.zeros((), tl.uint32)
        if n > K:
            hi = _order_u32(hi_f.to(tl.int32, bitcast=True))
            lo = _order_u32(lo_f.to(tl.int32, bitcast=True))
            v, b = _greedy_start(lo, hi)
            c = n  # slots with key >= v
            while (b >= 0) & (c != K):
                cand = v | (tl.full((), 1, tl.uint32) << b.to(tl.uint32))
                if cand <= lo:  # every slot's key is >= cand: no count needed
                    v = cand
                elif cand <= hi:  # (above hi: no slot, the bit stays 0)
                    cc = tl.sum((f >= _from_order_f32(cand)).to(tl.int32), axis=0)
                    v = tl.where(cc >= K, cand, v)
                    c = tl.where(cc >= K, cc, c)
                b -= 1
            vf = _from_order_f32(v)
            if c > K:  # ties at the K-th logit vf: of those, the higher columns (rare: reads the words again,
                # so that f is dead after the search and its registers free for the chunk loops)
                gt = tl.zeros((), tl.int32)  # slots above vf
                top_col = tl.zeros((), tl.int32)  # the largest tied column + 1, for the greedy's first bit
                for t0 in range(0, M, CH):
                    jt = t0 + tl.arange(0, CH)
                    ft = tl.load(words + 2 * jt + 1, mask=jt < N, other=-1).to(tl.float32, bitcast=True)
                    gt += tl.sum((ft > vf).to(tl.int32), axis=0)
                    top_col = tl.maximum(top_col, tl.max(tl.load(words + 2 * jt, mask=ft == vf, other=-1) + 1, axis=0))
                need_t = K - gt
                tc = c - gt  # the tied slots; distinct columns, so the greedy ends at exactly need_t
                tb = _highest_bit(top_col.to(tl.uint32, bitcast=True))
                while (tb >= 0) & (tc != need_t):
                    cand = tie_col | (tl.full((), 1, tl.uint32) << tb.to(tl.uint32))
                    cc = tl.zeros((), tl.int32)
                    for t0 in range(0, M, CH):
                        jt = t0 + tl.arange(0, CH)
                        eq = tl.load(words + 2 * jt + 1, mask=jt < N, other=-1).to(tl.float32, bitcast=True) == vf
                        col1 = (tl.load(words + 2 * jt, mask=eq, other=-1) + 1).to(tl.uint32, bitcast=True)
                        cc += tl.sum((eq & (col1 >= cand)).to(tl.int32), axis=0)
                    tie_col = tl.where(cc >= need_t, cand, tie_col)
                    tc = tl.where(cc >= need_t, cc, tc)
                    tb -= 1
        if HAS_OFF:
            off = tl.load(off_ptr + row)
        else:
            off = off_scalar
        out_row = out_ptr + row.to(tl.int64) * K
        done = tl.zeros((), tl.int32)  # columns written so far
        for c0 in range(0, M, CH):
            jj = c0 + tl.arange(0, CH)
            ff = tl.load(words + 2 * jj + 1, mask=jj < N, other=-1).to(tl.float32, bitcast=True)
            sel = ff >= vf  # NaN (empty): never
            if tie_col > 0:
                tied = tl.load(words + 2 * jj, mask=ff == vf, other=-1) + 1
                sel = (ff > vf) | ((ff == vf) & (tied.to(tl.uint32, bitcast=True) >= tie_col))
            pos = done + tl.cumsum(sel.to(tl.int32), axis=0) - 1
            col = tl.load(words + 2 * jj, mask=sel, other=0)
            tl.store(out_row + pos, col + off, mask=sel)
            done += tl.sum(sel.to(tl.int32), axis=0)
        for c0 in range(0, K, CH):
            jo = c0 + tl.arange(0, CH)
            tl.store(out_row + jo, tl.full((CH,), -1, tl.int32), mask=(jo >= done) & (jo < K))

    @triton.jit(do_not_specialize=["N", "R"])
    def _row_threshold_kernel(x_ptr, thr_ptr, N, R, M: tl.constexpr):
        """One row of N fp32 logits (-inf outside the row): its R-th largest finite value, or -inf when fewer
        than R are finite."""
        row = tl.program_id(0)
        j = tl.arange(0, M)
        x = tl.load(x_ptr + row.to(tl.int64) * N + j, mask=j < N, other=float("-inf"))
        u = tl.where(x > float("-inf"), _order_u32(x.to(tl.int32, bitcast=True)), 0)  # 0: outside the row
        t = tl.full((), float("-inf"), tl.float32)
        n = tl.sum((u > 0).to(tl.int32), axis=0)
        if n >= R:
            v, _ = _cut_u32(u, R, n)
            # the R-th largest: the smallest of the values >= v (v itself when it is tied)
            sv = tl.min(tl.where(u >= v, u, 0xFFFFFFFF), axis=0).to(tl.int32, bitcast=True) ^ -2147483648
            t = tl.where(sv < 0, sv ^ 0x7FFFFFFF, sv).to(tl.float32, bitcast=True)
        tl.store(thr_ptr + row, t)


def candidate_keys(values: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The int64 candidates the filter kernel stores: raw fp32 bits of ``values`` high, ``cols`` low."""
    return (values.float().contiguous().view(torch.int32).long() << 32) | cols.long()


@dataclass
class _SelectLaunch:
    """A select launch's arguments, prepared once for either kernel (``_select_launch``)."""
    flat: torch.Tensor          # [S, N] int64 candidates, contiguous
    n: int                      # candidate slots a row
    ns: int                     # streams a row (1 without counts)
    caps: int                   # slots a stream
    cnt: torch.Tensor           # the filter's counts (or a placeholder when FLAG is off)
    ks: torch.Tensor
    ke: torch.Tensor
    redo: torch.Tensor
    redo_any: torch.Tensor
    off: torch.Tensor           # per-row offsets (or a placeholder when has_off is False)
    off_scalar: int
    has_off: bool
    flag: bool


def _select_launch(name: str, cand, offset, out, counts, ks, ke, redo, redo_any) -> _SelectLaunch:
    """The shared argument checks and preparation of ``select_candidates_triton`` / ``select_candidates_gluon``
    (``name`` for the error)."""
    s = cand.shape[0]
    has_off = isinstance(offset, torch.Tensor)
    off_t = offset.to(device=cand.device, dtype=torch.int32).contiguous() if has_off else out
    flat = cand.reshape(s, -1).contiguous()
    n = flat.shape[1]
    if counts is None:
        return _SelectLaunch(flat, n, 1, n, out, out, out, out, out, off_t, 0 if has_off else int(offset), has_off,
                             False)
    if redo is None or ks is None or ke is None or cand.dim() != 3:
        raise ValueError(f"{name}: counts= takes the [S, streams, caps] candidates, ks=, ke= and the redo= output")
    any_t = redo_any if redo_any is not None else torch.zeros(1, dtype=torch.int32, device=cand.device)
    return _SelectLaunch(flat, n, cand.shape[1], cand.shape[2], counts.contiguous(), ks.contiguous(),
                         ke.contiguous(), redo, any_t, off_t, 0 if has_off else int(offset), has_off, True)


def select_candidates_triton(cand: torch.Tensor, k: int, offset=0, out: torch.Tensor | None = None,
                             counts: torch.Tensor | None = None, ks: torch.Tensor | None = None,
                             ke: torch.Tensor | None = None, redo: torch.Tensor | None = None,
                             n_keys: int = 0, redo_any: torch.Tensor | None = None, num_warps: int | None = None,
                             chunk: int | None = None) -> torch.Tensor:
    """Triton select: cand int64 [S, N] (``candidate_keys``: raw logit bits high, column low; EMPTY_KEY empty)
    or the filter's [S, streams, caps] -> int32 [S, k], each row the columns of its k largest (logit, column)
    pairs (+ offset, int or [S]), in candidate order, -1 padded. With the filter's ``counts`` int32 [S, streams]
    (and ks, ke, n_keys), ``redo`` int32 [S] gets each row's flag: fewer candidates than min(k, keys in [ks, ke)
    clamped to [0, n_keys)), or a stream that overflowed its caps slots; ``redo_any`` (int32 [1], zeroed by the
    caller) gets the number of flagged rows added. ``num_warps`` (default 4) and ``chunk`` (slots a chunk of the
    output pass, default 1024): for benchmarks."""
    s = cand.shape[0]
    out = torch.empty(s, k, dtype=torch.int32, device=cand.device) if out is None else out
    if s == 0:
        return out
    a = _select_launch("select_candidates_triton", cand, offset, out, counts, ks, ke, redo, redo_any)
    m = max(16, triton.next_power_of_2(a.n))
    words = a.flat.view(torch.int32)  # [S, 2N]: little-endian, the column word first
    _select_candidates_kernel[(s,)](words, a.cnt, a.ks, a.ke, a.redo, a.redo_any, a.off, out, a.n, k, a.off_scalar,
                                    a.caps, n_keys, M=m, NS=a.ns, FLAG=a.flag, HAS_OFF=a.has_off,
                                    CH=min(m, chunk or 1024), num_warps=num_warps or 4)
    return out


def select_candidates_gluon(cand: torch.Tensor, k: int, offset=0, out: torch.Tensor | None = None,
                            counts: torch.Tensor | None = None, ks: torch.Tensor | None = None,
                            ke: torch.Tensor | None = None, redo: torch.Tensor | None = None, n_keys: int = 0,
                            redo_any: torch.Tensor | None = None, num_warps: int = 4,
                            slots_per_thread: int | None = None) -> torch.Tensor:
    """``select_candidates_triton`` (same arguments and results, same order) by the Gluon kernel
    (``select_gluon._select_gluon_kernel``). ``num_warps`` and ``slots_per_thread`` (a power of two: consecutive
    slots a thread scans; default ``select_gluon.SLOTS_PER_THREAD``): for benchmarks."""
    from .select_gluon import SLOTS_PER_THREAD, _select_gluon_kernel, select_pieces

    s = cand.shape[0]
    out = torch.empty(s, k, dtype=torch.int32, device=cand.device) if out is None else out
    if s == 0:
        return out
    a = _select_launch("select_candidates_gluon", cand, offset, out, counts, ks, ke, redo, redo_any)
    spt = slots_per_thread or SLOTS_PER_THREAD
    r0, r1, r2 = select_pieces(a.n, num_warps)  # each warp's segment: rows of 32 slots, up to three pieces
    seg = 32 * (r0 + r1 + r2)
    _select_gluon_kernel[(s,)](a.flat.view(torch.int32), a.flat, a.cnt, a.ks, a.ke, a.redo, a.redo_any, a.off, out,
                               a.n, k, a.off_scalar, a.caps, n_keys, R0=r0, R1=r1, R2=r2, NS=a.ns, FLAG=a.flag,
                               HAS_OFF=a.has_off, SPT=spt, EVEN=a.n == seg * num_warps and seg % (32 * spt) == 0,
                               num_warps=num_warps)
    return out


def row_thresholds_triton(x: torch.Tensor, r: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``row_thresholds`` by the Triton kernel (the one the CPU interpreter tests)."""
    return row_thresholds(x, r, out, kernel="triton")


def row_thresholds(x: torch.Tensor, r: int, out: torch.Tensor | None = None, kernel: str = "triton"
                   ) -> torch.Tensor:
    """Per row of fp32 x [S, N] (-inf outside the row) its r-th largest finite value, -inf when fewer than r are
    finite -> fp32 [S]. ``kernel``: "triton" (``_row_threshold_kernel``, 4-8 warps a row) or "gluon"
    (``select_gluon._row_threshold_gluon_kernel``, one warp per 2048 samples; same results)."""
    s, n = x.shape
    out = torch.empty(s, dtype=torch.float32, device=x.device) if out is None else out
    if s == 0:
        return out
    if n == 0:
        return out.fill_(float("-inf"))
    if kernel == "gluon":
        from .select_gluon import _row_threshold_gluon_kernel, row_threshold_warps

        m = max(32, triton.next_power_of_2(n))
        _row_threshold_gluon_kernel[(s,)](x.contiguous(), out, n, r, M=m, num_warps=row_threshold_warps(m))
        return out
    m = max(16, triton.next_power_of_2(n))
    _row_threshold_kernel[(s,)](x.contiguous(), out, n, r, M=m, num_warps=8 if m >= 4096 else 4)
    return out


@dataclass(frozen=True)
class ThresholdTopkConfig:
    """Knobs of ``mqa_topk_threshold``.

    stride: every stride-th key is sampled (the sample costs ~1/stride of the logits); margin: T lets about
    margin x k keys of a row through, so a row is redone when fewer than k pass (about (margin - 1) sqrt(margin k
    / stride) standard deviations away: 5.7 at the defaults, k = 2048); caps: candidate slots per stream (16
    streams a query, each ~1/16 of the passing keys: 256 expected at the defaults, so a stream overflows only
    7 standard deviations of the row's count up); rows: queries per sample block (bounds the [rows, keys /
    stride] fp32 sample logits).

    A redone row costs about one query block of the fused Triton kernel on one SM (~2 ms at 64K keys: measured
    8.15 vs 6.00 ms with 2 redone rows of 8192, stride 32 / margin 1.5, H200 2026-12-03), hence the wide margin.
    Measured at 8K x 64K causal, H = 64 (same run, Gluon logits alone 8.69 ms): stride 16 / margin 1.5 / caps 320
    9.99 ms, stride 32 / margin 2.0 / caps 384 9.79 ms; caps 448 keeps the latter's M = 8192 select width.

    select: which kernels do the per-row selections (each row's threshold from its sample, and its top-k from
    its candidates): "gluon" (``select_gluon``: explicit layouts, fewer instructions, one-warp rows for the
    threshold), "triton" (``_row_threshold_kernel`` and ``_select_candidates_kernel``, the ones the CPU
    interpreter tests), or "auto" (gluon where it runs). Same results; the select lists the same columns in the
    same order.

    filter_config: the filter kernel's launch knobs (``indexer_logits_hopper.LogitsHopperConfig``: ring depth,
    ordered MMA issues, consumer registers; none changes a candidate)."""

    stride: int = 32
    margin: float = 2.0
    caps: int = 448
    rows: int = 4096
    select: str = "auto"
    filter_config: LogitsHopperConfig = LogitsHopperConfig()


def sample_ranks(k: int, cfg: ThresholdTopkConfig) -> int:
    """r: T is a row's r-th largest sampled logit, r = ceil(margin k / stride) (a row with fewer valid samples
    gets T = -inf: all its keys pass)."""
    return max(1, math.ceil(cfg.margin * k / cfg.stride))


def sample_thresholds(q_fp8, k_fp8, k_scale, weights, ks, ke, k: int, cfg: ThresholdTopkConfig,
                      num_sms: int | None = None) -> torch.Tensor:
    """Step 1 of ``mqa_topk_threshold``: T [S] fp32, each row's r-th largest logit (``sample_ranks``) among keys
    0, stride, 2 stride, ... of its [ks, ke); -inf where fewer than r of them are in the row. Sample i is in the
    row when ks <= i * stride < ke: ``mqa_logits(key_stride=stride)``, whose Triton kernel reads those keys in place
    (no gathered copy, no range arithmetic: ~10 small launches a call fewer), ``cfg.rows`` queries at a time."""
    from . import mqa_logits

    s, skv = q_fp8.shape[0], k_fp8.shape[0]
    r = sample_ranks(k, cfg)
    thr = torch.full((s,), float("-inf"), dtype=torch.float32, device=q_fp8.device)
    if -(-skv // cfg.stride) < r:  # fewer samples than r in any row
        return thr
    rows_kernel = "gluon" if use_gluon_rows(cfg.select, q_fp8) else "triton"
    for r0 in range(0, s, cfg.rows):
        r1 = min(s, r0 + cfg.rows)
        sample = mqa_logits(q_fp8[r0:r1], k_fp8, k_scale, weights[r0:r1], ks[r0:r1], ke[r0:r1], num_sms=num_sms,
                            key_stride=cfg.stride)  # [rows, n_s], -inf outside each row's samples
        row_thresholds(sample, r, out=thr[r0:r1], kernel=rows_kernel)
        del sample  # one sample block alive at a time
    return thr


def use_gluon_rows(select: str, t: torch.Tensor) -> bool:
    """Whether ``ThresholdTopkConfig.select`` runs the Gluon row kernels (``select_gluon``: the sample's row
    thresholds and the candidates' select) on tensors like ``t``: an error naming the choices for an unknown name,
    or the reason where "gluon" cannot run."""
    from . import select_gluon

    if select not in SELECT_KERNELS:
        raise ValueError(f"unknown select kernel {select!r}; choose one of {SELECT_KERNELS}")
    if select == "triton":
        return False
    reason = select_gluon.unsupported_reason(t)
    if reason is not None and select == "gluon":
        raise ValueError(f"select='gluon' cannot run here: {reason}")
    return reason is None


def select_fn(select: str, cand: torch.Tensor):
    """The select kernel's launcher for ``ThresholdTopkConfig.select`` on these candidates."""
    return select_candidates_gluon if use_gluon_rows(select, cand) else select_candidates_triton


def mqa_topk_threshold(q_fp8, k_fp8, k_scale, weights, ks, ke, k: int, offset=0, num_sms: int | None = None,
                       config: ThresholdTopkConfig | None = None, stats: dict | None = None,
                       mark=None, redo_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The indexer top-k of ``kernels.mqa_topk_indices`` (same inputs, contiguous; int32 [S, k], -1 padded, ties
    to the higher column) by a per-row threshold, on Hopper (the Gluon logits kernel, H <= 64). A row lists its
    columns in candidate order (stream by stream; a redone row: descending), the same on every run. No [S, Skv]
    buffer: the sample [rows, Skv / stride] fp32 a block of rows and the candidates [S, 16, caps] int64.
    ``stats`` (a dict) gets the device tensors ``redo`` [S] bool and ``count`` [S] (candidates a row) for tests
    and benchmarks; nothing is read back to the host. ``mark`` (name -> context manager, e.g. the engine's
    ``profiling.phase``) wraps the work that only serves the selection (sample, select, redo) in a "topk" region,
    so that a breakdown can tell it from the filter, which is the logits kernel plus one compare a logit.
    ``redo_rows`` (a device int64 [1] counter) gets the number of redone rows added, without a host sync."""
    from .indexer_logits_hopper import mqa_threshold_candidates
    from .indexer_topk import mqa_topk_triton

    cfg = config or ThresholdTopkConfig()
    s, skv = q_fp8.shape[0], k_fp8.shape[0]
    dev = q_fp8.device
    out = torch.empty(s, k, dtype=torch.int32, device=dev)
    if s == 0:
        return out
    mark = mark or contextlib.nullcontext  # nullcontext(name): a no-op region
    # 1. thresholds from a sample of the keys
    with mark("topk"):
        thr = sample_thresholds(q_fp8, k_fp8, k_scale, weights, ks, ke, k, cfg, num_sms=num_sms)
    # 2. the filter: every valid key with logit >= T, as (logit, column) int64 keys
    cand, count = mqa_threshold_candidates(q_fp8, k_fp8, k_scale, weights, ks, ke, thr, cfg.caps, num_sms=num_sms,
                                           config=cfg.filter_config)
    with mark("topk"):
        redo = torch.empty(s, dtype=torch.int32, device=dev)  # [S]: the candidates miss part of the row's top-k
        redo_any = torch.zeros(1, dtype=torch.int32, device=dev)  # flagged rows (0: the redo launch exits at once)
        # 3. the exact top-k of each row's candidates: its k largest keys are its k largest (logit, column) pairs
        select_fn(cfg.select, cand)(cand, k, offset, out=out, counts=count, ks=ks, ke=ke, redo=redo, n_keys=skv,
                                    redo_any=redo_any)
        # 4. the rows the candidates do not settle: their blocks exactly, by the fused Triton kernel (its programs
        # exit at once when redo_any is 0, the usual case)
        mqa_topk_triton(q_fp8, k_fp8, k_scale, weights, ks, ke, k, offset, num_sms=num_sms, need=redo, out=out,
                        need_any=redo_any)
        if redo_rows is not None:
            redo_rows += redo_any
    if stats is not None:
        stats.update(redo=redo.bool(), count=count.sum(1))
    return out
