"""The small fp32 projections (the router logits, the indexer's head weights): x times an fp32 weight.

At decode sizes one Triton launch, split K reduced in the kernel (``splitk``). At prefill sizes on the GPU, for
bf16 x: the weight split exactly into three bf16 parts (``bf16_split3``) and a Triton bf16 tensor-core GEMM over
the three (``_split_gemm_kernel``): every product x_k * part_k is exact in fp32 and the sums are fp32, so this is
an fp32 dot product in another summation order, at bf16 GEMM speed and without the [m, K] fp32 copy of x.

A weight that was stored as bf16 and widened to fp32 (DeepSeek's checkpoints keep the router and the indexer's
head weights in bf16) has two all-zero parts: ``bf16_parts_needed`` counts the parts a weight needs once, after
loading, and ``parts=`` then splits and multiplies only those (the same result: the left-out products are exact
zeros), a third of the tensor-core work."""

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


    @triton.jit
    def _bf16_split3_kernel(w_ptr, out_ptr, numel, BLOCK: tl.constexpr, PARTS: tl.constexpr = 3):
        """out[0], out[1], out[2] (bf16, each numel long) = the round-to-nearest bf16 of w, of what it leaves,
        and of what those two leave: w == out[0] + out[1] + out[2] exactly (module docstring). Only the first
        PARTS are written (the others are zero for the weights they are left out for)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        hi = _round_to_bf16(w)
        tl.store(out_ptr + offs, hi.to(tl.bfloat16), mask=mask)       # exact casts: already bf16 values
        if PARTS > 1:
            r1 = w - hi                                                 # exact: a multiple of w's ulp, < hi's
            mid = _round_to_bf16(r1)
            tl.store(out_ptr + numel + offs, mid.to(tl.bfloat16), mask=mask)
            if PARTS > 2:
                lo = _round_to_bf16(r1 - mid)
                tl.store(out_ptr + 2 * numel + offs, lo.to(tl.bfloat16), mask=mask)

    @triton.jit  # K and stride_x specialized: multiples of 16 make the loads 16-byte cp.async copies
    def _split_gemm_kernel(x_ptr, p_ptr, y_ptr, M, N, K, stride_x, scale, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, UPCAST: tl.constexpr, N_FASTEST: tl.constexpr = False,
                           PARTS: tl.constexpr = 3):
        """y[m, n] = scale * sum_k x[m, k] w[n, k] for bf16 x and an fp32 weight given as its exact bf16 parts
        p [PARTS, N, K] (``bf16_split3``; the parts left out are zero). Each BK step sums its products on the
        tensor core, smallest part first (every product exact), and adds that into an fp32 register accumulator:
        the tensor core's own accumulation, which is not
        IEEE round-to-nearest, then only spans BK columns (over all of K it made 16x cuBLAS fp32's error on H200,
        2026-12-03). UPCAST (the CPU interpreter, whose dot multiplies bf16 as its uint16 storage): the operands
        go to fp32 first, which changes no product (bf16 x bf16 is exact in fp32). N_FASTEST: the grid is
        (column tiles, row tiles), so the programs of one row block run together and read its x rows from DRAM
        once (with several column tiles: the 256-expert router)."""
        if N_FASTEST:
            pid_n = tl.program_id(0)
            pid_m = tl.program_id(1)
        else:
            pid_m = tl.program_id(0)
            pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        x_rows = x_ptr + tl.where(rm < M, rm, 0).to(tl.int64)[:, None] * stride_x
        w_rows = p_ptr + tl.where(rn < N, rn, 0).to(tl.int64)[:, None] * K
        part_stride = N.to(tl.int64) * K
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            kk = k + rk
            km = (kk < K)[None, :]
            x = tl.load(x_rows + kk[None, :], mask=km, other=0.0)                       # [BM, BK] bf16
            if PARTS > 2:
                lo = tl.load(w_rows + 2 * part_stride + kk[None, :], mask=km, other=0.0)   # [BN, BK] bf16
            if PARTS > 1:
                mid = tl.load(w_rows + part_stride + kk[None, :], mask=km, other=0.0)
            hi = tl.load(w_rows + kk[None, :], mask=km, other=0.0)
            if UPCAST:
                x, hi = x.to(tl.float32), hi.to(tl.float32)
                if PARTS > 2:
                    lo = lo.to(tl.float32)
                if PARTS > 1:
                    mid = mid.to(tl.float32)
            if PARTS == 3:
                step = tl.dot(x, tl.trans(lo))                                          # small parts first
                step = tl.dot(x, tl.trans(mid), step)
                step = tl.dot(x, tl.trans(hi), step)
            elif PARTS == 2:
                step = tl.dot(x, tl.trans(mid))
                step = tl.dot(x, tl.trans(hi), step)
            else:
                step = tl.dot(x, tl.trans(hi))
            if PARTS == 1:
                # the same fp32 add: written as an fma by 1 so that Triton does not fold "acc + dot(x, hi)"
                # into the dot's accumulator (the tensor core's accumulation over all of K, see above)
                acc = tl.fma(step, 1.0, acc)
            else:
                acc = acc + step                                                        # fp32, round to nearest
        tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc * scale,
                 mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit
    def _round_to_bf16(x):
        """fp32 -> the nearest bf16 value (ties to even), as fp32, by integer arithmetic on the bits: the same
        on the GPU and under the interpreter (whose own fp32 -> bf16 cast truncates). Finite inputs."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)


F32_GEMV_MAX_M = 64


