"""The absorbed MLA's value up-projection with o_proj's fp8 input made in the same pass (Triton).

After the sparse attention, each head's latent output goes through that head's W_UV (kv_b_proj's value rows):
out [t, H, v] = out_lat [t, H, L] x W_UV[h]^T, stored in the model dtype, and the fp8 o_proj then quantizes it per
token per 128 channels (``act_quant``): a second pass over [t, H * v] that reads the whole output back.
``_value_proj_fp8_kernel`` does both in one: per (row block, head) it sums out_lat x W_UV^T in fp32, rounds each
value to the model dtype (the value the two-pass path stores) and quantizes that with act_quant's arithmetic
(exact amax, IEEE divisions, round-to-nearest-even e4m3). Only the e4m3 copy and its scales are written. With
v = 128 (DeepSeek-V3.2) a head's output is one quantization group; v = 256 (GLM-5) makes two.

Numerics: act_quant of the model-dtype product, as before; the product's fp32 sums run in this kernel's order
(cuBLAS's bmm has its own), so a value can differ from the two-pass path's by one rounding of the model dtype.
The reference (CPU) is the two-pass path itself: torch's bmm, then ``reference.act_quant``.
"""

from __future__ import annotations

import torch

from . import reference as R
from ._common import interpret_mode, tl, triton
from .norm_rope import _round_mode

GROUP = 128   # act_quant's group: o_proj's input is quantized per token per 128 channels

