"""Sparse MLA in the absorbed latent space (Triton): each query attends to its own top-k latent slots.

All heads of a token share one latent key/value row per selected slot (MQA in the 576 = 512 + 64 space),
so a program takes one token and a block of BH heads, gathers BK selected rows at a time (the index load
feeds the row addresses; Triton pipelines both), and runs an online softmax in fp32:
    S = Q_lat K_lat^T + Q_rope K_rope^T      [BH, BK]   (scaled, base 2)
    O = O * alpha + P V,  V = K_lat          [BH, 512]
Programs of one token's head blocks are adjacent so the second gather of the same rows hits L2.

``SparseMLAConfig(v_split=2)`` selects ``_sparse_mla_vsplit_kernel`` (two programs per token and head block,
each owning half the value columns); correct but measured 9% slower on H100, so off by default
(docs/BENCHMARKS.md, "Kernels", has the profile).

Decode (split-k over the top-k list, on by default for small batches, ``AUTO_SPLITS``): with one program per
(token, head block) a decode batch runs t * 2 programs at 128 heads, each walking all 2048 keys serially,
so one token took as long as 64 (~149 us a layer on H200 with 2 of its 132 SMs busy). ``pick_num_splits`` now
splits each top-k list into whole key tiles so that t * head blocks * splits fills the SMs once (a pure
function of the shapes: CUDA-graph safe), the kernel writes fp32 partials and their log-sum-exps, and
``_merge_splits_kernel`` merges them in one launch (out = sum_s exp(lse_s - lse) o_s). Splitting was off
before because the merge was several eager torch kernels; prefill-sized batches (t * head blocks > SMs / 2)
keep one split and the unchanged kernel code. benchmarks/sparse_mla_decode.py measures the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import check, device_sm_count, interpret_mode, is_pow2, tl, triton
from .splitk import round_bf16_in_interpreter

if triton is not None:
    from .splitk import _round_to_bf16_grid  # noqa: F401 (called inside _merge_splits_kernel)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# num_splits=None: split the top-k lists of small (decode) batches over the SMs (``pick_num_splits``).
# False = always one program per (token, head block), the behaviour before the fused merge.
AUTO_SPLITS = True
VSPLIT_BY_DEFAULT = False  # set from the device sweep (docs/BENCHMARKS.md)


@dataclass(frozen=True)
class SparseMLAConfig:
    """Tile shape of the sparse MLA kernel: BH heads x BK gathered keys per step."""

    bh: int = 64
    bk: int = 64
    num_warps: int = 8
    num_stages: int = 2
    prefetch_idx: bool = False  # load the next tile's slot ids one iteration ahead (measured 8% slower)
    # v_split = 2: the value columns are split over two programs (each [BH, DV/2], BH up to 128 heads),
    # see ``_sparse_mla_vsplit_kernel``; 1 = the original kernel (one program owns all DV columns)
    v_split: int = 1
    # "hopper": the Gluon prefill kernel for sm_90 (``sparse_mla_hopper``; one split, its own fixed tiles:
    # the fields above are ignored); "triton": the kernels of this module
    kernel: str = "triton"


if triton is not None:

    @triton.jit
    def _online_softmax_update(s, valid, qk_scale, m, l, acc, v):
        """One key tile of the streaming softmax: s [BH, BK] raw scores, v [BK, DV] values -> new (m, l, acc).

        Scores are in log2 units (qk_scale folds in log2(e)); invalid keys are -inf and rows that have seen no
        valid key yet keep m = -inf without producing NaNs.
        """
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc

    # T is unused (the grid carries the tokens) and NSPLIT only needs its == 1 case specialised: without
    # these, every decode batch size / split count the engine captures compiled a variant of its own
    @triton.jit(do_not_specialize=["T"], do_not_specialize_on_alignment=["NSPLIT"])
    def _sparse_mla_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
        T, H, TOPK, NSPLIT, SPLIT_LEN, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_it,
        stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
        DV: tl.constexpr, DR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
        N_HB: tl.constexpr, UPCAST: tl.constexpr, PREFETCH_IDX: tl.constexpr,
    ):
        """One program = (token, head block, split): the softmax of BH heads over keys
        [split * SPLIT_LEN, (split + 1) * SPLIT_LEN) of the token's top-k list.

        NSPLIT = 1 (prefill): out/lse are the final [t, h, DV] / [t, h]. NSPLIT > 1 (decode): fp32 partials
        [NSPLIT, t, h, DV] / [NSPLIT, t, h] for ``_merge_splits_kernel``; a split without a valid key writes
        o = 0, lse = -inf. NSPLIT is a runtime value, so new decode batch sizes compile nothing new (Triton
        still specialises NSPLIT == 1 to a constant: the prefill code is what it was with a constexpr).
        """
        pid = tl.program_id(0)
        split = pid % NSPLIT
        hb = (pid // NSPLIT) % N_HB
        t = pid // (NSPLIT * N_HB)
        heads = hb * BH + tl.arange(0, BH)  # [BH]
        hmask = heads < H
        dv = tl.arange(0, DV)
        dr = tl.arange(0, DR)
        q_base = q_ptr + t.to(tl.int64) * stride_qt + heads.to(tl.int64)[:, None] * stride_qh
        q_lat = tl.load(q_base + dv[None, :], mask=hmask[:, None], other=0.0)  # [BH, DV]
        q_rope = tl.load(q_base + DV + dr[None, :], mask=hmask[:, None], other=0.0)  # [BH, DR]
        if UPCAST:  # interpreter only: its bf16 dot and fp32->bf16 cast are broken; compute in fp32
            q_lat = q_lat.to(tl.float32)
            q_rope = q_rope.to(tl.float32)

        m = tl.full((BH,), float("-inf"), tl.float32)
        l = tl.zeros((BH,), tl.float32)
        acc = tl.zeros((BH, DV), tl.float32)
        k_begin = split * SPLIT_LEN
        k_end = tl.minimum(k_begin + SPLIT_LEN, TOPK)
        idx_base = idx_ptr + t.to(tl.int64) * stride_it
        kn = k_begin + tl.arange(0, BK)
        idx_next = tl.load(idx_base + kn, mask=kn < k_end, other=-1)  # [BK] slot ids of the first tile
        for k0 in range(k_begin, k_end, BK):
            if PREFETCH_IDX:
                # ids one tile ahead, carried across iterations: the row gather of this tile then depends
                # on no load of this iteration, so the pipeliner can issue it a stage early
                idx = idx_next
                kn = k0 + BK + tl.arange(0, BK)
                idx_next = tl.load(idx_base + kn, mask=kn < k_end, other=-1)
            else:
                kk = k0 + tl.arange(0, BK)
                idx = tl.load(idx_base + kk, mask=kk < k_end, other=-1)  # [BK] slot ids
            valid = idx >= 0
            row = kv_ptr + idx.to(tl.int64)[:, None] * stride_kv
            k_lat = tl.load(row + dv[None, :], mask=valid[:, None], other=0.0)  # [BK, DV]
            k_rope = tl.load(row + DV + dr[None, :], mask=valid[:, None], other=0.0)  # [BK, DR]
            if UPCAST:
                k_lat = k_lat.to(tl.float32)
                k_rope = k_rope.to(tl.float32)
            s = tl.dot(q_lat, tl.trans(k_lat))
            s = tl.dot(q_rope, tl.trans(k_rope), s)  # [BH, BK] fp32
            m, l, acc = _online_softmax_update(s, valid, qk_scale, m, l, acc, k_lat)

        has = l > 0.0
        o = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
        o_ptrs = out_ptr + split.to(tl.int64) * stride_os + t.to(tl.int64) * stride_ot \
            + heads.to(tl.int64)[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
        tl.store(lse_ptr + split.to(tl.int64) * stride_ls + t.to(tl.int64) * stride_lt + heads, lse, mask=hmask)


    @triton.jit
    def _sparse_mla_vsplit_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
        T, H, TOPK, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
        DV: tl.constexpr, DR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, N_HB: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """One program = (token, head block, value half): out[t, heads, half] for DVH = DV / 2 columns.

        Why: the [BH, DV] fp32 accumulator of the one-program kernel only fits 8 warps at BH = 64, and
        Triton then runs QK^T twice (once per warpgroup) and moves P and the row stats through shared
        memory. With half the value columns per program the accumulator is [BH, DV/2]: at BH = 128 each
        warpgroup owns 64 whole head rows (S, softmax and P stay in its registers). Both value halves
        recompute the same S (the QK^T work the old kernel already duplicated), so the row stats (and lse)
        agree bit for bit; half 0 writes lse.
            S = Q_mine K_mine^T + Q_other K_other^T + Q_rope K_rope^T    [BH, BK]
            O = O * alpha + P K_mine                                       [BH, DV/2]
        """
        DVH: tl.constexpr = DV // 2
        pid = tl.program_id(0)
        vb = pid % 2
        hb = (pid // 2) % N_HB
        t = pid // (2 * N_HB)
        heads = hb * BH + tl.arange(0, BH)  # [BH]
        hmask = heads < H
        dvh = tl.arange(0, DVH)
        dr = tl.arange(0, DR)
        mine = vb * DVH  # first value column of this program
        other = (1 - vb) * DVH
        q_base = q_ptr + t.to(tl.int64) * stride_qt + heads.to(tl.int64)[:, None] * stride_qh
        q_mine = tl.load(q_base + mine + dvh[None, :], mask=hmask[:, None], other=0.0)  # [BH, DVH]
        q_other = tl.load(q_base + other + dvh[None, :], mask=hmask[:, None], other=0.0)  # [BH, DVH]
        q_rope = tl.load(q_base + DV + dr[None, :], mask=hmask[:, None], other=0.0)  # [BH, DR]
        if UPCAST:  # interpreter only: its bf16 dot is broken; compute in fp32
            q_mine = q_mine.to(tl.float32)
            q_other = q_other.to(tl.float32)
            q_rope = q_rope.to(tl.float32)

        m = tl.full((BH,), float("-inf"), tl.float32)
        l = tl.zeros((BH,), tl.float32)
        acc = tl.zeros((BH, DVH), tl.float32)
        idx_base = idx_ptr + t.to(tl.int64) * stride_it
        for k0 in range(0, TOPK, BK):
            kk = k0 + tl.arange(0, BK)
            idx = tl.load(idx_base + kk, mask=kk < TOPK, other=-1)  # [BK] slot ids
            valid = idx >= 0
            row = kv_ptr + idx.to(tl.int64)[:, None] * stride_kv
            k_mine = tl.load(row + mine + dvh[None, :], mask=valid[:, None], other=0.0)  # [BK, DVH] = V
            k_other = tl.load(row + other + dvh[None, :], mask=valid[:, None], other=0.0)  # [BK, DVH]
            k_rope = tl.load(row + DV + dr[None, :], mask=valid[:, None], other=0.0)  # [BK, DR]
            if UPCAST:
                k_mine = k_mine.to(tl.float32)
                k_other = k_other.to(tl.float32)
                k_rope = k_rope.to(tl.float32)
            s = tl.dot(q_other, tl.trans(k_other))
            s = tl.dot(q_mine, tl.trans(k_mine), s)
            s = tl.dot(q_rope, tl.trans(k_rope), s)  # [BH, BK] fp32
            m, l, acc = _online_softmax_update(s, valid, qk_scale, m, l, acc, k_mine)

        has = l > 0.0
        o = acc / tl.where(has, l, 1.0)[:, None]
        o_ptrs = out_ptr + t.to(tl.int64) * stride_ot + heads.to(tl.int64)[:, None] * stride_oh + mine + dvh[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
        if vb == 0:
            lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
            tl.store(lse_ptr + t.to(tl.int64) * stride_lt + heads, lse, mask=hmask)

    @triton.jit(do_not_specialize=["NSPLIT"])
    def _merge_splits_kernel(
        o_ptr, l_ptr, out_ptr, lse_ptr,
        NSPLIT, H,
        stride_os, stride_ot, stride_oh, stride_ls, stride_lt, stride_ut, stride_uh, stride_et,
        DV: tl.constexpr, BHM: tl.constexpr, BD: tl.constexpr, SB: tl.constexpr, ROUND_BF16: tl.constexpr,
    ):
        """One program = (token, BHM heads, BD value columns): merge NSPLIT partial softmaxes over disjoint keys.

            m = max_s lse_s,  w_s = exp(lse_s - m)  (0 for an empty split: lse_s = -inf)
            out = sum_s w_s o_s / sum_s w_s,  lse = m + log(sum_s w_s)
        A row whose splits are all empty gets out = 0 and lse = -inf, what the unsplit kernel writes for a
        row with no valid key. Empty splits' partials are not loaded (masked), so they cost no bandwidth.
        Splits are taken SB at a time as one [SB, BHM, BD] tile (one load round for every decode split
        count: the latency is paid once, not per split); the sums over the tile are reduced at the end.
        """
        N_DB: tl.constexpr = DV // BD
        pid = tl.program_id(0)
        db = pid % N_DB
        hb = (pid // N_DB) % tl.cdiv(H, BHM)
        t = pid // (N_DB * tl.cdiv(H, BHM))
        sb = tl.arange(0, SB)
        heads = hb * BHM + tl.arange(0, BHM)
        hmask = heads < H
        cols = db * BD + tl.arange(0, BD)
        l_tile = l_ptr + t.to(tl.int64) * stride_lt + heads[None, :]  # + s * stride_ls: [SB, BHM]
        o_tile = o_ptr + t.to(tl.int64) * stride_ot + heads.to(tl.int64)[None, :, None] * stride_oh \
            + cols[None, None, :]  # + s * stride_os: [SB, BHM, BD]

        m_acc = tl.full((SB, BHM), float("-inf"), tl.float32)
        for s0 in range(0, NSPLIT, SB):  # pass 1: the largest partial lse per head (a few floats)
            s = s0 + sb
            ok = (s < NSPLIT)[:, None] & hmask[None, :]
            m_acc = tl.maximum(m_acc, tl.load(l_tile + s[:, None] * stride_ls, mask=ok, other=float("-inf")))
        m = tl.max(m_acc, axis=0)  # [BHM]
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: every weight is exp(-inf) = 0

        w_acc = tl.zeros((SB, BHM), tl.float32)
        acc = tl.zeros((SB, BHM, BD), tl.float32)
        for s0 in range(0, NSPLIT, SB):  # pass 2: weighted sum of the partial outputs
            s = s0 + sb
            ok = (s < NSPLIT)[:, None] & hmask[None, :]
            l = tl.load(l_tile + s[:, None] * stride_ls, mask=ok, other=float("-inf"))
            w = tl.exp2((l - m_safe[None, :]) * 1.4426950408889634)  # [SB, BHM]
            live = ok & (l > float("-inf"))
            o = tl.load(o_tile + s.to(tl.int64)[:, None, None] * stride_os, mask=live[:, :, None], other=0.0)
            w_acc += w
            acc += w[:, :, None] * o
        tot = tl.sum(w_acc, axis=0)  # [BHM]
        has = tot > 0.0
        out = tl.sum(acc, axis=0) / tl.where(has, tot, 1.0)[:, None]  # [BHM, BD]
        if ROUND_BF16:  # interpreter only: its fp32 -> bf16 cast truncates, the GPU's rounds to nearest even
            out = _round_to_bf16_grid(out)
        out_ptrs = out_ptr + t.to(tl.int64) * stride_ut + heads.to(tl.int64)[:, None] * stride_uh + cols[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
        if db == 0:
            lse = tl.where(has, m_safe + tl.log(tl.where(has, tot, 1.0)), float("-inf"))
            tl.store(lse_ptr + t.to(tl.int64) * stride_et + heads, lse, mask=hmask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_layout(topk: int, num_splits: int, bk: int) -> tuple[int, int]:
    """(nsplit, split_len) for a requested split count: every split but the last is split_len keys, a whole
    number of BK-key tiles, and none is empty (so nsplit can come out below ``num_splits``)."""
    split_len = _cdiv(_cdiv(max(topk, 1), max(num_splits, 1)), bk) * bk
    return max(1, _cdiv(topk, split_len)), split_len


def pick_num_splits(t: int, n_hb: int, topk: int, bk: int, sms: int) -> int:
    """Top-k splits for t tokens x n_hb head blocks: as many as fill the SMs with one wave of programs.

    Why: the kernel runs one program per (token, head block, split), each walking its keys serially, so a
    decode batch (t * n_hb = 2 programs for one token at 128 heads) leaves nearly every SM idle and takes
    as long as a 64-token batch. A program's [BH, DV] fp32 accumulator and pipelined [BK, 576] key tiles
    fill an SM, so the target is one program per SM:
        nsplit = the largest count with t * n_hb * nsplit <= sms, each split a whole number of BK tiles;
        1 when t * n_hb > sms / 2 (prefill-sized batches: a second split would add a wave and the merge).
    Pure function of the shapes and the SM count: no data, no host sync, so CUDA-graph capture is safe and
    each captured batch size keeps its choice. (H200, 132 SMs, 128 heads = 2 blocks, top-k 2048, BK 64:
    t = 1, 2 -> 32 splits; 4 -> 16; 8 -> 8; 16 -> 4; 32, 33 -> 2; >= 34 -> 1.)
    """
    units = t * n_hb
    if units <= 0 or topk <= bk:
        return 1
    target = sms // units
    if target < 2:
        return 1
    return split_layout(topk, target, bk)[0]


def default_config(h: int, d_v: int, dtype: torch.dtype) -> SparseMLAConfig:
    """Tile shape used when the caller gives none (chosen from the measurements in docs/BENCHMARKS.md)."""
    # fp32 inputs (4-byte rows) take half the key tile so two pipelined [BK, 576] stages fit shared memory
    wide = d_v >= 256 and dtype.itemsize <= 2
    if VSPLIT_BY_DEFAULT and wide:
        return SparseMLAConfig(bh=max(16, min(128, triton.next_power_of_2(h))), bk=32, num_warps=8, num_stages=3,
                               v_split=2)
    return SparseMLAConfig(bh=max(16, min(64, triton.next_power_of_2(h))), bk=64 if wide else 32,
                           num_warps=8 if d_v >= 256 else 4, num_stages=2)


MERGE_TILE = 4096  # fp32 elements of one merge program's [SB, BHM, BD] tile (32 registers a thread, 4 warps)
MERGE_MAX_SB = 32  # splits per tile; more are taken in a loop


def merge_tile(nsplit: int, h: int, dv: int) -> tuple[int, int, int]:
    """(SB splits, BHM heads, BD columns) of a merge program: all splits of a decode split count in one
    tile, then columns, then heads up to MERGE_TILE elements. Many small programs at t = 1 (32 splits: one
    head x 128 columns each, 512 programs at 128 heads) so their loads are in flight on every SM at once."""
    sb = min(triton.next_power_of_2(max(nsplit, 1)), MERGE_MAX_SB)
    bd = min(dv, triton.next_power_of_2(max(16, MERGE_TILE // sb)))
    bhm = min(triton.next_power_of_2(h), max(1, MERGE_TILE // (sb * bd)))
    return sb, bhm, bd


def merge_splits_triton(o_buf: torch.Tensor, l_buf: torch.Tensor, out_dtype: torch.dtype):
    """Merge split partials in one launch: o_buf [n, t, h, dv] fp32, l_buf [n, t, h] fp32 (natural-log lse,
    -inf = empty split) -> (out [t, h, dv] in out_dtype, lse [t, h] fp32). Same math as
    ``reference.merge_attn_states``; rows with only empty splits give out = 0, lse = -inf."""
    check(o_buf.dim() == 4 and l_buf.shape == o_buf.shape[:3],
          f"merge_splits: o_buf [n, t, h, dv] and l_buf [n, t, h] expected, got {tuple(o_buf.shape)} "
          f"and {tuple(l_buf.shape)}")
    check(o_buf.dtype == torch.float32 and l_buf.dtype == torch.float32, "merge_splits: o_buf, l_buf must be fp32")
    nsplit, t, h, dv = o_buf.shape
    check(is_pow2(dv) and o_buf.stride(-1) == 1 and l_buf.stride(-1) == 1,
          f"merge_splits: dv={dv} must be a power of two, heads and columns contiguous")
    out = torch.empty(t, h, dv, dtype=out_dtype, device=o_buf.device)
    lse = torch.empty(t, h, dtype=torch.float32, device=o_buf.device)
    if t * h == 0:
        return out, lse
    sb, bhm, bd = merge_tile(nsplit, h, dv)
    _merge_splits_kernel[(t * triton.cdiv(h, bhm) * (dv // bd),)](
        o_buf, l_buf, out, lse, nsplit, h,
        o_buf.stride(0), o_buf.stride(1), o_buf.stride(2), l_buf.stride(0), l_buf.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        DV=dv, BHM=bhm, BD=bd, SB=sb, ROUND_BF16=round_bf16_in_interpreter(out_dtype), num_warps=4,
    )
    return out, lse


def sparse_mla_triton(q, kv, indices, sm_scale, d_v=512, config: SparseMLAConfig | None = None, num_splits=None,
                      prefill_kernel: str = "auto"):
    """Triton launcher (inputs already checked by ``dsaserve.kernels.sparse_mla``).

    ``num_splits``: None = ``pick_num_splits`` when ``AUTO_SPLITS`` (else 1); an explicit count is rounded by
    ``split_layout`` (whole BK tiles, no empty split). The value-split config has no top-k split.
    ``prefill_kernel``: with ``config=None``, a call that runs one split (prefill-sized batches) goes to the Gluon
    kernel of ``sparse_mla_hopper`` when "auto" and that kernel takes it (sm_90, bf16, 576/512, heads a multiple
    of 64: 1.6-1.9x the Triton kernel on H200, docs/BENCHMARKS.md session 17); "triton" keeps this module's kernel
    (ablation).
    """
    t, h, dqk = q.shape
    topk = indices.shape[1]
    d_r = dqk - d_v
    if config is not None and config.kernel != "triton":
        check(config.kernel == "hopper",
              f"sparse_mla: SparseMLAConfig.kernel must be 'triton' or 'hopper', got {config.kernel!r}")
        from .sparse_mla_hopper import sparse_mla_prefill_hopper

        return sparse_mla_prefill_hopper(q, kv, indices, sm_scale, d_v)  # refuses shapes it cannot take
    cfg = config or default_config(h, d_v, q.dtype)
    if cfg.v_split == 2 and d_v < 32:  # each half needs >= 16 columns for the MMA
        cfg = SparseMLAConfig(bh=min(cfg.bh, 64), bk=cfg.bk, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    n_hb = triton.cdiv(h, cfg.bh)
    if cfg.v_split == 2:
        nsplit = 1
    elif num_splits is not None:
        nsplit = num_splits
    else:
        nsplit = pick_num_splits(t, n_hb, topk, cfg.bk, device_sm_count(q.device)) if AUTO_SPLITS else 1
    nsplit, split_len = split_layout(topk, nsplit, cfg.bk)
    if config is None and nsplit == 1 and prefill_kernel == "auto" and t > 0:
        from .sparse_mla_hopper import hopper_prefill_supported, sparse_mla_prefill_hopper

        if hopper_prefill_supported(q, kv, indices, d_v):
            return sparse_mla_prefill_hopper(q, kv, indices, sm_scale, d_v)
    if nsplit == 1 or t == 0:
        out = torch.empty(t, h, d_v, dtype=q.dtype, device=q.device)
        lse = torch.empty(t, h, dtype=torch.float32, device=q.device)
        if t == 0:
            return out, lse
        o_buf, l_buf = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        o_buf = torch.empty(nsplit, t, h, d_v, dtype=torch.float32, device=q.device)
        l_buf = torch.empty(nsplit, t, h, dtype=torch.float32, device=q.device)
    if cfg.v_split == 2:
        _sparse_mla_vsplit_kernel[(t * n_hb * 2,)](
            q, kv, indices, out, lse,
            t, h, topk, sm_scale * LOG2E,
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1), lse.stride(0),
            DV=d_v, DR=d_r, BH=cfg.bh, BK=cfg.bk, N_HB=n_hb, UPCAST=interpret_mode(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out, lse
    _sparse_mla_kernel[(t * n_hb * nsplit,)](
        q, kv, indices, o_buf, l_buf,
        t, h, topk, nsplit, split_len, sm_scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0),
        o_buf.stride(0), o_buf.stride(1), o_buf.stride(2), l_buf.stride(0), l_buf.stride(1),
        DV=d_v, DR=d_r, BH=cfg.bh, BK=cfg.bk, N_HB=n_hb, UPCAST=interpret_mode(), PREFETCH_IDX=cfg.prefetch_idx,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if nsplit == 1:
        return out, lse
    return merge_splits_triton(o_buf, l_buf, q.dtype)  # partial softmaxes merged by their log-sum-exps
