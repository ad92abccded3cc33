"""fp8 block-scaled linear layers, DeepSeek's recipe: ``y = x @ dequant(W)^T`` with fp8 operands.

Numerics contract (the CPU path computes exactly this; every device path is tested against it):

    x_fp8, x_scale = act_quant(x, 128)               # per token, per 128 input channels (1x128 scales)
    W = w_fp8 * scale_inv  per 128x128 block         # DeepSeek's ``weight_scale_inv`` layout
    y = (dequant(x_fp8, x_scale) @ W^T) in fp32      # -> out_dtype

Weights are prepared once at load (``prepare_fp8_weight``): rows and columns are zero-padded to multiples of
16 (cuBLASLt's fp8 alignment; the real shapes need none: 576, 2112, 1536, 7168 are all multiples of 16)
and the scales are padded to a multiple of 4 block columns, which is the layout torch's
``F.scaled_mm(..., BlockWise1x128, ..., BlockWise128x128)`` asks of the weight side (scale_b =
``scale.t()``: shape [round_up(ceil(K/128), 4), ceil(N/128)], strides (1, round_up(ceil(K/128), 4))).
The activation scale must be "outer-dim-major" (shape [M, ceil(K/128)], strides (1, M)); cuBLASLt also
wants M a multiple of 4, so activations are padded by up to 3 rows per call.

Backends (``backend=``): 'auto' (CUDA: torch ``scaled_mm`` = cuBLASLt for M > ``TRITON_MAX_M``, the Triton
kernel below with split K for smaller M; CPU: the reference), 'cublas', 'triton' (CUDA, or the CPU
interpreter under TRITON_INTERPRET=1), 'reference'. benchmarks/gemm.py checks every GPU variant against the
reference and against the statistical error bound below.

Error bound of the fp8 path against the exact product with the dequantized weight, ``y_ref = x @ W^T``
(fp32), for output element (m, j); s(m, k) is the activation scale of x[m, k]'s group and
e(m, k) = 2^-4 |x[m, k]| + 2^-10 s(m, k) bounds the e4m3 rounding error of x[m, k] (3 mantissa bits: half
an ulp is <= 2^-4 of the value; subnormals: spacing 2^-9 s):

  worst case:   |y - y_ref| <= sum_k e(m,k) |W[j,k]| + 2^-10 sum_k |x[m,k]| |W[j,k]| + u_out |y|
  statistical:  |y - y_ref| <= c * sqrt(sum_k e(m,k)^2 W[j,k]^2 / 3) + 2^-12 sum_k |x| |W| + u_out |y|

The middle terms cover the accumulation (fp32, and Hopper's reduced-precision fp8 MMA accumulator between
the 128-wide promotions), u_out = half an ulp of out_dtype (2^-8 for bf16). The worst case aligns every
rounding error and is about |y| itself for random data (K = 512); the statistical form treats the
roundings as independent, zero-mean, uniform within +-e (variance e^2/3), c = 6 standard deviations
(capped by the worst case, which is smaller when a few terms dominate the sum).
``fp8_linear_error_bound(..., sigmas=None | c)`` computes either. Typical relative error
||y - y_ref|| / ||y_ref|| is about 2.5% for Gaussian activations (tests/kernels/test_fp8_linear.py measures
it). The weight's own quantization error is not part of this bound: an fp8 checkpoint *is* the dequantized
weight; for ``quantize_weight_fp8`` of a bf16 checkpoint add the same terms with x and W swapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsaserve.kernels.block_fp8 import dequantize_block_fp8, quantize_block_fp8

from . import act_quant
from . import reference as R
from ._common import KernelInputError, check, device_sm_count, interpret_mode, tl, triton
from .splitk import _split_counters, round_bf16_in_interpreter

FP8 = torch.float8_e4m3fn
BLOCK = 128  # quantization block: 1x128 for activations, 128x128 for weights
# cuBLASLt's fp8 GEMM wants K and N multiples of 16 and the column-major activation scales' leading
# dimension (M) a multiple of 4 (16 bytes).
_ALIGN_NK = 16
_ALIGN_M = 4
# 'auto' on CUDA: the Triton kernel (split K) for M <= TRITON_MAX_M (decode batches), cuBLASLt above. At
# prefill sizes cuBLASLt wins (benchmarks/results/gemm_h200_2026-12-02.md); the decode rows there were timed
# eagerly and are bound by launch overhead on that machine, so the crossover is not measured yet: 64 keeps
# cuBLASLt's weak small-M blockwise kernels off decode batches of up to 64 tokens.
TRITON_MAX_M = 64
# In-GEMM activation quantization (QUANT_A: the GEMM quantizes x itself, bit-identical) for row tiles up to this
# height; 0 = off. Off by default: with it, every column tile re-quantizes its rows (IEEE divisions, on 16 copies
# of the one row at batch 1) and the batch-1 GEMMs ran 1.5x slower than act_quant + the GEMM on the e4m3 copy,
# launch included (benchmarks/decode_kernels.py, H200 2026-12-02 session 3, o_proj at M = 1: 57.7 vs 44.0 us).
QUANT_IN_GEMM_MAX_BM = 0
# act_quant's scale of an all-zero group (cuBLASLt's pad rows): AMAX_MIN / 448 divided in fp32, as act_quant does
_ZERO_ROW_SCALE = float(torch.tensor(R.AMAX_MIN, dtype=torch.float32) / torch.tensor(R.FP8_MAX, dtype=torch.float32))

# Error-bound constants (see the module docstring).
_REL_NORMAL = 2.0**-4
_REL_SUBNORMAL = 2.0**-10
_REL_ACCUM_WORST = 2.0**-10
_REL_ACCUM_STAT = 2.0**-12


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


@dataclass(frozen=True)
class Fp8LinearWeight:
    """A block-scaled fp8 weight in the layout the fast paths want; built once by ``prepare_fp8_weight``.

    weight: [N_pad, K_pad] e4m3, row-major, zero rows/columns past (out_features, in_features)
            (N_pad, K_pad = out/in features rounded up to 16)
    scale:  [ceil(N/128), round_up(ceil(K/128), 4)] fp32, contiguous; block (i, j) holds scale_inv[i, j],
            the padding columns hold 0 and are never read
    """

    weight: torch.Tensor
    scale: torch.Tensor
    out_features: int
    in_features: int

    @property
    def k_blocks(self) -> int:
        return _cdiv(self.in_features, BLOCK)

    def unpadded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_fp8 [N, K], scale_inv [ceil(N/128), ceil(K/128)]): the checkpoint's tensors (views)."""
        n, k = self.out_features, self.in_features
        return self.weight[:n, :k], self.scale[:, : self.k_blocks]

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scale.numel() * 4


