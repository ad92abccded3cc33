"""Indexer logits in Triton: fp8 MQA scores over per-row key ranges (prefill) and over paged keys (decode).

Both kernels compute ``k_scale[j] * sum_h w[i, h] * relu(q[i, h] . k[j])``. The tile product is taken as
K @ Q^T, i.e. [BK keys, D] x [D, BQ queries * H heads]: the head reduction then runs along the MMA's N
dimension, which each thread mostly holds in its own registers (a few lane shuffles finish it), instead of
across warps through shared memory as Q @ K^T would need. ``k_scale`` is applied after the reduction
(relu(x * s) = s * relu(x) for the positive per-key scale).

The prefill kernel is persistent: ``num_sms * CTAS_PER_SM`` programs walk blocks of BQ queries in turn; for
each block they write -inf over key tiles wholly outside the block's range (no loads, no math) and compute
the tiles inside it, masking to each row's own [ks, ke) at the edges. Giving the kernel fewer SMs
(``num_sms``) leaves SMs free for a communication kernel (see dsaserve/parallel/sm_budget.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import device_sm_count, tl, triton


@dataclass(frozen=True)
class LogitsConfig:
    """Tile shape and launch knobs of the prefill logits kernel (BQ queries x all heads per MMA column block)."""

    # defaults: the fastest of 9 variants on H200 (benchmarks/kernels.py, 2026-11-28): 897 TFLOPS on the
    # 8K x 64K causal chunk, vs 708 for (2, 128, 8 warps, 1 CTA/SM); 918 in the 2026-12-02 sweep (4 variants)
    bq: int = 4  # queries per block: the MMA N dimension is bq * H
    bk: int = 64  # keys per tile: the MMA M dimension
    num_warps: int = 4
    num_stages: int = 3
    ctas_per_sm: int = 2  # resident programs per SM: one program's MMA overlaps the other's epilogue


if triton is not None:

    @triton.jit
    def _logits_epilogue(s, w, ksc, kk, ks, ke, BK: tl.constexpr, BQ: tl.constexpr, H: tl.constexpr):
        """[BK, BQ*H] raw dots -> [BK, BQ] masked logits."""
        s = tl.maximum(s, 0.0) * w[None, :]
        lg = tl.sum(tl.reshape(s, (BK, BQ, H)), axis=2) * ksc[:, None]  # [BK, BQ]
        valid = (kk[:, None] >= ks[None, :]) & (kk[:, None] < ke[None, :])
        return tl.where(valid, lg, float("-inf"))

    @triton.jit
    def _mqa_logits_kernel(
        q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr,
        S, SKV, NUM_PROGS,
        H: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, KEY_STRIDE: tl.constexpr = 1,
    ):
        # KEY_STRIDE > 1: output column j is key j * KEY_STRIDE (SKV columns), and a row's [ks, ke) is in keys,
        # so its columns are [ceil(ks / KEY_STRIDE), ceil(ke / KEY_STRIDE))
        pid = tl.program_id(0)
        n_qb = tl.cdiv(S, BQ)
        n_kb = tl.cdiv(SKV, BK)
        cols = tl.arange(0, BQ * H)  # MMA columns: (query, head) pairs
        d = tl.arange(0, D)
        kr = tl.arange(0, BK)
        for qb in range(pid, n_qb, NUM_PROGS):
            q0 = qb * BQ
            qrow = q0 + cols // H  # [BQ*H]
            qmask = qrow < S
            q = tl.load(q_ptr + (qrow.to(tl.int64) * H + cols % H)[:, None] * D + d[None, :],
                        mask=qmask[:, None], other=0.0)  # [BQ*H, D] fp8
            qt = tl.trans(q)  # [D, BQ*H]
            w = tl.load(w_ptr + qrow.to(tl.int64) * H + cols % H, mask=qmask, other=0.0)  # [BQ*H]
            qi = q0 + tl.arange(0, BQ)  # [BQ]
            qim = qi < S
            ks = tl.load(ks_ptr + qi, mask=qim, other=0)
            ke = tl.load(ke_ptr + qi, mask=qim, other=0)
            if KEY_STRIDE > 1:
                ks = (tl.maximum(ks, 0) + (KEY_STRIDE - 1)) // KEY_STRIDE
                ke = (tl.maximum(ke, 0) + (KEY_STRIDE - 1)) // KEY_STRIDE
            ks = tl.maximum(ks, 0)
            ke = tl.minimum(ke, SKV)
            live = qim & (ke > ks)
            lo = tl.min(tl.where(live, ks, SKV), axis=0)
            hi = tl.max(tl.where(live, ke, 0), axis=0)
            kb_lo = lo // BK
            kb_hi = tl.where(hi > lo, tl.cdiv(hi, BK), kb_lo)
            row_off = qi.to(tl.int64) * SKV  # [BQ]
            neg = tl.full((BK, BQ), float("-inf"), tl.float32)
            # tiles wholly outside every row's range: -inf only
            for kb in range(0, kb_lo):
                kk = kb * BK + kr
                tl.store(out_ptr + row_off[None, :] + kk[:, None], neg, mask=(kk < SKV)[:, None] & qim[None, :])
            for kb in range(kb_hi, n_kb):
                kk = kb * BK + kr
                tl.store(out_ptr + row_off[None, :] + kk[:, None], neg, mask=(kk < SKV)[:, None] & qim[None, :])
            for kb in range(kb_lo, kb_hi):
                kk = kb * BK + kr  # [BK]
                kmask = kk < SKV
                krow = kk.to(tl.int64) * KEY_STRIDE  # [BK]: the keys' rows
                k = tl.load(k_ptr + krow[:, None] * D + d[None, :], mask=kmask[:, None], other=0.0)
                s = tl.dot(k, qt)  # [BK, BQ*H] fp32
                ksc = tl.load(ksc_ptr + krow, mask=kmask, other=0.0)
                lg = _logits_epilogue(s, w, ksc, kk, ks, ke, BK, BQ, H)
                tl.store(out_ptr + row_off[None, :] + kk[:, None], lg, mask=kmask[:, None] & qim[None, :])

    @triton.jit
    def _paged_mqa_logits_kernel(
        q_ptr, kc_ptr, ksc_ptr, w_ptr, lens_ptr, bt_ptr, out_ptr,
        B, MAX_PAGES, NUM_PROGS,
        H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, PPT: tl.constexpr,
    ):
        """Work unit = (request, tile of PPT pages); units past a request's context only write -inf."""
        pid = tl.program_id(0)
        tiles_per_req = tl.cdiv(MAX_PAGES, PPT)
        n_units = B * tiles_per_req
        BK: tl.constexpr = PAGE * PPT
        h = tl.arange(0, H)
        d = tl.arange(0, D)
        kr = tl.arange(0, BK)
        n_cols = MAX_PAGES * PAGE
        for u in range(pid, n_units, NUM_PROGS):
            b = u // tiles_per_req
            t = u % tiles_per_req
            length = tl.load(lens_ptr + b)
            pos = t * BK + kr  # [BK] token positions within the request
            page_i = pos // PAGE
            in_table = page_i < MAX_PAGES
            out_offs = b.to(tl.int64) * n_cols + pos
            if t * BK < length:
                page = tl.load(bt_ptr + b.to(tl.int64) * MAX_PAGES + page_i, mask=in_table, other=0)
                valid = in_table & (pos < length)
                slot = page.to(tl.int64) * PAGE + pos % PAGE  # [BK]
                k = tl.load(kc_ptr + slot[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)  # [BK, D]
                q = tl.load(q_ptr + (b.to(tl.int64) * H + h)[:, None] * D + d[None, :])  # [H, D]
                w = tl.load(w_ptr + b.to(tl.int64) * H + h)  # [H]
                s = tl.dot(k, tl.trans(q))  # [BK, H]
                lg = tl.sum(tl.maximum(s, 0.0) * w[None, :], axis=1)  # [BK]
                ksc = tl.load(ksc_ptr + slot, mask=valid, other=0.0)
                lg = tl.where(valid, lg * ksc, float("-inf"))
                tl.store(out_ptr + out_offs, lg, mask=in_table)
            else:
                tl.store(out_ptr + out_offs, tl.full((BK,), float("-inf"), tl.float32), mask=in_table)


def default_config(h: int) -> LogitsConfig:
    """Default tiles for H heads: BQ so that the MMA N dimension (BQ * H) is 256 where possible (H200,
    2026-12-02, 8K x 64K causal: H=32 with BQ=8 874 TFLOPS vs 751 with BQ=4; H=64 keeps BQ=4, 918)."""
    return LogitsConfig(bq=max(1, min(16, 256 // h)))


def mqa_logits_triton(q_fp8, k_fp8, k_scale, weights, ks, ke, num_sms=None, config: LogitsConfig | None = None,
                      key_stride: int = 1):
    """Triton launcher for prefill logits (inputs already checked by ``dsaserve.kernels.mqa_logits``); with
    ``key_stride`` > 1 only keys 0, key_stride, 2 key_stride, ... (columns of the [S, ceil(Skv / key_stride)]
    output), read in place."""
    s, h, d = q_fp8.shape
    cfg = config or default_config(h)
    skv = -(-k_fp8.shape[0] // key_stride)
    out = torch.empty(s, skv, dtype=torch.float32, device=q_fp8.device)
    if s == 0 or skv == 0:
        return out
    sms = num_sms if num_sms is not None else device_sm_count(q_fp8.device)
    bq = max(cfg.bq, 16 // h if h < 16 else 1)  # MMA N = bq * H must be >= 16
    n_qb = triton.cdiv(s, bq)
    progs = max(1, min(sms * cfg.ctas_per_sm, n_qb))
    _mqa_logits_kernel[(progs,)](
        q_fp8, k_fp8, k_scale, weights, ks, ke, out, s, skv, progs,
        H=h, D=d, BQ=bq, BK=cfg.bk, KEY_STRIDE=key_stride, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def paged_mqa_logits_triton(q_fp8, k_cache, k_scale_cache, weights, context_lens, block_table, num_sms=None):
    """Triton launcher for decode logits over the paged key cache."""
    b, h, d = q_fp8.shape
    max_pages = block_table.shape[1]
    page = k_cache.shape[1]
    out = torch.empty(b, max_pages * page, dtype=torch.float32, device=q_fp8.device)
    if b == 0 or max_pages == 0:
        return out
    ppt = 2 if h * d <= 64 * 128 else 1
    sms = num_sms if num_sms is not None else device_sm_count(q_fp8.device)
    n_units = b * triton.cdiv(max_pages, ppt)
    progs = max(1, min(sms * 2, n_units))
    _paged_mqa_logits_kernel[(progs,)](
        q_fp8, k_cache, k_scale_cache, weights, context_lens, block_table, out, b, max_pages, progs,
        H=h, D=d, PAGE=page, PPT=ppt, num_warps=4, num_stages=2,
    )
    return out