if triton is not None:
    from .norm_rope import _rounded
    from .quant import _round_to_e4m3_grid

    @triton.jit
    def _value_proj_fp8_kernel(lat_ptr, w_ptr, q_ptr, s_ptr, T, stride_lt, stride_lh, stride_wh, stride_wv,
                               stride_qt, stride_st, L: tl.constexpr, V: tl.constexpr, BM: tl.constexpr,
                               BK: tl.constexpr, ROUND: tl.constexpr, UPCAST: tl.constexpr, MANUAL_E4M3: tl.constexpr):
        """Program (row block, head h): q[rows, h*V:(h+1)*V] (e4m3) and s[rows, h*V/128 + g] (fp32) =
        act_quant(round_DT(out_lat[rows, h, :] @ w[h]^T)), DT out_lat's dtype. UPCAST: the interpreter multiplies in
        fp32 (bf16 x bf16 products are exact there too); MANUAL_E4M3: its e4m3 rounding (its cast drops carries)."""
        pid = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        rm = pid * BM + tl.arange(0, BM)
        rv = tl.arange(0, V)
        rk = tl.arange(0, BK)
        rows = tl.where(rm < T, rm, 0).to(tl.int64)                   # padding rows read row 0, store nothing
        a_rows = lat_ptr + rows[:, None] * stride_lt + h * stride_lh  # [BM, 1]
        b_rows = w_ptr + h * stride_wh + rv.to(tl.int64)[:, None] * stride_wv   # [V, 1]
        acc = tl.zeros((BM, V), dtype=tl.float32)
        for k in range(0, L, BK):
            a = tl.load(a_rows + (k + rk)[None, :])                   # [BM, BK]
            b = tl.load(b_rows + (k + rk)[None, :])                   # [V, BK]
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc)
        y = _rounded(acc, lat_ptr.dtype.element_ty, ROUND)           # the value the two-pass path stores
        yg = tl.reshape(y, (BM, V // 128, 128))
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(yg), axis=2), 1e-4), 448.0)   # [BM, V / 128]
        q = tl.minimum(tl.maximum(tl.math.div_rn(yg, scale[:, :, None]), -448.0), 448.0)
        if MANUAL_E4M3:
            q = _round_to_e4m3_grid(q)
        keep = (rm < T)[:, None]
        out_rows = rm.to(tl.int64)[:, None]
        tl.store(q_ptr + out_rows * stride_qt + h * V + rv[None, :], tl.reshape(q, (BM, V)).to(tl.float8e4nv),
                 mask=keep)
        g = tl.arange(0, V // 128)
        tl.store(s_ptr + out_rows * stride_st + h * (V // 128) + g[None, :], scale, mask=keep)


def value_proj_fp8_reason(out_lat: torch.Tensor, w_uv: torch.Tensor) -> str | None:
    """Why ``value_proj_fp8`` cannot use its kernel for these inputs (None: it can)."""
    t, h, lat = out_lat.shape
    v = w_uv.shape[1]
    if v != GROUP:
        return (f"v_head_dim {v}: the kernel takes 128 (one act_quant group a head; at GLM-5's 256 it measured 0.67x "
                "the two passes on H200, session 20)")
    if lat % 64:
        return f"kv_lora_rank {lat} is not a multiple of 64"
    if out_lat.dtype not in (torch.bfloat16, torch.float32) or w_uv.dtype != out_lat.dtype:
        return f"dtypes {out_lat.dtype} / {w_uv.dtype}: the kernel takes bf16 or fp32, the same for both"
    if out_lat.stride(-1) != 1 or w_uv.stride(-1) != 1:
        return "the latent dimension must be contiguous in both operands"
    return None


def value_proj_reference(out_lat: torch.Tensor, w_uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-pass path: out [t, H, v] = torch.bmm per head in the model dtype, then act_quant of its rows."""
    t, h, _ = out_lat.shape
    v = w_uv.shape[1]
    out = torch.empty(t, h, v, dtype=out_lat.dtype, device=out_lat.device)
    torch.bmm(out_lat.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))      # [H, t, v]
    return R.act_quant(out.view(t, h * v), GROUP)


def value_proj_fp8(out_lat: torch.Tensor, w_uv: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                   use_kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """out_lat [t, H, L] (unit last stride), w_uv [H, v, L] -> (e4m3 [t, H * v], scales [t, ceil(H * v / 128)] fp32) =
    act_quant of the per-head product out_lat[:, h] @ w_uv[h]^T in out_lat's dtype (module docstring). ``out``:
    where to write them (views of o_proj's whole input are fine: row strides are honoured). The kernel runs on CUDA
    tensors and under the interpreter when ``use_kernel``; otherwise ``value_proj_reference``."""
    t, h, lat = out_lat.shape
    v = w_uv.shape[1]
    if w_uv.shape != (h, v, lat):
        raise ValueError(f"value_proj_fp8: w_uv must be [{h}, v, {lat}], got {tuple(w_uv.shape)}")
    kernel = (use_kernel and triton is not None and (out_lat.is_cuda or interpret_mode())
              and value_proj_fp8_reason(out_lat, w_uv) is None)
    if not kernel:
        q, s = value_proj_reference(out_lat, w_uv)
        if out is None:
            return q, s
        out[0].copy_(q)
        out[1].copy_(s)
        return out
    q, s = out if out is not None else (
        torch.empty(t, h * v, dtype=torch.float8_e4m3fn, device=out_lat.device),
        torch.empty(t, h * v // GROUP, dtype=torch.float32, device=out_lat.device))
    if q.shape != (t, h * v) or s.shape != (t, h * v // GROUP) or q.stride(-1) != 1 or s.stride(-1) != 1:
        raise ValueError(f"value_proj_fp8: out must be ([{t}, {h * v}] e4m3, [{t}, {h * v // GROUP}] fp32) with unit "
                         f"last strides, got {tuple(q.shape)} / {tuple(s.shape)}")
    if t:
        bm = block_rows(v)
        _value_proj_fp8_kernel[(triton.cdiv(t, bm), h)](
            out_lat, w_uv, q, s, t, out_lat.stride(0), out_lat.stride(1), w_uv.stride(0), w_uv.stride(1),
            q.stride(0), s.stride(0), L=lat, V=v, BM=bm, BK=64, ROUND=_round_mode(out_lat.dtype), UPCAST=interpret_mode(), MANUAL_E4M3=interpret_mode(),
            num_warps=8, num_stages=3)
    return q, s


def block_rows(v: int) -> int:
    """Rows a program takes: 128 x v fp32 accumulators over 8 warps (64 a thread at v = 128; 64 rows at v = 256)."""
    return 64 if v > 128 else 128

