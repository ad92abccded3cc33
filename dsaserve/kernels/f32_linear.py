"""Small fp32 projections at decode sizes (the router logits, the indexer's head weights): x (any float dtype)
times an fp32 weight in one launch, split K reduced in the kernel (``splitk``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import device_sm_count, interpret_mode, tl, triton
from .splitk import _split_counters

if triton is not None:
    from .splitk import _store_tile

    @triton.jit
    def _f32_gemv_kernel(x_ptr, w_ptr, c_ptr, M, N, K, stride_x, stride_w, kb_per_split, scale,
                         BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                         o_ptr=None, cnt_ptr=None, REDUCE_IN_KERNEL: tl.constexpr = False):
        """c[m, n] = scale * sum_k x[m, k] w[n, k] in fp32 (x any float dtype, w fp32): the small fp32
        projections a decode step runs per layer (router logits, the indexer's head weights). Program
        (row m, column tile, K split); split K reduced in the kernel (``splitk._store_tile``; each split's
        partial carries the scale)."""
        row = tl.program_id(0)
        pid = tl.program_id(1) // SPLIT_K
        pid_k = tl.program_id(1) % SPLIT_K
        rn = pid * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        rn_ld = tl.where(rn < N, rn, 0).to(tl.int64)
        k0 = pid_k * kb_per_split * BK
        k1 = tl.minimum(k0 + kb_per_split * BK, K)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k in tl.range(k0, k1, BK, num_stages=NUM_STAGES):
            kk = k + rk
            w = tl.load(w_ptr + rn_ld[:, None] * stride_w + kk[None, :], mask=(kk < k1)[None, :], other=0.0)
            x = tl.load(x_ptr + row.to(tl.int64) * stride_x + kk, mask=kk < k1, other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        tile = row * tl.cdiv(N, BN) + pid                               # the (row, column tile) counter
        _store_tile((acc * scale)[None, :], row + tl.arange(0, 1), rn, tile, pid_k, M, N, N, c_ptr, o_ptr, cnt_ptr,
                    1, BN, SPLIT_K, False, REDUCE_IN_KERNEL, False)

    @triton.jit
    def _to_f32_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        """out = x as fp32 (exact), one BLOCK of a contiguous tensor a program, 16-byte accesses."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), mask=mask)


F32_GEMV_MAX_M = 64


def to_f32(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` of a contiguous bf16 / fp16 tensor in one vectorized Triton pass: torch's casting copy
    runs its non-vectorized kernel (~1 TB/s on H200: 0.35 ms for a 16K x 7168 chunk's router input, twice a
    layer), this one reads and writes at the copy bandwidth. Other inputs: ``x.float()``."""
    if triton is None or not (x.is_cuda or interpret_mode()) or x.dtype not in (torch.bfloat16, torch.float16) \
            or not x.is_contiguous():
        return x.float()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.numel():
        block = 4096
        _to_f32_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block, num_warps=8)
    return out


def linear_f32(x: torch.Tensor, weight: torch.Tensor, scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """(x.float() @ weight^T) * scale -> fp32 [..., N] for an fp32 weight [N, K] (the router, the indexer's
    weights_proj). CUDA with few rows (decode): one Triton launch (``_f32_gemv_kernel``, split K reduced in the
    kernel) instead of a cast, cuBLAS's GEMV + its split-K reduction and the product; fp32 sums in another
    order than cuBLAS's. Otherwise torch (CPU: exactly the model's former ops). ``backend``: 'auto', 'triton'
    (also the CPU interpreter), 'reference'."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], weight.shape[0]
    kernel = (x.is_cuda or (backend == "triton" and interpret_mode())) and backend != "reference"
    counters = split = None
    if kernel and triton is not None and weight.dtype == torch.float32 and 0 < m <= F32_GEMV_MAX_M \
            and weight.stride(-1) == 1 and x2.stride(-1) == 1:
        bn, bk = 32, 256
        tiles = triton.cdiv(n, bn)
        kb = triton.cdiv(k, bk)
        split = max(1, min(kb, triton.cdiv(4 * device_sm_count(x.device), m * tiles)))
        kb_per_split = triton.cdiv(kb, split)
        split = triton.cdiv(kb, kb_per_split)
        counters = _split_counters(x.device, m * tiles) if split > 1 else None
    if split is None or (split > 1 and counters is None):  # torch (no counter buffer: first use in a capture)
        y = F.linear(to_f32(x) if x.is_cuda else x.float(), weight)
        return y * scale if scale != 1.0 else y
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    c = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    _f32_gemv_kernel[(m, tiles * split)](
        x2, weight, c, m, n, k, x2.stride(0), weight.stride(0), kb_per_split, float(scale), BN=bn, BK=bk,
        SPLIT_K=split, NUM_STAGES=3, o_ptr=out if counters is not None else None, cnt_ptr=counters,
        REDUCE_IN_KERNEL=counters is not None, num_warps=4)
    return out.reshape(*lead, n)
