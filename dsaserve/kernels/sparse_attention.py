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

Decode uses the same kernel (one program per token x head block); ``num_splits`` can split each top-k list
over several programs and merge the partial results by their log-sum-exps (off by default: slower as measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference
from ._common import device_sm_count, interpret_mode, tl, triton

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SPLIT_BY_DEFAULT = False
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

    @triton.jit
    def _sparse_mla_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
        T, H, TOPK, SPLIT_LEN, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_it,
        stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
        DV: tl.constexpr, DR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
        N_HB: tl.constexpr, NSPLIT: tl.constexpr, UPCAST: tl.constexpr,
        PREFETCH_IDX: tl.constexpr,
    ):
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


def _pick_splits(t: int, n_hb: int, topk: int, bk: int, sms: int) -> int:
    """Split the top-k list when tokens x head blocks would leave SMs idle (decode batches).

    Off by default: on H200 the split + torch merge measured slower than one program per (token, head
    block) (t=8: 0.59 ms vs 0.17 ms); kept behind ``num_splits`` until the merge is fused.
    """
    if not SPLIT_BY_DEFAULT:
        return 1
    units = t * n_hb
    if 2 * units > sms:  # at least half the SMs busy: the merge pass would cost more than it gains
        return 1
    max_splits = max(1, triton.cdiv(topk, bk))
    return max(1, min(max_splits, triton.cdiv(sms, units)))


def default_config(h: int, d_v: int, dtype: torch.dtype) -> SparseMLAConfig:
    """Tile shape used when the caller gives none (chosen from the measurements in docs/BENCHMARKS.md)."""
    # fp32 inputs (4-byte rows) take half the key tile so two pipelined [BK, 576] stages fit shared memory
    wide = d_v >= 256 and dtype.itemsize <= 2
    if VSPLIT_BY_DEFAULT and wide:
        return SparseMLAConfig(bh=max(16, min(128, triton.next_power_of_2(h))), bk=32, num_warps=8, num_stages=3,
                               v_split=2)
    return SparseMLAConfig(bh=max(16, min(64, triton.next_power_of_2(h))), bk=64 if wide else 32,
                           num_warps=8 if d_v >= 256 else 4, num_stages=2)


def sparse_mla_triton(q, kv, indices, sm_scale, d_v=512, config: SparseMLAConfig | None = None, num_splits=None):
    """Triton launcher (inputs already checked by ``dsaserve.kernels.sparse_mla``)."""
    t, h, dqk = q.shape
    topk = indices.shape[1]
    d_r = dqk - d_v
    cfg = config or default_config(h, d_v, q.dtype)
    if cfg.v_split == 2 and d_v < 32:  # each half needs >= 16 columns for the MMA
        cfg = SparseMLAConfig(bh=min(cfg.bh, 64), bk=cfg.bk, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = torch.empty(t, h, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(t, h, dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    n_hb = triton.cdiv(h, cfg.bh)
    sms = device_sm_count(q.device)
    nsplit = num_splits if num_splits is not None else _pick_splits(t, n_hb, topk, cfg.bk, sms)
    if cfg.v_split == 2:
        nsplit = 1  # the value-split kernel has no split over top-k
    split_len = triton.cdiv(triton.cdiv(max(topk, 1), nsplit), cfg.bk) * cfg.bk
    nsplit = max(1, triton.cdiv(topk, split_len))
    if nsplit == 1:
        o_buf, l_buf = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        o_buf = torch.empty(nsplit, t, h, d_v, dtype=torch.float32, device=q.device)
        l_buf = torch.empty(nsplit, t, h, dtype=torch.float32, device=q.device)
    if cfg.v_split == 2 and nsplit == 1:
        _sparse_mla_vsplit_kernel[(t * n_hb * 2,)](
            q, kv, indices, out, lse,
            t, h, topk, sm_scale * LOG2E,
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1), lse.stride(0),
            DV=d_v, DR=d_r, BH=cfg.bh, BK=cfg.bk, N_HB=n_hb, UPCAST=interpret_mode(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out, lse
    grid = (t * n_hb * nsplit,)
    _sparse_mla_kernel[grid](
        q, kv, indices, o_buf, l_buf,
        t, h, topk, split_len, sm_scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0),
        o_buf.stride(0), o_buf.stride(1), o_buf.stride(2), l_buf.stride(0), l_buf.stride(1),
        DV=d_v, DR=d_r, BH=cfg.bh, BK=cfg.bk, N_HB=n_hb, NSPLIT=nsplit, UPCAST=interpret_mode(), PREFETCH_IDX=cfg.prefetch_idx,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if nsplit > 1:  # merge the partial softmaxes by their log-sum-exps (empty parts weigh 0)
        merged, tot = reference.merge_attn_states(o_buf, l_buf)
        out.copy_(merged)
        lse.copy_(tot)
    return out, lse
