"""The indexer's key and query paths in one pass per row: [LayerNorm (``k_norm``, keys) ->] RoPE of the leading
rope dims -> (fp8 indexer) Hadamard rotation + one e4m3 scale per row (queries: per head, folded into the
head weights).

PyTorch runs it as ~7 launches (fp32 copy, layer_norm, cast back, RoPE, Hadamard + quant, ...): at decode sizes
each costs more than its bytes. Numerics, against ``reference.indexer_key`` (the model's composition):
  * LayerNorm in fp32 rounded to the activation dtype: the mean / variance sum in another order than torch's,
    so an output can sit one rounding of that dtype away (tests bound it at 1 ulp, rarely hit);
  * RoPE and the Hadamard + act_quant: op for op the ``rope`` / ``hadamard_act_quant`` kernels' arithmetic, so
    given the same normed key the result is bit-identical (tested through ``quantize=False``).
Column j of the output reads input columns ia(j) and ib(j) (the rotated pair's two members inside the rope
part, j itself past it), gathered from global memory (the row is a few hundred bytes: L1), so the whole
head stays one [rows, D] tensor in registers for the butterflies.
"""

from __future__ import annotations

import torch

from ._common import interpret_mode, tl, triton

if triton is not None:
    from .norm_rope import _rounded
    from .quant import _round_to_e4m3_grid

    @triton.jit
    def _indexer_rows_kernel(x_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, out_ptr, scale_ptr, hw_ptr, hw_out_ptr, R, G,
                             stride_xt, stride_xg, stride_c, stride_ot, stride_og, eps, D: tl.constexpr,
                             LOG2_D: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
                             BLOCK_R: tl.constexpr, HAS_LN: tl.constexpr, QUANT: tl.constexpr,
                             HAS_HW: tl.constexpr, ROUND: tl.constexpr, MANUAL_E4M3: tl.constexpr):
        """Row r = (token r // G, head r % G) of x: [LayerNorm ->] RoPE -> [Hadamard + e4m3, scale[r];
        HAS_HW: hw_out[r] = hw[r] * scale[r] (the indexer's head weights take the query's scale)]."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)                  # [BR]
        rmask = (r < R)[:, None]
        t = (r // G).to(tl.int64)[:, None]
        g = (r % G).to(tl.int64)[:, None]
        j = tl.arange(0, D)[None, :]                                             # [1, D] output columns
        xrow = x_ptr + t * stride_xt + g * stride_xg
        dt = x_ptr.dtype.element_ty                                              # the activation dtype
        if HAS_LN:
            x = tl.load(xrow + j, mask=rmask, other=0.0).to(tl.float32)          # [BR, D]
            mean = tl.sum(x, axis=1) / D
            xc = x - mean[:, None]
            rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=1) / D + eps)
        p = j % HALF                                                             # rotated pair of column j
        first = j < HALF
        in_rope = j < 2 * HALF
        if INTERLEAVED:  # pairs (2p, 2p+1); output (rotated evens | rotated odds)
            ia = tl.where(first, 2 * p, 2 * p + 1)
            ib = tl.where(first, 2 * p + 1, 2 * p)
        else:            # pairs (p, p + HALF)
            ia = tl.where(first, p, p + HALF)
            ib = tl.where(first, p + HALF, p)
        ia = tl.where(in_rope, ia, j)
        ib = tl.where(in_rope, ib, j)
        ya = tl.load(xrow + ia, mask=rmask, other=0.0).to(tl.float32)
        yb = tl.load(xrow + ib, mask=rmask, other=0.0).to(tl.float32)
        if HAS_LN:  # normed, in the activation dtype
            ya = _rounded((ya - mean[:, None]) * rstd[:, None] * tl.load(w_ptr + ia).to(tl.float32)
                          + tl.load(b_ptr + ia).to(tl.float32), dt, ROUND)
            yb = _rounded((yb - mean[:, None]) * rstd[:, None] * tl.load(w_ptr + ib).to(tl.float32)
                          + tl.load(b_ptr + ib).to(tl.float32), dt, ROUND)
        c = tl.load(cos_ptr + t * stride_c + p, mask=rmask & in_rope, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_c + p, mask=rmask & in_rope, other=0.0).to(tl.float32)
        # lo = x1 c - x2 s, hi = x2 c + x1 s, every product and the sum rounded like the model's tensor ops
        ys = _rounded(yb * s, dt, ROUND)
        rot = _rounded(_rounded(ya * c, dt, ROUND) + tl.where(first, -ys, ys), dt, ROUND)
        y = tl.where(in_rope, rot, ya)                                           # [BR, D] roped row
        orow = out_ptr + t * stride_ot + g * stride_og
        if QUANT:
            for st in tl.static_range(LOG2_D):  # the Hadamard kernel's butterflies (same pairs, same order)
                v = tl.permute(tl.reshape(y, (BLOCK_R, D // (2 << st), 2, 1 << st)), (0, 1, 3, 2))
                a, b = tl.split(v)
                v = tl.join(a + b, a - b)
                y = tl.reshape(tl.permute(v, (0, 1, 3, 2)), (BLOCK_R, D))
            y = y * (D ** -0.5)
            scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(y), axis=1), 1e-4), 448.0)  # [BR]
            q = tl.minimum(tl.maximum(tl.math.div_rn(y, scale[:, None]), -448.0), 448.0)
            if MANUAL_E4M3:
                q = _round_to_e4m3_grid(q)
            tl.store(orow + j, q.to(tl.float8e4nv), mask=rmask)
            tl.store(scale_ptr + r, scale, mask=r < R)
            if HAS_HW:
                tl.store(hw_out_ptr + r, tl.load(hw_ptr + r, mask=r < R, other=0.0) * scale, mask=r < R)
        else:
            tl.store(orow + j, y.to(dt), mask=rmask)


def _launch(x3: torch.Tensor, weight, bias, eps: float, cos, sin, interleaved: bool, quantize: bool, hw=None):
    """x3 [n, G, D] (unit last stride) -> (out [n, G, D], scale [n, G] or None, hw * scale or None)."""
    from .norm_rope import _round_mode

    n, g, d = x3.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(n, g, d, dtype=torch.float8_e4m3fn if quantize else x3.dtype, device=x3.device)
    scale = torch.empty(n, g, dtype=torch.float32, device=x3.device) if quantize else None
    hw_out = torch.empty(n, g, dtype=torch.float32, device=x3.device) if hw is not None else None
    rows = n * g
    if rows > 0:
        block_r = max(1, min(16, 2048 // d))
        _indexer_rows_kernel[(triton.cdiv(rows, block_r),)](
            x3, weight if weight is not None else x3, bias if bias is not None else x3, cos, sin, out,
            scale if quantize else out, hw.contiguous() if hw is not None else out,
            hw_out if hw is not None else out, rows, g, x3.stride(0), x3.stride(1), cos.stride(0),
            out.stride(0), out.stride(1), float(eps), D=d, LOG2_D=d.bit_length() - 1, HALF=cos.shape[1],
            INTERLEAVED=interleaved, BLOCK_R=block_r, HAS_LN=weight is not None, QUANT=quantize,
            HAS_HW=hw is not None, ROUND=_round_mode(x3.dtype), MANUAL_E4M3=quantize and interpret_mode(),
            num_warps=4)
    return out, scale, hw_out


def indexer_key_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, cos: torch.Tensor,
                       sin: torch.Tensor, interleaved: bool, quantize: bool):
    """Launcher; see ``dsaserve.kernels.indexer_key`` for the contract."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    out, scale, _ = _launch(x[:, None], weight, bias, eps, cos, sin, interleaved, quantize)
    return out[:, 0], (scale[:, 0] if scale is not None else None)


def indexer_query_triton(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                         weights: torch.Tensor):
    """Launcher; see ``dsaserve.kernels.indexer_query`` for the contract."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    out, _, w = _launch(q, None, None, 0.0, cos, sin, interleaved, True, hw=weights)
    return out, w
