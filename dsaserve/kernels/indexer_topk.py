"""Fused indexer top-k in Triton: the top-k keys per query straight from q and k, no [S x Skv] logits.

The kernel is the persistent prefill logits kernel (``indexer_logits``: a program owns BQ queries and
walks all their key tiles, tile product K @ Q^T, same epilogue, so the logits are the same numbers) with
a streaming selection per query row in place of the [S, Skv] output:

* Key tiles are visited from the highest column down, in segments of up to R tiles. The segment's loop is
  the logits kernel's, storing each [BK, BQ] logits tile into a per-program ring of R tiles (L2-resident)
  instead of the output; it holds no selection code, so Triton software-pipelines it exactly like the
  logits kernel (a loop with a nested loop or a barrier is not pipelined; benchmarks/compile_report.py
  shows what the compiler made of it).
* After a segment all BQ rows' new logits are filtered at once (in ``filter_parts`` parts of at most 32
  values a thread): keys (uint32, order-preserving) above the row's threshold ``thr`` are appended to its
  candidate list (C slots in a per-program workspace), in descending column order.
* A list with more than C - R * BK entries (the next segment could overflow it) is cut in place: a search
  on the key finds T <= the k-th largest listed key with k <= count(>= T) <= k + SLACK (or T exact); the
  list keeps keys >= T (ties at an exact T cut in list order, i.e. to the highest columns, k in total) and
  thr = T. A later key equal to T can be dropped: k listed keys >= T sit at higher columns and win the tie.
* After the last segment the same cut with SLACK = 0 leaves exactly min(k, count) entries, written out
  with the offset, -1 padded.

The cut (``TopkConfig.cut``): "radix16" (``_cut16``) loops over the n live entries in chunks of
CH = 1024 slots, never over all C: a max pass sizes the first window, then a 16-ary search, 4 bits of the
key a pass (per key one 64-bit add into sixteen 4-bit counters a thread, one reduction a pass: at most 8
passes, usually 2-4 for an intermediate cut, vs 32 bisection steps), then one keep pass (a scan of packed
(>, ==) counts a chunk). "bisect" (``_cut``, the previous cut, kept for the ablation) loads all C slots into
registers (64 a thread at C = 8192) and bisects 32 times over them. Both keep the same entries in the same
order. On H200 (session 7) radix16 is 19% faster at 32 heads and 3% slower at 64 (its key loop compiled
longer), so ``default_config`` picks it below 64 heads only (benchmarks/KERNELS_NOTES.md).

Tie rule (``reference.select_topk_ordered``): among equal logits the higher column wins; the selected set is
unique. Memory: the output [S, k] int32 plus the workspace, programs x BQ x (C x 8 + R x BK x 4) bytes
(~74 MB at k = 2048 on 132 SMs), independent of S and Skv. Rows come out in descending column order.
Speed and the profile of where the time goes (H200, 2026-12-02): benchmarks/KERNELS_NOTES.md.
Columns outside a row's range have logit -inf, whose key the threshold starts at, so they are never
listed (a valid column is listed only with a finite or NaN logit, which finite inputs always give).
"""

from __future__ import annotations

import dataclasses
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
    cut: str = "radix16"  # list cut: "radix16" (chunked 16-ary search over the live entries), "bisect" (old)
    cut_chunk: int = 1024  # radix16: list slots a chunk (a power of two; raised to C / 15 if below)
    slack: int | None = None  # entries above k an intermediate cut may keep (None: cut_slack, the most that fits)


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


