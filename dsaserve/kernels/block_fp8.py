"""Block-scaled fp8 weights, DeepSeek's convention.

A weight ``w [out, in]`` is cut into ``block = (128, 128)`` tiles (the last row/column of tiles may be
partial). Each tile stores e4m3 values and one fp32 ``scale_inv`` such that::

    w_real[tile] = w_fp8[tile].float() * scale_inv[tile]      # scale_inv [ceil(out/128), ceil(in/128)]

Quantization picks ``scale_inv = amax(|tile|) / 448`` (448 = largest finite e4m3 value), or with
``ue8m0`` (DeepSeek-V3.2's ``scale_fmt``) that value rounded *up* to a power of two, so scales fit an
8-bit exponent and nothing overflows.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
# An all-zero tile would get scale 0 (and 0/0 on quantization): clamp amax like the activation quant.
_MIN_AMAX = 1e-4


def _num_blocks(size: int, block: int) -> int:
    return (size + block - 1) // block


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to the next power of two (exact powers of two stay as they are)."""
    mant, exp = torch.frexp(scale)  # scale = mant * 2**exp, mant in [0.5, 1)
    # mant == 0.5 means scale is already 2**(exp-1); anything above needs 2**exp.
    exp = torch.where(mant == 0.5, exp - 1, exp)
    return torch.ldexp(torch.ones_like(scale), exp)


def _pad_to_blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out, inn = w.shape
    bo, bi = block
    po, pi = _num_blocks(out, bo) * bo - out, _num_blocks(inn, bi) * bi - inn
    if po or pi:
        w = torch.nn.functional.pad(w, (0, pi, 0, po))
    return w


def quantize_block_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128),
                       ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [out, in]`` to e4m3 with one scale per block.

    Returns ``(w_fp8 [out, in] float8_e4m3fn, scale_inv [ceil(out/bo), ceil(in/bi)] float32)`` with
    ``w ~= w_fp8.float() * scale_inv`` per block (see ``dequantize_block_fp8``).
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_block_fp8 expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    bo, bi = int(block[0]), int(block[1])
    out, inn = w.shape
    nbo, nbi = _num_blocks(out, bo), _num_blocks(inn, bi)
    wp = _pad_to_blocks(w.float(), (bo, bi))  # [nbo*bo, nbi*bi], zero padding never raises amax
    tiles = wp.view(nbo, bo, nbi, bi)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=_MIN_AMAX)  # [nbo, nbi]
    scale = amax / FP8_E4M3_MAX
    if ue8m0:
        scale = round_scale_ue8m0(scale)
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    q = q.view(nbo * bo, nbi * bi)[:out, :inn].contiguous()
    return q, scale.contiguous()


def expand_block_scales(scale_inv: torch.Tensor, shape: tuple[int, int],
                        block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Per-element scale ``[out, in]`` from per-block ``scale_inv [ceil(out/bo), ceil(in/bi)]``."""
    out, inn = shape
    bo, bi = int(block[0]), int(block[1])
    return scale_inv.float().repeat_interleave(bo, dim=0)[:out].repeat_interleave(bi, dim=1)[:, :inn]


def dequantize_block_fp8(w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """``w_fp8 [out, in]`` (e4m3) times its per-block ``scale_inv`` -> float32 ``[out, in]``."""
    if w_fp8.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"dequantize_block_fp8 expects 2-D weight and scale, got {tuple(w_fp8.shape)} and "
                         f"{tuple(scale_inv.shape)}")
    out, inn = w_fp8.shape
    want = (_num_blocks(out, block[0]), _num_blocks(inn, block[1]))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for a weight of shape "
                         f"{(out, inn)} with block {tuple(block)}")
    return w_fp8.float() * expand_block_scales(scale_inv, (out, inn), block)