def prepared_fp8_shapes(out_features: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(weight, scale) shapes of the ``prepare_fp8_weight`` layout of an [out, in] weight, for callers that
    allocate it up front and fill the checkpoint-shaped views (``Fp8LinearWeight.unpadded``) in place."""
    weight = (_round_up(out_features, _ALIGN_NK), _round_up(in_features, _ALIGN_NK))
    return weight, (_cdiv(out_features, BLOCK), _round_up(_cdiv(in_features, BLOCK), 4))


def _check_weight(w_fp8: torch.Tensor, scale_inv: torch.Tensor, name: str) -> tuple[int, int]:
    check(w_fp8.dim() == 2 and w_fp8.dtype == FP8,
          f"{name}: w_fp8 must be a 2-D float8_e4m3fn [N, K] tensor, got {w_fp8.dtype} {tuple(w_fp8.shape)}")
    n, k = w_fp8.shape
    want = (_cdiv(n, BLOCK), _cdiv(k, BLOCK))
    check(scale_inv.dim() == 2 and tuple(scale_inv.shape) == want,
          f"{name}: scale_inv must be [ceil(N/128), ceil(K/128)] = {want} for a [{n}, {k}] weight, "
          f"got {tuple(scale_inv.shape)}")
    check(scale_inv.dtype == torch.float32, f"{name}: scale_inv must be float32, got {scale_inv.dtype}")
    check(scale_inv.device == w_fp8.device, f"{name}: weight on {w_fp8.device}, scale_inv on {scale_inv.device}")
    return n, k


def prepare_fp8_weight(w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> Fp8LinearWeight:
    """Load-time layout for ``fp8_linear_prepared``: pad the weight to 16 and the scales to 4 block columns.

    w_fp8 [N, K] e4m3, scale_inv [ceil(N/128), ceil(K/128)] fp32 (a checkpoint's ``weight_scale_inv``).
    Copies only when padding is needed (the weight of every real DeepSeek-V3.2 layer needs none; the
    scales of layers with ceil(K/128) not a multiple of 4 get a padded copy of a few KB).
    """
    n, k = _check_weight(w_fp8, scale_inv, "prepare_fp8_weight")
    n_pad, k_pad = _round_up(n, _ALIGN_NK), _round_up(k, _ALIGN_NK)
    w = w_fp8.contiguous()
    if (n_pad, k_pad) != (n, k):
        w = torch.zeros(n_pad, k_pad, dtype=FP8, device=w_fp8.device)
        w[:n, :k] = w_fp8
    nk = _cdiv(k, BLOCK)
    nk4 = _round_up(nk, 4)
    s = scale_inv.contiguous()
    if nk4 != nk:
        s = torch.zeros(scale_inv.shape[0], nk4, dtype=torch.float32, device=scale_inv.device)
        s[:, :nk] = scale_inv
    return Fp8LinearWeight(weight=w, scale=s, out_features=n, in_features=k)


def quantize_weight_fp8(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``--quantization fp8`` of a bf16/fp32 weight: [..., N, K] -> (e4m3 [..., N, K], fp32 [..., ceil(N/128),
    ceil(K/128)]), one scale per 128x128 block (``kernels.block_fp8.quantize_block_fp8``, per matrix)."""
    check(w.dim() >= 2 and w.dtype.is_floating_point,
          f"quantize_weight_fp8: w must be a floating [..., N, K] tensor, got {w.dtype} {tuple(w.shape)}")
    if w.dim() == 2:
        return quantize_block_fp8(w, (BLOCK, BLOCK), ue8m0)
    flat = w.reshape(-1, *w.shape[-2:])
    parts = [quantize_block_fp8(m, (BLOCK, BLOCK), ue8m0) for m in flat]
    q = torch.stack([p[0] for p in parts]).reshape(w.shape)
    s = torch.stack([p[1] for p in parts]).reshape(*w.shape[:-2], *parts[0][1].shape)
    return q, s


# ----------------------------------------------------------------------------------------------- reference
def fp8_linear_reference(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The numerics contract on any device: quantize x per 1x128, dequantize both, fp32 matmul, cast."""
    n, k = _check_weight(w_fp8, scale_inv, "fp8_linear_reference")
    x2 = x.reshape(-1, k)
    y = _quantized_reference(*R.act_quant(x2, BLOCK), w_fp8, scale_inv, out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _quantized_reference(xq: torch.Tensor, xs: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """The reference's second half: act_quant's (xq [M, K], xs [M, ceil(K/128)]) and the weight dequantized,
    fp32 matmul, cast."""
    y = R.act_dequant(xq, xs, BLOCK) @ dequantize_block_fp8(w_fp8, scale_inv, (BLOCK, BLOCK)).t()
    return y.to(out_dtype)


def fp8_linear_error_bound(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                           out_dtype: torch.dtype | None = None, sigmas: float | None = None) -> torch.Tensor:
    """Bound on |fp8_linear(x) - x @ W^T| per output element (fp32 [..., N]; see the module docstring):
    the worst case (``sigmas=None``) or the statistical one with ``sigmas`` standard deviations."""
    n, k = _check_weight(w_fp8, scale_inv, "fp8_linear_error_bound")
    x2 = x.reshape(-1, k).float()
    _, xs = R.act_quant(x2, BLOCK)
    s_full = xs.repeat_interleave(min(BLOCK, k), dim=-1)[:, :k]  # [M, K] scale of each element's group
    w = dequantize_block_fp8(w_fp8, scale_inv, (BLOCK, BLOCK))
    e = _REL_NORMAL * x2.abs() + _REL_SUBNORMAL * s_full  # [M, K] rounding error bound per element
    xw = x2.abs() @ w.abs().t()
    bound = e @ w.abs().t() + _REL_ACCUM_WORST * xw
    if sigmas is not None:  # never above the worst case (a few dominant terms)
        bound = torch.minimum(bound, sigmas * ((e * e) @ (w * w).t() / 3).sqrt() + _REL_ACCUM_STAT * xw)
    out_ulp = torch.finfo(out_dtype or x.dtype).eps / 2  # half an ulp, relative
    bound = bound + out_ulp * ((x2 @ w.t()).abs() + bound)  # rounding of the (possibly larger) computed value
    return bound.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------- public
def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor,
               out_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(w_fp8 [N, K], scale_inv)^T with 1x128 activation quantization.

    Convenience form that prepares the weight on every call; layers should call ``prepare_fp8_weight``
    once at load and ``fp8_linear_prepared`` per step.
    """
    _check_weight(w_fp8, scale_inv, "fp8_linear")
    if backend == "reference" or (backend == "auto" and not x.is_cuda):
        _check_x(x, w_fp8.shape[1], "fp8_linear")
        return fp8_linear_reference(x, w_fp8, scale_inv, out_dtype)
    return fp8_linear_prepared(x, prepare_fp8_weight(w_fp8, scale_inv), out_dtype, backend)


def _check_x(x: torch.Tensor, k: int, name: str) -> None:
    check(x.dtype in (torch.bfloat16, torch.float16, torch.float32),
          f"{name}: x must be bf16/fp16/fp32, got {x.dtype}")
    check(x.dim() >= 1 and x.shape[-1] == k,
          f"{name}: x's last dim must equal the weight's in_features {k}, got shape {tuple(x.shape)}")


def fp8_linear_prepared(x: torch.Tensor, w: Fp8LinearWeight, out_dtype: torch.dtype | None = None,
                        backend: str = "auto", config: "Fp8GemmConfig | None" = None,
                        x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``fp8_linear`` with a weight from ``prepare_fp8_weight``: x [..., K] -> [..., N] in out_dtype
    (default x.dtype). ``config`` picks the Triton tile (default: by M). ``x_fp8``: (e4m3 [..., K], scales
    [..., ceil(K/128)]) = ``act_quant(x, 128)`` made by the caller (e.g. fused into a norm); the Triton and
    cuBLASLt paths then skip their own act_quant (same result), the reference ignores it."""
    _check_x(x, w.in_features, "fp8_linear")
    check(x.device == w.weight.device, f"fp8_linear: x on {x.device}, weight on {w.weight.device}")
    out_dtype = out_dtype or x.dtype
    check(out_dtype in (torch.bfloat16, torch.float16, torch.float32),
          f"fp8_linear: out_dtype must be bf16/fp16/fp32, got {out_dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    m = x2.shape[0]
    if backend == "auto":
        backend = ("triton" if m <= TRITON_MAX_M else "cublas") if x.is_cuda else "reference"
    if x_fp8 is not None and backend != "reference":
        xq, xs = x_fp8
        check(xq.dtype == FP8 and xq.shape == x.shape and xs.shape == (*lead, w.k_blocks),
              f"fp8_linear: x_fp8 must be act_quant(x, 128): e4m3 {tuple(x.shape)} and scales "
              f"{(*lead, w.k_blocks)}, got {xq.dtype} {tuple(xq.shape)} and {tuple(xs.shape)}")
        x_fp8 = (xq.reshape(m, -1), xs.reshape(m, -1))                          # [m, K], [m, ceil(K/128)]
    if backend == "reference":
        y = fp8_linear_reference(x2, *w.unpadded(), out_dtype)
    elif backend == "cublas":
        check(x.is_cuda, "fp8_linear: backend='cublas' needs CUDA tensors")
        y = _cublas_blockwise(x2, w, out_dtype, x_fp8)
    elif backend == "triton":
        check(triton is not None, "fp8_linear: backend='triton' needs triton installed")
        check(x.is_cuda or interpret_mode(),
              "fp8_linear: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        cfg = config or default_gemm_config(m)
        if x_fp8 is not None:
            y = fp8_gemm_triton(*x_fp8, w, out_dtype, cfg)
        elif cfg.tma or cfg.bm > QUANT_IN_GEMM_MAX_BM or x2.dtype not in (torch.bfloat16, torch.float32):
            xq, xs = act_quant(x2, BLOCK)
            y = fp8_gemm_triton(xq, xs, w, out_dtype, cfg)
        else:  # decode-sized M: the GEMM quantizes x itself (one launch, same bits)
            y = fp8_gemm_triton(x2.contiguous(), None, w, out_dtype, cfg)
    else:
        raise KernelInputError(f"fp8_linear: backend must be auto/cublas/triton/reference, got {backend!r}")
    return y.reshape(*lead, w.out_features)


def fp8_linear_quantized(xq: torch.Tensor, xs: torch.Tensor, w: Fp8LinearWeight, out_dtype: torch.dtype,
                         backend: str = "auto") -> torch.Tensor:
    """``fp8_linear_prepared`` on an input that exists only quantized: xq [M, K] e4m3 and xs [M, ceil(K/128)] fp32,
    ``act_quant``'s output of some x (e.g. made in the epilogue of the kernel that computed x) -> [M, N] in
    out_dtype: what ``fp8_linear_prepared(x, w, out_dtype, x_fp8=(xq, xs))`` gives, without x. 'auto': cuBLASLt
    on CUDA above ``TRITON_MAX_M`` rows, the Triton GEMM below, the reference (act_dequant, fp32 matmul) on CPU."""
    check(xq.dim() == 2 and xq.dtype == FP8 and xq.shape[1] == w.in_features,
          f"fp8_linear_quantized: xq must be e4m3 [M, {w.in_features}], got {xq.dtype} {tuple(xq.shape)}")
    m = xq.shape[0]
    check(xs.shape == (m, w.k_blocks) and xs.dtype == torch.float32,
          f"fp8_linear_quantized: xs must be fp32 [{m}, {w.k_blocks}], got {xs.dtype} {tuple(xs.shape)}")
    check(xq.device == w.weight.device, f"fp8_linear_quantized: x on {xq.device}, weight on {w.weight.device}")
    if backend == "auto":
        backend = ("triton" if m <= TRITON_MAX_M else "cublas") if xq.is_cuda else "reference"
    if backend == "reference":
        return _quantized_reference(xq, xs, *w.unpadded(), out_dtype)
    if backend == "cublas":
        check(w.weight.shape[1] == w.in_features, "fp8_linear_quantized: cuBLASLt takes a quantized input only "
              f"when K ({w.in_features}) needs no padding (a multiple of 16)")
        return _cublas_blockwise(xq, w, out_dtype, (xq, xs))
    if backend == "triton":
        return fp8_gemm_triton(xq, xs, w, out_dtype)
    raise KernelInputError(f"fp8_linear_quantized: backend must be auto/cublas/triton/reference, got {backend!r}")


def _cublas_operands(x2: torch.Tensor, w: Fp8LinearWeight,
                     x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cuBLASLt's activation operands: act_quant of x2 [m, K] zero-padded to [m_pad, K_pad] -> (e4m3
    [m_pad, K_pad], scales [m_pad, ceil(K/128)] outer-dim-major: strides (1, m_pad)). With ``x_fp8`` =
    act_quant(x2, 128) ([m, K], [m, ceil(K/128)]) and no column padding, the same tensors without quantizing
    again: act_quant works row by row, so its rows are the padded quantization's first m rows, and a zero pad
    row quantizes to zeros with scale AMAX_MIN / 448."""
    m, k = x2.shape
    m_pad = _round_up(max(m, 1), _ALIGN_M)
    k_pad = w.weight.shape[1]
    if x_fp8 is not None and k_pad == k:
        xq, xs = x_fp8
        if m_pad != m:
            xq = torch.cat([xq, xq.new_zeros(m_pad - m, k)])                     # [m_pad, K]
        xs_cm = torch.empty(xs.shape[1], m_pad, dtype=torch.float32, device=xs.device).t()  # [m_pad, kb]
        xs_cm[:m] = xs                                                          # the transposing copy
        xs_cm[m:] = _ZERO_ROW_SCALE
        return xq.contiguous(), xs_cm
    if m_pad != m or k_pad != k:
        x2 = F.pad(x2, (0, k_pad - k, 0, m_pad - m))  # zero rows/columns: same groups' amax, same values
    xq, xs = act_quant(x2, BLOCK)  # xs [m_pad, ceil(K/128)] row-major
    return xq, xs.t().contiguous().t()  # outer-dim-major: strides (1, m_pad)


def _cublas_blockwise(x2: torch.Tensor, w: Fp8LinearWeight, out_dtype: torch.dtype,
                      x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """torch ``F.scaled_mm`` with (BlockWise1x128, BlockWise128x128): cuBLASLt on SM90. ``x_fp8``: act_quant(x2,
    128), when the caller made it (see ``_cublas_operands``)."""
    m = x2.shape[0]
    xq, xs_cm = _cublas_operands(x2, w, x_fp8)
    m_pad = xq.shape[0]
    y = F.scaled_mm(xq, w.weight.t(), xs_cm, F.ScalingType.BlockWise1x128,
                    w.scale.t(), F.ScalingType.BlockWise128x128, output_dtype=out_dtype)
    if m_pad != m or y.shape[1] != w.out_features:
        y = y[:m, : w.out_features].contiguous()
    return y


# ----------------------------------------------------------------------------------------------- Triton
@dataclass(frozen=True)
class Fp8GemmConfig:
    """Tile of the Triton fp8 block GEMM: BM x BN outputs per program (BN divides 128), K steps of 128."""

    bm: int = 128
    bn: int = 128
    num_warps: int = 8
    num_stages: int = 4
    group_m: int = 8
    tma: bool = False  # operands through tensor descriptors (needs K % 16 == 0)
    gemv: bool = False  # M = 1 on the CUDA cores (``_fp8_gemv_kernel``; bm unused), x quantized beforehand
    split_k: int | None = None  # K splits (fp32 partials + a reduction); None = by the tile count
    reduce_in_kernel: bool = True  # split K: the tile's last program reduces (else a second launch)


def default_gemm_config(m: int) -> Fp8GemmConfig:
    """Tile by M (set from benchmarks/gemm.py): decode batches are weight-read bound, so short tiles and
    split K keep enough loads in flight; prefill takes the 128 x 128 TMA tile."""
    if m == 1:  # one sequence: the CUDA-core GEMV (x0.85-0.96 of the 16-row MMA tile's time, decode_kernels.py)
        return Fp8GemmConfig(bn=128, num_warps=8, num_stages=3, gemv=True)
    if m <= 16:
        return Fp8GemmConfig(bm=16, bn=64, num_warps=4, num_stages=4)
    if m <= 64:
        return Fp8GemmConfig(bm=64, bn=64, num_warps=4, num_stages=4)
    return Fp8GemmConfig(tma=True)


def choose_split_k(m: int, n: int, k: int, cfg: Fp8GemmConfig, n_sms: int) -> int:
    """K splits so that about 8 programs per SM are in flight, each with >= 4 K blocks, and the fp32
    partials ([splits, M, N]) stay under a quarter of the weight's bytes."""
    if cfg.split_k is not None:
        return max(1, cfg.split_k)
    tiles = _cdiv(m, cfg.bm) * _cdiv(n, cfg.bn)
    k_blocks = _cdiv(k, BLOCK)
    split = min(_cdiv(8 * n_sms, tiles), k_blocks // 4, max(1, k // (16 * m)))
    return max(1, split)


if triton is not None:
    from .quant import _round_to_e4m3_grid  # the interpreter's e4m3 rounding (its cast drops carries)
    from .splitk import _round_to_bf16_grid, _splitk_reduce_kernel, _store_tile

    @triton.jit
    def _fp8_block_gemm_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr,
        M, N, K,
        stride_am, stride_asm, stride_bn, stride_bsn, stride_cm, kb_per_split,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
        TMA: tl.constexpr, SPLIT_K: tl.constexpr, ROUND_BF16: tl.constexpr,
        QUANT_A: tl.constexpr = False, MANUAL_E4M3: tl.constexpr = False,
        o_ptr=None, cnt_ptr=None, REDUCE_IN_KERNEL: tl.constexpr = False, ROUND_BF16_OUT: tl.constexpr = False,
    ):
        """c[M, N] = sum over K blocks of (a_blk @ b_blk^T) * a_scale[m, kb] * b_scale[n // 128, kb].

        a [M, K] e4m3 row-major with scales [M, ceil(K/128)]; b [N, K] e4m3 (K-major, the layout Hopper's
        fp8 MMA wants) with one scale per 128x128 block. Each K step is one scale block, so the MMA result
        of a step is promoted to the fp32 accumulator with both scales applied. TMA: a_ptr / b_ptr are
        tensor descriptors (blocks [BM, BK] / [BN, BK], zero fill past the edges) instead of pointers.
        SPLIT_K > 1: program (tile, s) sums K blocks [s * kb_per_split, (s + 1) * kb_per_split) and stores
        its fp32 partial at c[s] ([SPLIT_K, M, N]), reduced by ``_splitk_reduce_kernel`` or, REDUCE_IN_KERNEL,
        by the tile's last program into o [M, N] (cnt_ptr: one int32 arrival counter per tile, zero between
        launches).
        QUANT_A: a_ptr holds the unquantized activations (bf16 / fp32) and each K step quantizes its [BM, BK]
        block itself, op for op as ``act_quant`` does (so the product is bit-identical to act_quant + this
        kernel); as_ptr is unused. For decode-sized M: one launch and no e4m3 copy of x instead of two.
        """
        pid = tl.program_id(0) // SPLIT_K
        pid_k = tl.program_id(0) % SPLIT_K  # a tile's splits are adjacent programs
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        width = GROUP_M * num_n  # GROUP_M row tiles share their column sweep (L2 reuse of b)
        group = pid // width
        first_m = group * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsize
        pid_n = (pid % width) // gsize
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        # out-of-range rows/columns read a valid row instead (their results are never stored): unmasked loads
        rm_ld = tl.where(rm < M, rm, 0).to(tl.int64)
        rn_ld = tl.where(rn < N, rn, 0).to(tl.int64)
        kb0 = pid_k * kb_per_split
        kb1 = tl.minimum(kb0 + kb_per_split, tl.cdiv(K, BK))
        if not TMA:
            a_ptrs = a_ptr + rm_ld[:, None] * stride_am + (kb0 * BK + rk)[None, :]  # [BM, BK]
            b_ptrs = b_ptr + rn_ld[None, :] * stride_bn + (kb0 * BK + rk)[:, None]  # [BK, BN], K contiguous
        as_ptrs = as_ptr + rm_ld * stride_asm
        bs_row = bs_ptr + ((pid_n * BN) // 128) * stride_bsn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(kb0, kb1):
            if TMA:
                a = a_ptr.load([pid_m * BM, kb * BK])
                b = b_ptr.load([pid_n * BN, kb * BK]).T
            elif EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                kmask = rk + kb * BK < K
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
            if QUANT_A:  # act_quant of this block (zero padding past K leaves the group's amax unchanged)
                af = a.to(tl.float32)
                sa = tl.math.div_rn(tl.maximum(tl.max(tl.abs(af), axis=1), 1e-4), 448.0)  # [BM]
                af = tl.minimum(tl.maximum(tl.math.div_rn(af, sa[:, None]), -448.0), 448.0)
                if MANUAL_E4M3:
                    af = _round_to_e4m3_grid(af)
                a = af.to(tl.float8e4nv)
            else:
                sa = tl.load(as_ptrs + kb)  # [BM]
            sb = tl.load(bs_row + kb)  # scalar: BN divides 128
            acc += tl.dot(a, b) * (sa[:, None] * sb)
            if not TMA:
                a_ptrs += BK
                b_ptrs += BK
        _store_tile(acc, rm, rn, pid, pid_k, M, N, stride_cm, c_ptr, o_ptr, cnt_ptr, BM, BN, SPLIT_K, ROUND_BF16,
                    REDUCE_IN_KERNEL, ROUND_BF16_OUT)

    @triton.jit
    def _fp8_gemv_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, N, K, stride_bn, stride_bsn, kb_per_split,
        BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr,
        ROUND_BF16: tl.constexpr, o_ptr=None, cnt_ptr=None, REDUCE_IN_KERNEL: tl.constexpr = False,
        ROUND_BF16_OUT: tl.constexpr = False,
    ):
        """One row of x (M = 1, a decode step of one sequence): c[0, n] = sum over K blocks of
        (a_blk . b[n, blk]) * a_scale[kb] * b_scale[n // 128, kb], on the CUDA cores (no 16-row MMA tile, no fp8
        -> f16 operand conversion of the weight for it): each K step converts its [BN, BK] weight block to
        fp32, multiplies by the row and sums along K. Split K and the store as _fp8_block_gemm_kernel."""
        pid = tl.program_id(0) // SPLIT_K
        pid_k = tl.program_id(0) % SPLIT_K
        rn = pid * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        rn_ld = tl.where(rn < N, rn, 0).to(tl.int64)
        kb0 = pid_k * kb_per_split
        kb1 = tl.minimum(kb0 + kb_per_split, tl.cdiv(K, BK))
        bs_row = bs_ptr + ((pid * BN) // 128) * stride_bsn
        acc = tl.zeros((1, BN), dtype=tl.float32)
        for kb in tl.range(kb0, kb1, num_stages=NUM_STAGES):
            kk = kb * BK + rk
            if EVEN_K:
                w = tl.load(b_ptr + rn_ld[:, None] * stride_bn + kk[None, :])          # [BN, BK] e4m3
                a = tl.load(a_ptr + kk)                                                # [BK] e4m3
            else:
                w = tl.load(b_ptr + rn_ld[:, None] * stride_bn + kk[None, :], mask=(kk < K)[None, :], other=0.0)
                a = tl.load(a_ptr + kk, mask=kk < K, other=0.0)
            part = tl.sum(w.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)         # [BN]
            acc += (part * (tl.load(as_ptr + kb) * tl.load(bs_row + kb)))[None, :]
        _store_tile(acc, tl.arange(0, 1), rn, pid, pid_k, 1, N, N, c_ptr, o_ptr, cnt_ptr, 1, BN, SPLIT_K,
                    ROUND_BF16, REDUCE_IN_KERNEL, ROUND_BF16_OUT)






def fp8_gemm_triton(xq: torch.Tensor, xs: torch.Tensor | None, w: Fp8LinearWeight, out_dtype: torch.dtype,
                    config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """Triton launcher: xq [M, K] e4m3 + xs [M, ceil(K/128)] fp32 (``act_quant``'s output) -> [M, N].

    xs None: xq holds the unquantized activations (bf16 / fp32 [M, K]) and the kernel quantizes them on the
    fly (``QUANT_A``, pointer tiles only: not with ``config.tma``); the result is bit-identical."""
    m, k = xq.shape
    n = w.out_features
    check(k == w.in_features, f"fp8_gemm_triton: x has K={k}, weight K={w.in_features}")
    quant_a = xs is None
    cfg = config or default_gemm_config(m)
    if quant_a:
        check(xq.dtype in (torch.bfloat16, torch.float32) and not cfg.tma,
              f"fp8_gemm_triton: in-kernel quantization takes bf16/fp32 x and pointer tiles, got {xq.dtype}, "
              f"tma={cfg.tma}")
        xs = xq  # placeholder pointer, never read
    else:
        check(xs.shape == (m, w.k_blocks) and xs.stride(-1) == 1,
              f"fp8_gemm_triton: xs must be [M, ceil(K/128)] = {(m, w.k_blocks)} with unit column stride, "
              f"got {tuple(xs.shape)} strides {xs.stride()}")
    check(BLOCK % cfg.bn == 0, f"fp8_gemm_triton: BN={cfg.bn} must divide 128 (one weight scale per tile)")
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    xq = xq.contiguous()
    a, b = xq, w.weight
    if cfg.tma:
        check(k % _ALIGN_NK == 0, f"fp8_gemm_triton: TMA tiles need K % 16 == 0, got K={k}")
        from triton.tools.tensor_descriptor import TensorDescriptor

        a = TensorDescriptor.from_tensor(xq, [cfg.bm, BLOCK])
        b = TensorDescriptor.from_tensor(w.weight, [cfg.bn, BLOCK])
    split = choose_split_k(m, n, k, cfg, device_sm_count(xq.device))
    kb_per_split = _cdiv(_cdiv(k, BLOCK), split)
    split = _cdiv(_cdiv(k, BLOCK), kb_per_split)  # no empty split
    c = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=xq.device)
    gemv = cfg.gemv and m == 1 and not quant_a and not cfg.tma
    tiles = triton.cdiv(n, cfg.bn) * (1 if gemv else triton.cdiv(m, cfg.bm))
    counters = _split_counters(xq.device, tiles) if split > 1 and cfg.reduce_in_kernel else None
    reduce_args = dict(o_ptr=out if counters is not None else None, cnt_ptr=counters,
                       REDUCE_IN_KERNEL=counters is not None, ROUND_BF16_OUT=round_bf16_in_interpreter(out_dtype))
    round_now = split == 1 and round_bf16_in_interpreter(out_dtype)
    if gemv:
        _fp8_gemv_kernel[(tiles * split,)](
            xq, xs, w.weight, w.scale, c, n, k, w.weight.stride(0), w.scale.stride(0), kb_per_split,
            BN=cfg.bn, BK=BLOCK, EVEN_K=(k % BLOCK == 0), SPLIT_K=split, NUM_STAGES=cfg.num_stages,
            ROUND_BF16=round_now, **reduce_args, num_warps=cfg.num_warps)
    else:
        _fp8_block_gemm_kernel[(tiles * split,)](
            a, xs, b, w.scale, c, m, n, k,
            xq.stride(0), xs.stride(0), w.weight.stride(0), w.scale.stride(0), n, kb_per_split,
            BM=cfg.bm, BN=cfg.bn, BK=BLOCK, GROUP_M=cfg.group_m, EVEN_K=(k % BLOCK == 0), TMA=cfg.tma,
            SPLIT_K=split, ROUND_BF16=round_now, QUANT_A=quant_a, MANUAL_E4M3=quant_a and interpret_mode(),
            **reduce_args, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1 and counters is None:
        _splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)](
            c, out, m * n, SPLIT_K=split, BLOCK=1024, ROUND_BF16=round_bf16_in_interpreter(out_dtype), num_warps=4)
    return out