def cut_chunk(c: int, chunk: int) -> int:
    """Chunk of the radix16 cut for a list of c slots: a power of two with c / chunk <= 15 (a per-thread
    4-bit counter sees at most one key per chunk) and <= c."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"cut_chunk must be a power of two, got {chunk}")
    return min(max(chunk, triton.next_power_of_2(-(-c // 15))), c)


FILTER_VALUES = 32  # logits a thread in one part of a segment's filter pass


def filter_parts(bq: int, bk: int, ring_tiles: int, num_warps: int) -> int:
    """Parts a segment's filter pass is split into (a power of two, at most R): at most FILTER_VALUES a thread
    in each ([BQ, R * BK] at BQ = 8 is 64 a thread; in one part its registers spilled into the key loop)."""
    return max(1, min(ring_tiles, bq * ring_tiles * bk // (FILTER_VALUES * 32 * num_warps)))


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

    @triton.jit
    def _load_keys(key_ptr, c0, n, CH: tl.constexpr, VEC: tl.constexpr):
        """Slots [c0, c0 + CH) of a list as uint32 keys, 0 past n (0 is below every threshold). VEC: the list
        is 16-byte aligned and c0 a multiple of 4, so a mask constant over 4 slots (up to n rounded up to 4)
        lets the loads vectorise; the caller has zeroed the free slots in [n, n4)."""
        j = tl.arange(0, CH)
        if VEC:  # the slots in [n, n4) hold 0 (``_cut16`` writes them first)
            n4 = tl.multiple_of((n + 3) // 4 * 4, 4)
            key = tl.load(tl.multiple_of(key_ptr, 16) + c0 + j, mask=c0 + j < n4, other=0)
        else:
            key = tl.load(key_ptr + c0 + j, mask=c0 + j < n, other=0)
        return key.to(tl.uint32, bitcast=True)

    @triton.jit
    def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
        return a0 + b0, a1 + b1, a2 + b2, a3 + b3

    @triton.jit
    def _count16(key_ptr, n, lo, sh, CH: tl.constexpr, VEC: tl.constexpr):
        """One pass over the n listed keys (chunks of CH, per-thread partial counts, one reduction at the end):
        the histogram of the digit min((key - lo) >> sh, 15) over the keys >= lo (keys below lo land in bin
        0, which no threshold above lo counts), as four uint64 W0..W3: bin d in the 16-bit field d // 4 of
        W[d % 4].

        Per key one 64-bit add of 1 << 4 * digit: sixteen 4-bit counters a thread, each counting at most one
        key per chunk (C / CH <= 15, the launcher checks it); they are widened to 16-bit fields (n < 65536)
        before the cross-thread sum."""
        acc = tl.zeros((CH,), tl.uint64)
        for c0 in range(0, n, CH):
            key = _load_keys(key_ptr, c0, n, CH, VEC)
            dg = tl.minimum((tl.maximum(key, lo) - lo) >> sh, 15)
            acc += tl.full((CH,), 1, tl.uint64) << (dg.to(tl.uint64) << 2)
        f = 0x000F000F000F000F
        return tl.reduce((acc & f, (acc >> 4) & f, (acc >> 8) & f, (acc >> 12) & f), 0, _add4)

    @triton.jit
    def _pick16(w, f: tl.constexpr, d: tl.constexpr, suf, dsel, nsel, K):
        """Scan step for bin d = 4 f + (the word's index), bins visited from 15 down: suf = count(digit >= d);
        the first (highest) d >= 1 with suf >= K is the new window's digit (count(>= lo + d << sh) = suf)."""
        suf += ((w >> (16 * f)) & 0xFFFF).to(tl.int32)
        if d > 0:
            hit = (suf >= K) & (dsel == 0)
            dsel = tl.where(hit, d, dsel)
            nsel = tl.where(hit, suf, nsel)
        return suf, dsel, nsel

    @triton.jit(noinline=True)
    def _compact16(key_ptr, col_ptr, n, lo, need, dst_ptr, col_off, PAD, CH: tl.constexpr, IN_PLACE: tl.constexpr):
        """``_cut16``'s keep pass over the n listed entries, CH at a time in list order: keys > lo, and keys ==
        lo while their rank among the ties is below need. IN_PLACE: packed to the front of the list, else
        the columns + col_off to dst_ptr and -1 up to PAD. Returns the kept count."""
        kept = tl.full((), 0, tl.int32)
        eq_seen = tl.full((), 0, tl.int32)  # ties at T in earlier chunks
        j = tl.arange(0, CH)
        # (the scattered stores take a layout of one element a thread, so keys, columns, mask and pointers are
        # converted through shared memory before them; loading in that layout instead, i.e. an index the
        # compiler cannot prove contiguous, saved those barriers but cost 60% more instructions a chunk: the
        # scan then runs over 8 separate repetitions a thread)
        for c0 in range(0, n, CH):
            live = c0 + j < n
            key = tl.load(key_ptr + c0 + j, mask=live, other=0).to(tl.uint32, bitcast=True)  # 0 < lo
            col = tl.load(col_ptr + c0 + j, mask=live, other=0)
            gt = key > lo
            eq = key == lo
            both = gt.to(tl.int32) + (eq.to(tl.int32) << 16)  # one scan for both counts (CH < 65536)
            run = tl.cumsum(both, 0)  # inclusive: (gt, eq) up to each entry of the chunk
            eq_run = eq_seen + (run >> 16)
            keep = gt | (eq & (eq_run <= need))
            # kept before this entry: earlier chunks, this chunk's gt, and this chunk's ties within need
            slot = kept + (run & 0xFFFF) + tl.minimum(eq_run, need) - tl.minimum(eq_seen, need) - 1
            tot = tl.sum(both, 0)
            if IN_PLACE:
                tl.debug_barrier()  # every thread has read the chunk before it is rewritten
                tl.store(key_ptr + slot, key.to(tl.int32, bitcast=True), mask=keep)
                tl.store(col_ptr + slot, col, mask=keep)
            else:
                tl.store(dst_ptr + slot, col + col_off, mask=keep)
            kept += (tot & 0xFFFF) + tl.minimum(eq_seen + (tot >> 16), need) - tl.minimum(eq_seen, need)
            eq_seen += tot >> 16
        if not IN_PLACE:
            for c0 in range(kept, PAD, CH):
                tl.store(dst_ptr + c0 + j, tl.full((CH,), -1, tl.int32), mask=c0 + j < PAD)
        return kept

    @triton.jit(noinline=True)
    def _cut16(key_ptr, col_ptr, n, thr, K, SLACK, dst_ptr, col_off, PAD, CH: tl.constexpr, IN_PLACE: tl.constexpr,
               VEC: tl.constexpr):
        """``_cut``'s result (same T rule, same kept entries, same order) with work proportional to the n live
        entries: every pass loops over the list in chunks of CH slots up to n, never over all C slots.

        Search: 16-ary on the key, 4 bits per pass. Invariant: count(>= lo) = n_lo >= K (or n_lo = n <= K +
        SLACK: no pass) and count(>= lo + 16 << sh) < K, so T is in [lo, lo + 16 << sh). A first pass finds
        the largest key (the first window is the smallest that holds it: a list spans a few binades, so the
        sign and exponent digits need no pass); each pass counts the keys per digit (``_count16``, one
        reduction) and moves lo to the highest threshold lo + d << sh still counting >= K. Stops once n_lo
        <= K + SLACK (T = lo need not be exact) or after the sh = 0 pass (T exact; at most 8 passes for
        32-bit keys, vs 32 bisection steps). Keep (one chunked pass, list order): keys > T, and keys == T
        while their rank among the ties is below ``need`` (unlimited unless T is exact and n_lo > K +
        SLACK; then need = K - count(> T), one more counting pass). IN_PLACE: the kept entries are packed to
        the front of the list (a slot never passes its source index, so a chunk only overwrites slots
        already read, behind a barrier); else the kept columns + col_off go to dst_ptr, followed by -1 up to
        PAD. VEC: the lists are 16-byte aligned (``_load_keys``). Returns (kept count, T as int32 bits)."""
        j = tl.arange(0, CH)
        lo = thr.to(tl.uint32, bitcast=True)
        n_lo = n
        sh = tl.full((), 28, tl.int32)
        if n > K + SLACK:
            if VEC:  # the free slots up to n rounded up to 4 (stale entries of earlier cuts) hold key 0
                t4 = tl.arange(0, 4)
                tl.store(key_ptr + n + t4, tl.zeros((4,), tl.int32), mask=n + t4 < (n + 3) // 4 * 4)
                tl.debug_barrier()
            top = tl.zeros((CH,), tl.uint32)
            for c0 in range(0, n, CH):
                top = tl.maximum(top, _load_keys(key_ptr, c0, n, CH, VEC))
            span = tl.max(top, 0) - lo
            while (sh > 0) & ((span >> tl.maximum(sh - 4, 0)) < 16):  # smallest window [lo, lo + 16 << sh) > top
                sh -= 4
        while (sh >= 0) & (n_lo > K + SLACK):
            w0, w1, w2, w3 = _count16(key_ptr, n, lo, sh, CH, VEC)
            suf = tl.full((), 0, tl.int32)
            dsel = tl.full((), 0, tl.int32)
            nsel = n_lo
            suf, dsel, nsel = _pick16(w3, 3, 15, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w2, 3, 14, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w1, 3, 13, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w0, 3, 12, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w3, 2, 11, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w2, 2, 10, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w1, 2, 9, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w0, 2, 8, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w3, 1, 7, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w2, 1, 6, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w1, 1, 5, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w0, 1, 4, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w3, 0, 3, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w2, 0, 2, suf, dsel, nsel, K)
            suf, dsel, nsel = _pick16(w1, 0, 1, suf, dsel, nsel, K)
            lo += dsel.to(tl.uint32) << sh
            n_lo = nsel
            sh -= 4
        need = n  # unlimited: every tie is kept
        if n_lo > K + SLACK:  # T exact with too many ties: the first K - count(> T) of them, in list order
            ngt = tl.zeros((CH,), tl.int32)
            for c0 in range(0, n, CH):
                ngt += (_load_keys(key_ptr, c0, n, CH, VEC) > lo).to(tl.int32)
            need = K - tl.sum(ngt, 0)
        kept = _compact16(key_ptr, col_ptr, n, lo, need, dst_ptr, col_off, PAD, CH, IN_PLACE)
        return kept, lo.to(tl.int32, bitcast=True)

    # Sizes that change from call to call are not specialised on (Triton would compile a variant per
    # "divisible by 16" / "== 1" pattern, each ~5 s: a stall in the middle of serving)
    @triton.jit(do_not_specialize=["S", "SKV", "NUM_PROGS", "SPLITS", "off_scalar"])
    def _mqa_topk_kernel(
        q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, off_ptr, out_ptr, wkey_ptr, wcol_ptr, ring_ptr, need_ptr,
        any_ptr, S, SKV, K, SLACK, NUM_PROGS, off_scalar, SPLITS,
        H: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
        R: tl.constexpr, HAS_OFF: tl.constexpr, SPLIT: tl.constexpr, CUT16: tl.constexpr = False,
        CH: tl.constexpr = 1024, FILT: tl.constexpr = 1, NEED: tl.constexpr = False,
        NEED_ANY: tl.constexpr = False,
    ):
        """not SPLIT: rows' top-k columns (+ offset) to out_ptr [S, K]. SPLIT (SPLITS key splits, a run-time
        count): work item = (query block, key split); split sp walks the sp-th slice of the block's key tiles
        from the top, and its rows' top-k (uint32 key bits, 0 = empty; raw column, -1 = empty) go to slab sp of
        out_ptr / out_ptr + S * SPLITS * K ([S, SPLITS, K] each), in descending column order, for
        ``_merge_splits_topk``. CUT16: the chunked 16-ary cut (``_cut16``, CH slots a chunk), else ``_cut``.
        NEED (not SPLIT): only the query blocks with a row flagged in need_ptr [S] run and write their rows; the
        other rows of out_ptr are left as they are (the threshold top-k's exact redo of its missed rows).
        NEED_ANY: any_ptr [1] int32 says whether any row is flagged; when 0 every program exits at once (a
        launch with nothing flagged cost ~0.2 ms a 16K-row chunk walking its blocks' flags, H200 2026-12-03)."""
        pid = tl.program_id(0)
        n_qb = tl.cdiv(S, BQ)
        cols = tl.arange(0, BQ * H)  # MMA columns: (query, head) pairs
        d = tl.arange(0, D)
        kr = tl.arange(0, BK)
        rows = tl.arange(0, BQ)
        wkey_prog = wkey_ptr + pid.to(tl.int64) * (BQ * C)  # this program's BQ candidate lists
        wcol_prog = wcol_ptr + pid.to(tl.int64) * (BQ * C)
        ring = ring_ptr + pid.to(tl.int64) * (R * BQ * BK)  # [R, BQ, BK] logits of the current segment
        jc = tl.arange(0, C)
        jh = tl.arange(0, CH)
        n_sp = SPLITS if SPLIT else 1
        n_items = n_qb * n_sp
        if NEED_ANY:
            n_items = tl.where(tl.load(any_ptr) > 0, n_items, 0)
        for item in range(pid, n_items, NUM_PROGS):
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
            n_rows = tl.minimum(BQ, S - q0)
            if NEED:  # a block with no flagged row: no tiles, no output rows
                blk_need = tl.max(tl.load(need_ptr + qi, mask=qim, other=0), axis=0) > 0
                n_tiles = tl.where(blk_need, n_tiles, 0)
                n_rows = tl.where(blk_need, n_rows, 0)
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
                # filter all rows at once, FILT parts of [BQ, R * BK / FILT] logits in descending column order
                # per row (FILT > 1 when BQ * R * BK > 32 values a thread: the parts' registers stay small)
                col0 = (kb_hi - 1 - done) * BK  # column of the segment's first ring tile
                for part in tl.static_range(FILT):
                    e = part * (R * BK // FILT) + tl.arange(0, R * BK // FILT)  # a row's entries, list order
                    e_tile = e // BK
                    e_key = BK - 1 - e % BK
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
                            if CUT16:
                                n_r, t_r = _cut16(wkey_prog + r * C, wcol_prog + r * C, n_r, t_r, K, SLACK,
                                                  wcol_prog, 0, 0, CH, True, True)
                            else:
                                n_r, t_r = _cut(wkey_prog + r * C, wcol_prog + r * C, n_r, t_r, K, SLACK,
                                                wcol_prog, 0, C, True)
                            cnt = tl.where(rows == r, n_r, cnt)
                            thr = tl.where(rows == r, t_r, thr)
                tl.debug_barrier()  # the lists are visible; the ring may be overwritten
            # final cut of each row to exactly min(k, count), written as the output row (or the split's slab)
            for r in range(0, n_rows):
                row = q0 + r
                n_r = tl.sum(tl.where(rows == r, cnt, 0), 0)
                t_r = tl.sum(tl.where(rows == r, thr, 0), 0)
                if not SPLIT:
                    if HAS_OFF:
                        off = tl.load(off_ptr + row).to(tl.int32)
                    else:
                        off = off_scalar
                    out_row = out_ptr + row.to(tl.int64) * K
                    if CUT16:  # pads with -1 itself, CH at a time
                        n_out, _t = _cut16(wkey_prog + r * C, wcol_prog + r * C, n_r, t_r, K, 0, out_row, off, K,
                                           CH, False, True)
                    else:
                        n_out, _t = _cut(wkey_prog + r * C, wcol_prog + r * C, n_r, t_r, K, 0, out_row, off, C,
                                         False)
                        tl.store(out_row + jc, tl.full((C,), -1, tl.int32), mask=(jc >= n_out) & (jc < K))
                elif CUT16:
                    n_out, _t = _cut16(wkey_prog + r * C, wcol_prog + r * C, n_r, t_r, K, 0, wcol_prog, 0, 0, CH,
                                       True, True)
                    tl.debug_barrier()  # the packed list is visible
                    slab = (row.to(tl.int64) * n_sp + sp) * K
                    for c0 in range(0, K, CH):  # the list's first K slots (key 0 / column -1 past n_out)
                        got = c0 + jh < n_out
                        kk_ = tl.load(wkey_prog + r * C + c0 + jh, mask=got, other=0)
                        cc_ = tl.load(wcol_prog + r * C + c0 + jh, mask=got, other=-1)
                        tl.store(out_ptr + slab + c0 + jh, kk_, mask=c0 + jh < K)
                        tl.store(out_ptr + S.to(tl.int64) * n_sp * K + slab + c0 + jh, cc_, mask=c0 + jh < K)
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
                           HAS_OFF: tl.constexpr, CUT16: tl.constexpr = False, CH: tl.constexpr = 1024):
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
        if CUT16:
            n_out, _t = _cut16(cand_ptr + base, cand_ptr + cols_base, n, tl.full((), 0x007FFFFF, tl.int32),
                               K, 0, out_row, off, K, CH, False, False)
        else:
            n_out, _t = _cut(cand_ptr + base, cand_ptr + cols_base, n, tl.full((), 0x007FFFFF, tl.int32),
                             K, 0, out_row, off, M, False)
            tl.store(out_row + j, tl.full((M,), -1, tl.int32), mask=(j >= n_out) & (j < K))


def default_config(h: int) -> TopkConfig:
    """The engine's tiles and list cut for ``h`` indexer heads (the logits kernel's query block, so the same
    logits). Measured on H200 at 8K queries x 64K keys causal, k = 2048 (docs/BENCHMARKS.md, session 7): at
    64 heads (DeepSeek-V3.2) the bisection cut 15.26 ms vs the radix16 cut 15.76 (its key loop compiled ~5%
    longer), so 64+ heads keep the bisection cut; at 32 heads (GLM-5) radix16 10.82 ms vs bisection 13.39.
    (Best 64-head variant measured: radix16 with R = 32, capacity 4, 14.67 ms; not the default yet: twice the
    workspace, which ``memory_plan.fused_topk_workspace_bytes`` does not count, and no engine run.)"""
    bq = default_logits_config(h).bq
    return TopkConfig(bq=bq, cut="bisect" if h >= 64 else "radix16")


def mqa_topk_triton(q_fp8, k_fp8, k_scale, weights, ks, ke, k: int, offset=0, num_sms=None,
                    config: TopkConfig | None = None, need: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, need_any: torch.Tensor | None = None) -> torch.Tensor:
    """Triton launcher (inputs checked by ``dsaserve.kernels.mqa_topk_indices``) -> int32 [S, k].

    ``need`` (bool / int [S], with ``out`` [S, k] int32): recompute only the query blocks holding a flagged row,
    in place in ``out`` (every row of such a block is rewritten with its exact top-k; the others are untouched);
    no host sync, so a launch with nothing flagged costs the blocks' flag loads only, or, with ``need_any``
    (int32 [1], nonzero iff a row is flagged, e.g. from ``select_candidates_triton``), one load a program."""
    s, h, d = q_fp8.shape
    skv = k_fp8.shape[0]
    cfg = config or default_config(h)
    if need is not None:
        if out is None or tuple(out.shape) != (s, k) or out.dtype != torch.int32:
            raise ValueError("need= takes the rows' current int32 [S, k] output as out=")
        cfg = dataclasses.replace(cfg, key_splits=1)  # the split merge has no row mask
        need = need.to(torch.int32).contiguous()
    elif need_any is not None:
        raise ValueError("need_any= gates a need= launch")
    elif out is None:
        out = torch.empty(s, k, dtype=torch.int32, device=q_fp8.device)
    if s == 0:
        return out
    bq = max(cfg.bq, 16 // h if h < 16 else 1)  # MMA N = bq * H must be >= 16
    c = list_slots(k, cfg.bk, cfg.ring_tiles, cfg.capacity_factor)
    if cfg.cut not in ("radix16", "bisect"):
        raise ValueError(f"cut must be 'radix16' or 'bisect', got {cfg.cut!r}")
    cut16 = cfg.cut == "radix16"
    merge_m = triton.next_power_of_2(MAX_KEY_SPLITS * k)
    # a smaller slack: later cuts keep fewer entries (a higher threshold, fewer appends and cuts), each cut
    # searching more digits; the sets are the same for any slack
    slack = cut_slack(k, cfg.bk, cfg.ring_tiles, c)
    if cfg.slack is not None:
        if not 0 <= cfg.slack <= slack:
            raise ValueError(f"slack must be in 0..{slack} for k={k}, {c} list slots, got {cfg.slack}")
        slack = cfg.slack
    sms = num_sms if num_sms is not None else device_sm_count(q_fp8.device)
    n_qb = triton.cdiv(s, bq)
    slots = sms * cfg.ctas_per_sm
    splits = cfg.key_splits or auto_key_splits(n_qb, skv, slots, cfg.bk, cfg.ring_tiles)
    if not 1 <= splits <= MAX_KEY_SPLITS:
        raise ValueError(f"key_splits must be in 1..{MAX_KEY_SPLITS}, got {splits}")
    if cut16 and max(c, splits * k if splits > 1 else 0) >= 65536:  # the radix16 cut counts in 16-bit fields
        raise ValueError(f"radix16 cut: lists of {c} slots / {splits} x {k} merge candidates, at most 65535")
    progs = max(1, min(slots, n_qb * splits))
    ws = torch.empty(2, progs * bq * c, dtype=torch.int32, device=q_fp8.device)  # keys, columns
    ring = torch.empty(progs * cfg.ring_tiles * bq * cfg.bk, dtype=torch.float32, device=q_fp8.device)
    has_off = isinstance(offset, torch.Tensor)
    off_t = offset.to(device=q_fp8.device, dtype=torch.int32).contiguous() if has_off else ks
    # splits > 1: every (row, split)'s own top-k first ([2, S, splits, k] keys | columns), then one merge per row
    cand = out if splits == 1 else torch.empty(2, s, splits, k, dtype=torch.int32, device=q_fp8.device)
    _mqa_topk_kernel[(progs,)](
        q_fp8, k_fp8, k_scale, weights, ks, ke, off_t, cand, ws[0], ws[1], ring, need if need is not None else ks,
        need_any if need_any is not None else ks, s, skv, k, slack, progs, 0 if has_off else int(offset),
        splits, H=h, D=d, BQ=bq, BK=cfg.bk, C=c, R=cfg.ring_tiles, HAS_OFF=has_off, SPLIT=splits > 1,
        NEED=need is not None, NEED_ANY=need_any is not None,
        CUT16=cut16, CH=cut_chunk(c, cfg.cut_chunk), FILT=filter_parts(bq, cfg.bk, cfg.ring_tiles, cfg.num_warps),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        _merge_splits_topk[(s,)](cand, off_t, out, s, k, 0 if has_off else int(offset), splits,
                                 M=merge_m, HAS_OFF=has_off, CUT16=cut16, CH=cut_chunk(merge_m, cfg.cut_chunk),
                                 num_warps=16)
    return out
