"""The threshold top-k's row kernels in Gluon: the select (``threshold_topk._select_candidates_kernel`` with
explicit layouts) and the sample's row thresholds (``_row_threshold_kernel`` in one-warp rows).

Why (benchmarks/KERNELS_NOTES.md, "The select and the row thresholds in Gluon"):

* The select is issue-bound (ncu: SM throughput 88%), and half of the Triton kernel's instructions were the
  output pass's prefix sum. Triton lays a 1-D [1024] chunk out one slot a thread per wrap, so ``tl.cumsum`` runs
  one warp scan per slot a thread holds: 8 scans of 5 shuffles with their lane masks, ~488 SASS instructions a
  1024-slot chunk on sm_90. Here the output chunk gives each thread 8 consecutive slots: one in-register scan,
  one warp scan, one cross-warp step, whole int64 loads (~233 a chunk with the tie branch). The search's row
  keeps one slot a thread per wrap (coalesced loads of the logit words; a count does not care about order), and
  counts ``key < cand`` as the sign bit of a difference of keys relative to the search's start (185 instructions
  a step instead of 247).
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

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

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

    @gluon.jit(do_not_specialize=["N", "K", "off_scalar", "CAPS", "skv"])
    def _select_gluon_kernel(words_ptr, cand_ptr, cnt_ptr, ks_ptr, ke_ptr, redo_ptr, any_ptr, off_ptr, out_ptr, N,
                             K, off_scalar, CAPS, skv, M: gl.constexpr, NS: gl.constexpr, FLAG: gl.constexpr,
                             HAS_OFF: gl.constexpr, SPT: gl.constexpr):
        """One row of N int64 candidates (logit bits high, column low; -1 empty), seen as int32 words too: the
        columns of its K largest by (logit desc, column desc), + offset, in candidate order, -1 padded; with
        FLAG, its redo flag (as the Triton kernel's)."""
        NW: gl.constexpr = gl.num_warps()
        ROW_L: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])  # the search's row: coalesced logit words
        CH_L: gl.constexpr = gl.BlockedLayout([SPT], [32], [NW], [0])  # a chunk: SPT consecutive slots a thread
        CH: gl.constexpr = SPT * 32 * NW
        row = gl.program_id(0)
        words = words_ptr + row.to(gl.int64) * N * 2
        cands = cand_ptr + row.to(gl.int64) * N
        j = gl.arange(0, M, layout=ROW_L)
        f = gl.load(words + 2 * j + 1, mask=j < N, other=-1).to(gl.float32, bitcast=True)  # [M], NaN: empty
        real = f == f
        hi_f, lo_f, n = gl.reduce((gl.where(real, f, float("-inf")), gl.where(real, f, float("inf")),
                                   real.to(gl.int32)), 0, _max_min_add)
        if FLAG:
            cnt = gl.load(cnt_ptr + row * NS + gl.arange(0, NS, layout=ROW_L))  # [NS] int32
            kv = gl.minimum(gl.maximum(gl.load(ke_ptr + row), 0), skv)
            ksv = gl.minimum(gl.maximum(gl.load(ks_ptr + row), 0), skv)
            need = gl.minimum(gl.maximum(kv - ksv, 0), K)
            redo = (gl.sum(cnt, axis=0) < need) | (gl.max(cnt, axis=0) > CAPS)
            gl.store(redo_ptr + row, redo.to(gl.int32))
            gl.atomic_add(any_ptr, 1, mask=redo)
        # the row takes f >= vf, except that among f == vf only columns + 1 >= tie_col (0: all of them)
        vf = gl.full((), float("-inf"), gl.float32)
        tie_col = gl.zeros((), gl.uint32)
        if n > K:
            hi = _order_u32(hi_f.to(gl.int32, bitcast=True))
            lo = _order_u32(lo_f.to(gl.int32, bitcast=True))
            v, b = _greedy_start(lo, hi)
            c = n  # slots with key >= v
            # a row whose keys span 2^31 or more (both signs, large magnitudes) decides its top bit by fp32 compare
            while (b >= 31) & (c != K):
                cand = v | (gl.full((), 1, gl.uint32) << b.to(gl.uint32))
                cc = gl.sum((f >= _from_order_f32(cand)).to(gl.int32), axis=0)
                v = gl.where(cc >= K, cand, v)
                c = gl.where(cc >= K, cc, c)
                b -= 1
            # then the row as order keys relative to v0 (this v), clamped to [0, 2^31 - 1]: the keys still open are
            # in [v0, v0 + 2^31), those below (and the empty slots, whose key is 0) count as below every step and
            # those above as above. key < cand is then the sign bit of rel - (cand - v0), both in [0, 2^31): one
            # subtract and one shift-add a slot (the fp32 compare and its conversion to int took ~3.9
            # instructions a slot), and the slots with key >= cand are the M lanes minus those
            v0 = v
            key = _order_u32(f.to(gl.int32, bitcast=True))
            rel = gl.where(key < v0, 0, gl.minimum(key - v0, 2147483647))
            while (b >= 0) & (c != K):
                cand = v | (gl.full((), 1, gl.uint32) << b.to(gl.uint32))
                if cand <= lo:  # every slot's key is >= cand: no count needed
                    v = cand
                elif cand <= hi:  # (above hi: no slot, the bit stays 0)
                    cc = M - gl.sum((rel - (cand - v0)) >> 31, axis=0).to(gl.int32)
                    v = gl.where(cc >= K, cand, v)
                    c = gl.where(cc >= K, cc, c)
                b -= 1
            vf = _from_order_f32(v)
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
        done = gl.zeros((), gl.int32)  # columns written so far
        for c0 in range(0, N, CH):
            jj = c0 + gl.arange(0, CH, layout=CH_L)
            x = gl.load(cands + jj, mask=jj < N, other=-1)
            ff = (x >> 32).to(gl.int32).to(gl.float32, bitcast=True)
            col = x.to(gl.int32)
            sel = ff >= vf  # NaN (empty): never
            if tie_col > 0:
                sel = (ff > vf) | ((ff == vf) & ((col + 1).to(gl.uint32, bitcast=True) >= tie_col))
            taken = sel.to(gl.int32)
            pos = done + gl.associative_scan(taken, 0, _add) - 1  # in-register over a thread's SPT slots first
            gl.store(out_row + pos, col + off, mask=sel)
            done += gl.sum(taken, axis=0)
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


LABEL = "ef835da (session 15's Gluon select)"


def select_candidates_previous(cand, k, offset=0, out=None, counts=None, ks=None, ke=None, redo=None, n_keys=0,
                               redo_any=None, num_warps=4):
    import triton
    from dsaserve.kernels.threshold_topk import _select_launch

    s = cand.shape[0]
    out = torch.empty(s, k, dtype=torch.int32, device=cand.device) if out is None else out
    a = _select_launch("previous", cand, offset, out, counts, ks, ke, redo, redo_any)
    m = max(32 * num_warps, triton.next_power_of_2(a.n))
    _select_gluon_kernel[(s,)](a.flat.view(torch.int32), a.flat, a.cnt, a.ks, a.ke, a.redo, a.redo_any, a.off, out,
                               a.n, k, a.off_scalar, a.caps, n_keys, M=m, NS=a.ns, FLAG=a.flag, HAS_OFF=a.has_off,
                               SPT=SLOTS_PER_THREAD, num_warps=num_warps)
    return out
