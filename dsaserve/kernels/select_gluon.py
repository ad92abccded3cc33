"""The threshold top-k's row kernels in Gluon: the select (``threshold_topk._select_candidates_kernel`` with
explicit layouts) and the sample's row thresholds (``_row_threshold_kernel`` in one-warp rows).

Why (benchmarks/KERNELS_NOTES.md, "The select and the row thresholds in Gluon"):

* The select is issue-bound (ncu: SM throughput 88%). Triton lays a 1-D [1024] chunk out one slot a thread per
  wrap, so the output pass's ``tl.cumsum`` ran one warp scan per slot a thread held (~488 SASS instructions a
  1024-slot chunk on sm_90) and the search's row was padded to a power of two (8192 lanes for 7168 slots).
  Here warp w owns one contiguous segment of the row (4 of the 16 streams at the engine's size):
  - the search holds it as up to three pieces of power-of-two rows of 32 lanes (56 slots a thread for 7168, not
    64), sums each piece inside the thread, and counts ``key >= cand`` as the clear sign bit of a difference of
    keys relative to the search's start: ~158 instructions a step (185 with a padded 1-D row);
  - the output pass needs only each warp's count of selected slots (from the search's registers), then each
    warp writes its segment alone, 8 consecutive slots a lane: one in-register scan and one warp scan, no
    barrier (~116 instructions per 8 slots a lane; 233 with a block-wide scan).
* The row thresholds are latency-bound: ~16 dependent block-wide counts a row. ``_row_threshold_gluon_kernel``
  gives a row one warp (no barrier in a count) and counts the same way.

Same inputs, outputs and order as the Triton kernels (a row's selected columns in candidate order, the tie rule
of ``select_topk_ordered``, the redo flags; the same thresholds), so both are drop-ins; the select's output passes
stop at the row's last slot rather than at the next power of two. The launchers, which prepare the same arguments
for both kernels, are ``threshold_topk.select_candidates_gluon`` and ``threshold_topk.row_thresholds``. The
scalar helpers repeat ``threshold_topk``'s: a Gluon kernel cannot call ``triton.jit`` functions. Gluon has no CPU
interpreter: CI compiles the kernels (tests/scripts/test_gluon_compiles.py) and the GPU tests check them against
the torch references and the Triton kernels (tests/gpu/test_threshold_topk_gpu.py).
"""

from __future__ import annotations

import torch

from ._common import HAVE_GLUON, gl, gluon

SLOTS_PER_THREAD = 8  # consecutive slots a thread holds in the output and tie passes: one in-register scan each


