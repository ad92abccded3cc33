"""Sparse MLA in the absorbed latent space (Triton): each query attends to its own top-k latent slots.

All heads of a token share one latent key/value row per selected slot (MQA in the 576 = 512 + 64 space),
so a program takes one token and a block of BH heads, gathers BK selected rows at a time (the index load
feeds the row addresses; Triton pipelines both), and runs an online softmax in fp32:
    S = Q_lat K_lat^T + Q_rope K_rope^T      [BH, BK]   (scaled, base 2)
    O = O * alpha + P V,  V = K_lat          [BH, 512]
Programs of one token's head blocks are adjacent so the second gather of the same rows hits L2.

Decode uses the same kernel (one program per token x head block); ``num_splits`` can split each top-k list
over several programs and merge the partial results by their log-sum-exps (off by default: slower as measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import device_sm_count, interpret_mode, tl, triton

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SPLIT_BY_DEFAULT = False


@dataclass(frozen=True)
class SparseMLAConfig:
    """Tile shape of the sparse MLA kernel: BH heads x BK gathered keys per step."""

    bh: int = 64
    bk: int = 64
    num_warps: int = 8
    num_stages: int = 2
    prefetch_idx: bool = False  # load the next tile's slot ids one iteration ahead (measured 8% slower)


if triton is not None:

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
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(k_lat.dtype), k_lat)
            m = m_new

        has = l > 0.0
        o = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
        o_ptrs = out_ptr + split.to(tl.int64) * stride_os + t.to(tl.int64) * stride_ot \
            + heads.to(tl.int64)[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
        tl.store(lse_ptr + split.to(tl.int64) * stride_ls + t.to(tl.int64) * stride_lt + heads, lse, mask=hmask)


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


def sparse_mla_triton(q, kv, indices, sm_scale, d_v=512, config: SparseMLAConfig | None = None, num_splits=None):
    """Triton launcher (inputs already checked by ``dsaserve.kernels.sparse_mla``)."""
    t, h, dqk = q.shape
    topk = indices.shape[1]
    d_r = dqk - d_v
    # fp32 inputs (4-byte rows) take half the key tile so two pipelined [BK, 576] stages fit shared memory
    wide = d_v >= 256 and q.element_size() <= 2
    cfg = config or SparseMLAConfig(
        bh=max(16, min(64, triton.next_power_of_2(h))), bk=64 if wide else 32,
        num_warps=8 if d_v >= 256 else 4, num_stages=2,
    )
    out = torch.empty(t, h, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(t, h, dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    n_hb = triton.cdiv(h, cfg.bh)
    sms = device_sm_count(q.device)
    nsplit = num_splits if num_splits is not None else _pick_splits(t, n_hb, topk, cfg.bk, sms)
    split_len = triton.cdiv(triton.cdiv(max(topk, 1), nsplit), cfg.bk) * cfg.bk
    nsplit = max(1, triton.cdiv(topk, split_len))
    if nsplit == 1:
        o_buf, l_buf = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        o_buf = torch.empty(nsplit, t, h, d_v, dtype=torch.float32, device=q.device)
        l_buf = torch.empty(nsplit, t, h, dtype=torch.float32, device=q.device)
    grid = (t * n_hb * nsplit,)
    _sparse_mla_kernel[grid](
        q, kv, indices, o_buf, l_buf,
        t, h, topk, split_len, sm_scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0),
        o_buf.stride(0), o_buf.stride(1), o_buf.stride(2), l_buf.stride(0), l_buf.stride(1),
        DV=d_v, DR=d_r, BH=cfg.bh, BK=cfg.bk, N_HB=n_hb, NSPLIT=nsplit, UPCAST=interpret_mode(), PREFETCH_IDX=cfg.prefetch_idx,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if nsplit > 1:
        # merge the partial softmaxes: weights exp(lse_i - lse), empty parts (lse = -inf) weigh 0
        tot = torch.logsumexp(l_buf, dim=0)  # [t, h]
        safe = torch.where(torch.isfinite(tot), tot, torch.zeros_like(tot))
        wts = torch.exp(l_buf - safe[None])  # [nsplit, t, h]
        out.copy_((wts[..., None] * o_buf).sum(0))
        lse.copy_(tot)
    return out, lse