def bf16_split3_reference(w: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] -> bf16 [3, N, K] with w == sum of the three exactly: each part the round-to-nearest bf16 of
    what the earlier parts leave. A fp32 significand has 24 bits and a bf16 one 8, so three parts hold it; exact
    for 2^-110 <= |w| < 3.39e38 (smaller residuals fall below bf16's subnormals, larger values round to inf;
    weights are never near either)."""
    hi = w.to(torch.bfloat16)
    r1 = w - hi.float()
    mid = r1.to(torch.bfloat16)
    lo = (r1 - mid.float()).to(torch.bfloat16)
    return torch.stack([hi, mid, lo])


def bf16_split3(w: torch.Tensor, backend: str = "auto", parts: int = 3) -> torch.Tensor:
    """``bf16_split3_reference`` in one Triton launch (CUDA, or the CPU interpreter with backend='triton').
    ``parts`` < 3: only the first ``parts`` -> [parts, N, K], for a weight whose other parts are zero
    (``bf16_parts_needed``; with any other weight the sum of what is returned is not w)."""
    if parts not in (1, 2, 3):
        raise ValueError(f"parts must be 1, 2 or 3, got {parts}")
    kernel = triton is not None and (w.is_cuda or (backend == "triton" and interpret_mode())) and backend != "reference"
    if not kernel or not w.is_contiguous() or w.dtype != torch.float32:
        return bf16_split3_reference(w)[:parts]
    out = torch.empty((parts,) + tuple(w.shape), dtype=torch.bfloat16, device=w.device)
    if w.numel():
        block = 1024
        _bf16_split3_kernel[(triton.cdiv(w.numel(), block),)](w, out, w.numel(), BLOCK=block, PARTS=parts,
                                                              num_warps=4)
    return out


def bf16_parts_needed(w: torch.Tensor) -> int:
    """How many of ``bf16_split3``'s parts an fp32 weight needs (1-3): the last nonzero part's number. 1 for a
    weight stored as bf16 and widened (the real DeepSeek-V3.2 router and indexer head weights), 3 for a generic
    fp32 one. Reads the values back to the host (a device sync): call it once the weights are loaded, never in
    a forward. Non-fp32 weights: 3 (they do not take the split path)."""
    if w.dtype != torch.float32:
        return 3
    parts = bf16_split3_reference(w)
    return 3 if bool(parts[2].any()) else 2 if bool(parts[1].any()) else 1


def split_gemm_config(n: int) -> tuple[int, int, int, int, bool]:
    """(BM, BN, warps, stages, N_FASTEST) of ``_split_gemm_kernel`` for N output columns. Measured on H200
    (benchmarks/f32_projections.py, 16K x 7168 rows, 2026-12-04): N = 32 / 64 one column tile; N = 256 (the
    256-expert router) 128 x 128 tiles with a row block's column tiles together, 0.317 ms vs 0.396 for the
    former 128 x 64 tiles in row order (x read from DRAM once instead of per column tile)."""
    if n <= 32:
        return 64, 32, 4, 3, False
    if n <= 64:
        return 64, 64, 4, 3, False
    return 128, 128, 8, 3, True


def linear_f32_split(x2: torch.Tensor, weight: torch.Tensor, scale: float = 1.0, backend: str = "auto",
                     config: tuple[int, int, int, int, bool] | None = None, parts: int = 3) -> torch.Tensor:
    """x2 bf16 [m, K] @ weight^T (fp32 [N, K]) * scale -> fp32 [m, N]: the weight's exact bf16 split, then
    ``_split_gemm_kernel`` (CUDA, or the CPU interpreter with backend='triton'). fp32-class: every product is
    exact, the sums are fp32 in another order than torch's. ``config``: (BM, BN, warps, stages, N_FASTEST), for
    benchmarks (default ``split_gemm_config``). ``parts``: ``bf16_parts_needed(weight)`` when the caller
    counted it (fewer parts, same result); 3 is right for any weight."""
    m, k = x2.shape
    n = weight.shape[0]
    split = bf16_split3(weight.contiguous(), backend=backend, parts=parts)     # [parts, N, K] bf16
    out = torch.empty(m, n, dtype=torch.float32, device=x2.device)
    if m and n:
        bm, bn, warps, stages, n_fastest = config or split_gemm_config(n)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _split_gemm_kernel[grid[::-1] if n_fastest else grid](
            x2, split, out, m, n, k, x2.stride(0), float(scale), BM=bm, BN=bn, BK=64,
            UPCAST=interpret_mode(), N_FASTEST=n_fastest, PARTS=parts, num_warps=warps, num_stages=stages)
    return out


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


def linear_f32(x: torch.Tensor, weight: torch.Tensor, scale: float = 1.0, backend: str = "auto",
               parts: int = 3) -> torch.Tensor:
    """(x.float() @ weight^T) * scale -> fp32 [..., N] for an fp32 weight [N, K] (the router, the indexer's
    weights_proj). CUDA with few rows (decode): one Triton launch (``_f32_gemv_kernel``, split K reduced in the
    kernel) instead of a cast, cuBLAS's GEMV + its split-K reduction and the product; fp32 sums in another
    order than cuBLAS's. CUDA with more rows and bf16 x: ``linear_f32_split`` (module docstring; fp32 sums in
    another order again; ``parts`` as there). Otherwise torch (CPU: exactly the model's former ops). ``backend``:
    'auto', 'triton' (also the CPU interpreter), 'reference'."""
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
    if kernel and triton is not None and m > F32_GEMV_MAX_M and x.dtype == torch.bfloat16 \
            and weight.dtype == torch.float32 and x2.stride(-1) == 1:
        return linear_f32_split(x2, weight, scale, backend=backend, parts=parts).reshape(*lead, n)
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