if HAVE_GLUON:

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _max_min_add(a_hi, a_lo, a_n, b_hi, b_lo, b_n):
        return gl.maximum(a_hi, b_hi), gl.minimum(a_lo, b_lo), a_n + b_n

    @gluon.jit
    def _order_u32(bits):
        """int32 fp32 bits -> uint32 in the fp32 order, as ``threshold_topk._order_u32``: -0.0 gets +0.0's key (so
        that counting keys agrees with comparing floats), an empty slot's -1 (a NaN) gets 0, below every real
        value (-inf -> 0x007FFFFF)."""
        s = gl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        s = gl.where(s == -1, 0, s)
        return (s ^ -2147483648).to(gl.uint32, bitcast=True)

    @gluon.jit
    def _from_order_f32(u):
        """uint32 order key -> fp32 (the inverse of ``_order_u32``; as ``threshold_topk._from_order_f32``)."""
        s = u.to(gl.int32, bitcast=True) ^ -2147483648
        return gl.where(s < 0, s ^ 0x7FFFFFFF, s).to(gl.float32, bitcast=True)

    @gluon.jit
    def _highest_bit(x):
        """Index of the highest set bit of uint32 x (0 for x <= 1)."""
        top = gl.zeros((), gl.int32)
        for b in gl.static_range(32):
            top = gl.where(x >= (1 << b), b, top)
        return top

    @gluon.jit
    def _greedy_start(lo, hi):
        """(v, b): lo and hi's common high bits with the rest zero, and the highest bit where they differ (-1 when
        lo == hi), as ``threshold_topk._greedy_start``."""
        diff = hi ^ lo
        top = _highest_bit(diff)
        free = gl.where(diff == 0, 0, (gl.full((), 2, gl.int64) << top.to(gl.int64)) - 1)
        v = (lo.to(gl.int64) & (4294967295 - free)).to(gl.uint32)
        return v, gl.where(diff == 0, -1, top)

    @gluon.jit
    def _piece_keys(words, lane_off, N, ROWS: gl.constexpr, ROW0: gl.constexpr, P3: gl.constexpr):
        """[ROWS, NW, 32] order keys of the search's row piece: slot (row0 + r) * 32 + lane of each warp's segment
        (``lane_off`` [NW, 32]: the warp's segment start + lane); 0 (below every real key) for an empty slot or
        one past N."""
        r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, gl.SliceLayout(2, P3)))
        idx = gl.expand_dims(gl.expand_dims(r, 1), 2) * 32 + ROW0 * 32 + gl.expand_dims(lane_off, 0)
        return _order_u32(gl.load(words + 2 * idx + 1, mask=idx < N, other=-1))

    @gluon.jit
    def _piece_stats(key):
        """[NW, 32] per thread over its rows of the piece: the largest key, the smallest real one (empty slots are
        0), and the real slots."""
        return (gl.max(key, axis=0), gl.min(gl.where(key == 0, 4294967295, key), axis=0),
                gl.sum((key != 0).to(gl.int32), axis=0))

    @gluon.jit
    def _relative(key, v0):
        """Keys relative to v0, 1-based and clamped: 0 below v0, else min(key - v0, 2^30) + 1. While the search's
        open window is under 2^30 wide, key >= cand is rel >= cand - v0 + 1, i.e. the sign bit of rel - (cand -
        v0 + 1) is clear: one subtract and one shift-add a slot."""
        return gl.where(key < v0, 0, gl.minimum(key - v0, 1073741824) + 1)

    @gluon.jit
    def _below(rel0, rel1, rel2, x, R1: gl.constexpr, R2: gl.constexpr):
        """[NW, 32]: per thread, its slots with rel < x, summed over the in-thread rows of every piece (a piece
        of 0 rows is skipped; its argument is a placeholder)."""
        part = gl.sum(((rel0 - x) >> 31).to(gl.int32), axis=0)
        if R1 > 0:
            part += gl.sum(((rel1 - x) >> 31).to(gl.int32), axis=0)
        if R2 > 0:
            part += gl.sum(((rel2 - x) >> 31).to(gl.int32), axis=0)
        return part

    @gluon.jit
    def _at_least(k0, k1, k2, cand, R1: gl.constexpr, R2: gl.constexpr):
        """[NW, 32]: per thread, its slots with key >= cand over every piece (as ``_below``)."""
        part = gl.sum((k0 >= cand).to(gl.int32), axis=0)
        if R1 > 0:
            part += gl.sum((k1 >= cand).to(gl.int32), axis=0)
        if R2 > 0:
            part += gl.sum((k2 >= cand).to(gl.int32), axis=0)
        return part

    @gluon.jit
    def _all(part, xchg, step):
        """The CTA-wide sum of a [NW, 32] per-thread partial, with one barrier: each warp's sum (one warp
        reduction) goes to row ``step % 2`` of the [2, NW] shared ``xchg``, and every thread adds the NW values.
        Alternating rows makes one barrier enough: a warp writes a row again two steps later, after the barrier
        of the step between, which every warp reaches only after its reads of that row (``gl.sum`` over both axes
        took three barriers a step)."""
        NW: gl.constexpr = gl.num_warps()
        xchg.index(step % 2).store(gl.sum(part, axis=1))
        gl.thread_barrier()
        return gl.sum(xchg.index(step % 2).load(gl.BlockedLayout([NW], [32], [NW], [0])), axis=0)

    @gluon.jit
    def _write_selected(cands, out_row, seg0, done, vf, tie_col, off, N, SEG: gl.constexpr, SPT: gl.constexpr,
                        TIES: gl.constexpr, EVEN: gl.constexpr):
        """Each warp writes its segment's selected columns (+ off) in slot order from ``done`` [NW] (the warp's
        first output position) on: chunks of SPT consecutive slots a lane, so a chunk's positions are one
        in-register scan and one warp scan (no barrier). TIES: among f == vf only columns + 1 >= tie_col. EVEN:
        every chunk is whole and inside the row (no load mask)."""
        NW: gl.constexpr = gl.num_warps()
        OUT_L: gl.constexpr = gl.BlockedLayout([1, SPT], [1, 32], [NW, 1], [1, 0])
        CHW: gl.constexpr = SPT * 32
        jw = gl.expand_dims(gl.arange(0, CHW, layout=gl.SliceLayout(0, OUT_L)), 0)  # [1, CHW]
        base = gl.expand_dims(seg0, 1)  # [NW, 1]
        for c0 in range(0, SEG, CHW):
            jj = c0 + jw
            idx = base + jj
            if EVEN:
                x = gl.load(cands + idx)
            else:
                x = gl.load(cands + idx, mask=(jj < SEG) & (idx < N), other=-1)
            ff = (x >> 32).to(gl.int32).to(gl.float32, bitcast=True)
            col = x.to(gl.int32)
            if TIES:
                sel = (ff > vf) | ((ff == vf) & ((col + 1).to(gl.uint32, bitcast=True) >= tie_col))
            else:
                sel = ff >= vf  # NaN (empty): never
            taken = sel.to(gl.int32)
            pos = gl.expand_dims(done, 1) + gl.associative_scan(taken, 1, _add) - 1
            gl.store(out_row + pos, col + off, mask=sel)
            done += gl.sum(taken, axis=1)

    @gluon.jit
    def _selected_per_warp(cands, seg0, vf, tie_col, N, SEG: gl.constexpr, SPT: gl.constexpr):
        """[NW]: the slots of each warp's segment that the tie rule selects (``_write_selected`` with TIES), from
        memory: the rare row whose k-th logit is tied."""
        NW: gl.constexpr = gl.num_warps()
        OUT_L: gl.constexpr = gl.BlockedLayout([1, SPT], [1, 32], [NW, 1], [1, 0])
        CHW: gl.constexpr = SPT * 32
        jw = gl.expand_dims(gl.arange(0, CHW, layout=gl.SliceLayout(0, OUT_L)), 0)
        base = gl.expand_dims(seg0, 1)
        n_sel = gl.zeros([NW], gl.int32, layout=gl.SliceLayout(1, OUT_L))
        for c0 in range(0, SEG, CHW):
            jj = c0 + jw
            idx = base + jj
            x = gl.load(cands + idx, mask=(jj < SEG) & (idx < N), other=-1)
            ff = (x >> 32).to(gl.int32).to(gl.float32, bitcast=True)
            col1 = (x.to(gl.int32) + 1).to(gl.uint32, bitcast=True)
            n_sel += gl.sum(((ff > vf) | ((ff == vf) & (col1 >= tie_col))).to(gl.int32), axis=1)
        return n_sel

    @gluon.jit(do_not_specialize=["N", "K", "off_scalar", "CAPS", "skv"])
    def _select_gluon_kernel(words_ptr, cand_ptr, cnt_ptr, ks_ptr, ke_ptr, redo_ptr, any_ptr, off_ptr, out_ptr, N,
                             K, off_scalar, CAPS, skv, R0: gl.constexpr, R1: gl.constexpr, R2: gl.constexpr,
                             NS: gl.constexpr, FLAG: gl.constexpr, HAS_OFF: gl.constexpr, SPT: gl.constexpr,
                             EVEN: gl.constexpr):
        """One row of N int64 candidates (logit bits high, column low; -1 empty), seen as int32 words too: the
        columns of its K largest by (logit desc, column desc), + offset, in candidate order, -1 padded; with
        FLAG, its redo flag (as the Triton kernel's).

        Warp w owns the slots [w SEG, (w + 1) SEG), SEG = 32 (R0 + R1 + R2) (``select_pieces``): the search holds
        them as up to three pieces of R0, R1, R2 rows of 32 lanes (powers of two: a row of 7168 slots is 56 a
        thread, 32 + 16 + 8, instead of a power of two of 64), each summed over its in-thread rows before one
        cross-thread sum; the output pass then needs only each warp's count of selected slots, no barrier. EVEN:
        N = NW SEG and SEG a multiple of 32 SPT (the engine's rows), so the output pass loads unmasked."""
        NW: gl.constexpr = gl.num_warps()
        P3: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 1, 32], [1, NW, 1], [2, 1, 0])  # [rows, warps, lanes]
        S2: gl.constexpr = gl.SliceLayout(0, P3)  # [NW, 32]: a thread's partials
        ROW_L: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        CH_L: gl.constexpr = gl.BlockedLayout([SPT], [32], [NW], [0])  # the tie passes: SPT consecutive slots a thread
        CH: gl.constexpr = SPT * 32 * NW
        SEG: gl.constexpr = 32 * (R0 + R1 + R2)
        LANES: gl.constexpr = SEG * NW
        row = gl.program_id(0)
        words = words_ptr + row.to(gl.int64) * N * 2
        cands = cand_ptr + row.to(gl.int64) * N
        seg0_2 = gl.expand_dims(gl.arange(0, NW, layout=gl.SliceLayout(1, S2)), 1) * SEG
        lane_off = seg0_2 + gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, S2)), 0)  # [NW, 32]
        xchg = gl.allocate_shared_memory(gl.int32, [2, NW], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        step = 0  # the search's counts so far (``_all``'s row parity)
        k0 = _piece_keys(words, lane_off, N, R0, 0, P3)
        hi2, lo2, n2 = _piece_stats(k0)
        k1 = k0  # (a placeholder where the piece has no rows)
        k2 = k0
        if R1 > 0:
            k1 = _piece_keys(words, lane_off, N, R1, R0, P3)
            hi_p, lo_p, n_p = _piece_stats(k1)
            hi2, lo2, n2 = _max_min_add(hi2, lo2, n2, hi_p, lo_p, n_p)
        if R2 > 0:
            k2 = _piece_keys(words, lane_off, N, R2, R0 + R1, P3)
            hi_p, lo_p, n_p = _piece_stats(k2)
            hi2, lo2, n2 = _max_min_add(hi2, lo2, n2, hi_p, lo_p, n_p)
        hi1, lo1, n1 = gl.reduce((hi2, lo2, n2), 1, _max_min_add)
        hi, lo, n = gl.reduce((hi1, lo1, n1), 0, _max_min_add)  # real keys: max, min, count
        if FLAG:
            cnt = gl.load(cnt_ptr + row * NS + gl.arange(0, NS, layout=ROW_L))  # [NS] int32
            kv = gl.minimum(gl.maximum(gl.load(ke_ptr + row), 0), skv)
            ksv = gl.minimum(gl.maximum(gl.load(ks_ptr + row), 0), skv)
            need = gl.minimum(gl.maximum(kv - ksv, 0), K)
            redo = (gl.sum(cnt, axis=0) < need) | (gl.max(cnt, axis=0) > CAPS)
            gl.store(redo_ptr + row, redo.to(gl.int32))
            gl.atomic_add(any_ptr, 1, mask=redo)
        # the row takes key >= v (f >= vf), except that among f == vf only columns + 1 >= tie_col (0: all of them).
        # With at most K real slots v = 1: every real key (>= 0x007FFFFF, -inf's) and no empty one (0)
        v = gl.full((), 1, gl.uint32)
        v0 = v
        b = gl.full((), -1, gl.int32)
        c = n  # slots with key >= v
        if n > K:
            v, b = _greedy_start(lo, hi)
            # a row whose keys span 2^30 or more of the order (both signs, large magnitudes): its top bits by plain
            # counts
            while (b >= 30) & (c != K):
                cand = v | (gl.full((), 1, gl.uint32) << b.to(gl.uint32))
                cc = _all(_at_least(k0, k1, k2, cand, R1, R2), xchg, step)
                step += 1
                v = gl.where(cc >= K, cand, v)
                c = gl.where(cc >= K, cc, c)
                b -= 1
            v0 = v
        # then the keys relative to v0 (``_relative``): the keys still open are in [v0, v0 + 2^30), those below (and
        # the empty slots) count as below every step and those above as above
        rel0 = _relative(k0, v0)
        rel1 = rel0
        rel2 = rel0
        if R1 > 0:
            rel1 = _relative(k1, v0)
        if R2 > 0:
            rel2 = _relative(k2, v0)
        while (b >= 0) & (c != K):
            cand = v | (gl.full((), 1, gl.uint32) << b.to(gl.uint32))
            if cand <= lo:  # every real key is >= cand: no count needed
                v = cand
            elif cand <= hi:  # (above hi: no slot, the bit stays 0)
                cc = LANES - _all(_below(rel0, rel1, rel2, cand - v0 + 1, R1, R2), xchg, step)
                step += 1
                v = gl.where(cc >= K, cand, v)
                c = gl.where(cc >= K, cc, c)
            b -= 1
        vf = gl.where(n > K, _from_order_f32(v), float("-inf"))
        tie_col = gl.zeros((), gl.uint32)
        if c > K:  # ties at the K-th logit vf: of those, the higher columns (rare)
            gt = gl.zeros((), gl.int32)  # slots above vf
            top_col = gl.zeros((), gl.int32)  # the largest tied column + 1, for the greedy's first bit
            for t0 in range(0, N, CH):
                jt = t0 + gl.arange(0, CH, layout=CH_L)
                x = gl.load(cands + jt, mask=jt < N, other=-1)
                ft = (x >> 32).to(gl.int32).to(gl.float32, bitcast=True)
                gt += gl.sum((ft > vf).to(gl.int32), axis=0)
                top_col = gl.maximum(top_col, gl.max(gl.where(ft == vf, x.to(gl.int32) + 1, 0), axis=0))
            need_t = K - gt
            tc = c - gt  # the tied slots; distinct columns, so the greedy ends at exactly need_t
            tb = _highest_bit(top_col.to(gl.uint32, bitcast=True))
            while (tb >= 0) & (tc != need_t):
                cand_c = tie_col | (gl.full((), 1, gl.uint32) << tb.to(gl.uint32))
                cc = gl.zeros((), gl.int32)
                for t0 in range(0, N, CH):
                    jt = t0 + gl.arange(0, CH, layout=CH_L)
                    x = gl.load(cands + jt, mask=jt < N, other=-1)
                    eq = (x >> 32).to(gl.int32).to(gl.float32, bitcast=True) == vf
                    col1 = (x.to(gl.int32) + 1).to(gl.uint32, bitcast=True)
                    cc += gl.sum((eq & (col1 >= cand_c)).to(gl.int32), axis=0)
                tie_col = gl.where(cc >= need_t, cand_c, tie_col)
                tc = gl.where(cc >= need_t, cc, tc)
                tb -= 1
        if HAS_OFF:
            off = gl.load(off_ptr + row)
        else:
            off = off_scalar
        out_row = out_ptr + row.to(gl.int64) * K
        # each warp's first output position: the selected slots of the warps before it
        OUT_W: gl.constexpr = gl.SliceLayout(1, gl.BlockedLayout([1, SPT], [1, 32], [NW, 1], [1, 0]))
        seg0 = gl.arange(0, NW, layout=OUT_W) * SEG
        if tie_col > 0:
            n_sel = _selected_per_warp(cands, seg0, vf, tie_col, N, SEG, SPT)
        else:  # key >= v: SEG minus the warp's slots below, from the registers
            n_sel = gl.convert_layout(SEG - gl.sum(_below(rel0, rel1, rel2, v - v0 + 1, R1, R2), axis=1), OUT_W)
        # exclusive prefix over the warps (a scan cannot take this layout): an [NW, NW] mask of the warps before
        PRE_L: gl.constexpr = gl.BlockedLayout([1, NW], [32, 1], [NW, 1], [1, 0])
        n_row = gl.expand_dims(gl.convert_layout(n_sel, gl.SliceLayout(0, PRE_L)), 0)  # [1, NW]
        before = gl.expand_dims(gl.arange(0, NW, layout=gl.SliceLayout(0, PRE_L)), 0) < \
            gl.expand_dims(gl.arange(0, NW, layout=gl.SliceLayout(1, PRE_L)), 1)  # [NW, NW]: u < w
        first = gl.convert_layout(gl.sum(gl.where(before, n_row, 0), axis=1), OUT_W)
        if tie_col > 0:
            _write_selected(cands, out_row, seg0, first, vf, tie_col, off, N, SEG, SPT, True, EVEN)
        else:
            _write_selected(cands, out_row, seg0, first, vf, tie_col, off, N, SEG, SPT, False, EVEN)
        done = gl.sum(n_sel, axis=0)  # columns written
        for c0 in range(0, K, CH):
            jo = c0 + gl.arange(0, CH, layout=CH_L)
            gl.store(out_row + jo, gl.full((CH,), -1, gl.int32, layout=CH_L), mask=(jo >= done) & (jo < K))


    @gluon.jit(do_not_specialize=["N", "R"])
    def _row_threshold_gluon_kernel(x_ptr, thr_ptr, N, R, M: gl.constexpr):
        """One row of N fp32 logits (-inf outside the row): its R-th largest finite value, or -inf when fewer than
        R are finite (``threshold_topk._row_threshold_kernel``'s contract). The greedy bit search of the select on
        keys relative to its start, in programs of one warp per 2048 samples (one warp up to 2048): the kernel is
        latency-bound (~16 dependent counts a row, each a block-wide reduction), and a one-warp count needs no
        barrier (the Triton kernel ran 4-8 warps a row: 55 us per 4096 rows of ~1750 samples, H200).
        The n == R case is set directly: the greedy's start is below lo there and would take the -inf slots."""
        NW: gl.constexpr = gl.num_warps()
        L: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        row = gl.program_id(0)
        j = gl.arange(0, M, layout=L)
        x = gl.load(x_ptr + row.to(gl.int64) * N + j, mask=j < N, other=float("-inf"))
        fin = x > float("-inf")
        hi_f, lo_f, n = gl.reduce((x, gl.where(fin, x, float("inf")), fin.to(gl.int32)), 0, _max_min_add)
        t = gl.full((), float("-inf"), gl.float32)
        if n >= R:
            hi = _order_u32(hi_f.to(gl.int32, bitcast=True))
            lo = _order_u32(lo_f.to(gl.int32, bitcast=True))
            key = _order_u32(x.to(gl.int32, bitcast=True))  # -inf (outside) -> 0x007FFFFF, below every counted key
            v, b = _greedy_start(lo, hi)
            c = n
            if n == R:  # every finite value is among the R largest: the smallest of them
                v = lo
            while (b >= 30) & (c != R):  # a row spanning 2^30 of the order: its top bits by plain counts
                cand = v | (gl.full((), 1, gl.uint32) << b.to(gl.uint32))
                cc = gl.sum((key >= cand).to(gl.int32), axis=0)
                v = gl.where(cc >= R, cand, v)
                c = gl.where(cc >= R, cc, c)
                b -= 1
            # then keys relative to v0 as the select's, but 1-based: 0 marks a key below v0 (-inf slots included:
            # a counted cand is > lo, above them), so that the final min can leave those out. The open window is
            # now < 2^30 wide, so rel <= 2^30 + 1 and no difference overflows
            v0 = v
            rel = gl.where(key < v0, 0, gl.minimum(key - v0, 1073741824) + 1)
            while (b >= 0) & (c != R):
                cand = v | (gl.full((), 1, gl.uint32) << b.to(gl.uint32))
                if cand <= lo:
                    v = cand
                elif cand <= hi:
                    cc = M - gl.sum((rel - (cand - v0 + 1)) >> 31, axis=0).to(gl.int32)
                    v = gl.where(cc >= R, cand, v)
                    c = gl.where(cc >= R, cc, c)
                b -= 1
            # the R-th largest: the smallest key >= v (v itself when tied; it lies in the window, unclamped)
            sv = (v0 - 1 + gl.min(gl.where(rel >= v - v0 + 1, rel, 4294967295), axis=0)).to(gl.int32, bitcast=True)
            sv = sv ^ -2147483648
            t = gl.where(sv < 0, sv ^ 0x7FFFFFFF, sv).to(gl.float32, bitcast=True)
        gl.store(thr_ptr + row, t)


def select_pieces(n: int, num_warps: int) -> tuple[int, int, int]:
    """(R0, R1, R2) of ``_select_gluon_kernel`` for rows of n slots: each warp's segment has R = R0 + R1 + R2 rows
    of 32 slots, the smallest R >= n / (32 num_warps) with at most three binary digits, split into its digits
    (largest first, 0 for a missing one). 7168 slots on 4 warps: 56 = 32 + 16 + 8."""
    r = max(1, -(-n // (32 * num_warps)))
    while bin(r).count("1") > 3:
        r += 1
    digits = [1 << i for i in range(r.bit_length() - 1, -1, -1) if r >> i & 1]
    return tuple(digits + [0] * (3 - len(digits)))


def row_threshold_warps(m: int) -> int:
    """Warps of ``_row_threshold_gluon_kernel`` for rows of M (a power of two) samples: one per 2048."""
    return max(1, min(8, m // 2048))


def unsupported_reason(cand: torch.Tensor) -> str | None:
    """Why the Gluon row kernels cannot take ``cand`` (None = it can): Gluon and a CUDA device of sm_80 or newer
    (blocked layouts only; measured and tested on sm_90, the only GPU the threshold path runs on)."""
    if not HAVE_GLUON:
        return "this Triton has no Gluon"
    if not cand.is_cuda:
        return "the candidates are not on a CUDA device"
    if torch.cuda.get_device_capability(cand.device)[0] < 8:
        return "the GPU is older than sm_80"
    return None
