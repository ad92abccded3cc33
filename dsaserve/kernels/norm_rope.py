"""RMSNorm with the residual add, and RoPE, each in one pass (Triton): the model's per-layer glue.

PyTorch runs the RMSNorm of ``reference.rms_norm`` as ~7 kernels over fp32 copies of the activations and
RoPE as ~7 (two strided slices, four products, a sum, a difference, a cat); at 16K prefill tokens they
were a tenth of a layer's time, and in a decode step most of its ~1900 launches.

Numerics (the references in ``reference.py`` are the contract):
  * ``rms_norm_triton``: new_residual = residual + x rounded to x's dtype (bit-identical to torch), then
    y = weight * (r * rsqrt(mean(r^2) + eps)) rounded to x's dtype, the mean in fp32. The mean's summation
    order differs from torch's reduction, so y can differ from the reference by one rounding of the output
    dtype (tests bound it at 1 ulp); the residual stream itself is exact.
  * ``rope_triton``: every product is rounded to x's dtype and then the sum / difference, exactly as the
    reference's bf16 tensor ops do: bit-identical.
Intermediate bf16 roundings are done on the bits (round to nearest even), never by a cast pair: the compiler
may fold a cast pair away (and the CPU interpreter's fp32 -> bf16 cast truncates).
"""

from __future__ import annotations

import torch

from ._common import interpret_mode, tl, triton

# ROUND modes of a kernel's "round to the activation dtype, keep fp32" step
_ROUND_NONE, _ROUND_BF16_GRID = 0, 1

if triton is not None:
    from .quant import _round_to_e4m3_grid  # the interpreter's e4m3 rounding (its cast drops carries)

    @triton.jit
    def _rounded(v, DT: tl.constexpr, ROUND: tl.constexpr):
        """fp32 v rounded to the activation dtype DT, returned as fp32 (ROUND: see _ROUND_*)."""
        if ROUND == 1:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            return bits.to(tl.float32, bitcast=True)
        else:
            return v

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, N, stride_x, stride_res, stride_y,
                         stride_res_out, eps, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, ROUND: tl.constexpr,
                         yq_ptr=None, ys_ptr=None, QUANT: tl.constexpr = False, MANUAL_E4M3: tl.constexpr = False):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        dt = y_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        if HAS_RES:
            r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
            x = _rounded(r + x, dt, ROUND)                  # the residual stream, in the activation dtype
            tl.store(res_out_ptr + row * stride_res_out + cols, x.to(dt), mask=mask)
        ms = tl.sum(x * x, axis=0) / N
        inv = 1.0 / tl.sqrt_rn(ms + eps)
        yn = _rounded(x * inv, dt, ROUND)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = _rounded(w * yn, dt, ROUND)
        tl.store(y_ptr + row * stride_y + cols, y.to(dt), mask=mask)
        if QUANT:  # act_quant(y, 128) of the values just stored (y holds them exactly), op for op: same bits
            yg = tl.reshape(y, (BLOCK_N // 128, 128))                 # zeros past N: no effect on a group's amax
            scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(yg), axis=1), 1e-4), 448.0)  # [groups]
            q = tl.minimum(tl.maximum(tl.math.div_rn(yg, scale[:, None]), -448.0), 448.0)
            if MANUAL_E4M3:
                q = _round_to_e4m3_grid(q)
            tl.store(yq_ptr + row * N + cols, tl.reshape(q, (BLOCK_N,)).to(tl.float8e4nv), mask=mask)
            g = tl.arange(0, BLOCK_N // 128)
            tl.store(ys_ptr + row * (N // 128) + g, scale, mask=g < N // 128)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, G, stride_xn, stride_xg, stride_on, stride_og, stride_cn,
                     HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_G: tl.constexpr, ROUND: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)  # [BLOCK_G] heads
        j = tl.arange(0, HALF)                                  # [HALF] rotated pairs
        gmask = (g < G)[:, None]
        dt = out_ptr.dtype.element_ty
        base = x_ptr + n * stride_xn + g.to(tl.int64)[:, None] * stride_xg
        if INTERLEAVED:  # one contiguous load of the pairs, split in registers (two stride-2 loads ran at ~1 TB/s)
            x = tl.load(base + tl.arange(0, 2 * HALF)[None, :], mask=gmask, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_G, HALF, 2)))                 # [BLOCK_G, HALF] each
        else:
            x1 = tl.load(base + j[None, :], mask=gmask, other=0.0).to(tl.float32)  # [BLOCK_G, HALF]
            x2 = tl.load(base + HALF + j[None, :], mask=gmask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + n * stride_cn + j).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + n * stride_cn + j).to(tl.float32)[None, :]
        lo = _rounded(_rounded(x1 * c, dt, ROUND) - _rounded(x2 * s, dt, ROUND), dt, ROUND)
        hi = _rounded(_rounded(x2 * c, dt, ROUND) + _rounded(x1 * s, dt, ROUND), dt, ROUND)
        obase = out_ptr + n * stride_on + g.to(tl.int64)[:, None] * stride_og
        tl.store(obase + j[None, :], lo.to(dt), mask=gmask)
        tl.store(obase + HALF + j[None, :], hi.to(dt), mask=gmask)


    @triton.jit
    def _mla_latent_kernel(kv_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, L, stride_kv, stride_c, stride_o, eps,
                           BLOCK_L: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr, ROUND: tl.constexpr):
        """One token: out = [rms_norm(kv[:L]) | rope(kv[L:])], each part op for op as _rms_norm_kernel and
        _rope_kernel compute it."""
        row = tl.program_id(0).to(tl.int64)
        dt = out_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_L)
        mask = cols < L
        x = tl.load(kv_ptr + row * stride_kv + cols, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / L + eps)
        yn = _rounded(x * inv, dt, ROUND)
        y = _rounded(tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * yn, dt, ROUND)
        tl.store(out_ptr + row * stride_o + cols, y.to(dt), mask=mask)
        j = tl.arange(0, HALF)
        if INTERLEAVED:
            i1, i2 = 2 * j, 2 * j + 1
        else:
            i1, i2 = j, j + HALF
        pe = kv_ptr + row * stride_kv + L
        x1 = tl.load(pe + i1).to(tl.float32)
        x2 = tl.load(pe + i2).to(tl.float32)
        c = tl.load(cos_ptr + row * stride_c + j).to(tl.float32)
        s = tl.load(sin_ptr + row * stride_c + j).to(tl.float32)
        lo = _rounded(_rounded(x1 * c, dt, ROUND) - _rounded(x2 * s, dt, ROUND), dt, ROUND)
        hi = _rounded(_rounded(x2 * c, dt, ROUND) + _rounded(x1 * s, dt, ROUND), dt, ROUND)
        tl.store(out_ptr + row * stride_o + L + j, lo.to(dt))
        tl.store(out_ptr + row * stride_o + L + HALF + j, hi.to(dt))


    @triton.jit
    def _silu_mul_kernel(gu_ptr, y_ptr, yq_ptr, ys_ptr, I, stride_gu, stride_y, BLOCK: tl.constexpr,
                         ROUND: tl.constexpr, QUANT: tl.constexpr, MANUAL_E4M3: tl.constexpr):
        """y = silu(gate) * up for one token's BLOCK columns (gate | up = gu[:I] | gu[I:]), each op rounded to the
        activation dtype like torch's two ops; QUANT: act_quant(y, 128) of the stored values too."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < I
        dt = y_ptr.dtype.element_ty
        gate = tl.load(gu_ptr + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * stride_gu + I + cols, mask=m, other=0.0).to(tl.float32)
        act = _rounded(gate / (1.0 + tl.exp(-gate)), dt, ROUND)
        y = _rounded(act * up, dt, ROUND)
        tl.store(y_ptr + row * stride_y + cols, y.to(dt), mask=m)
        if QUANT:
            yg = tl.reshape(y, (BLOCK // 128, 128))
            scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(yg), axis=1), 1e-4), 448.0)
            q = tl.minimum(tl.maximum(tl.math.div_rn(yg, scale[:, None]), -448.0), 448.0)
            if MANUAL_E4M3:
                q = _round_to_e4m3_grid(q)
            tl.store(yq_ptr + row * I + cols, tl.reshape(q, (BLOCK,)).to(tl.float8e4nv), mask=m)
            g = tl.program_id(1) * (BLOCK // 128) + tl.arange(0, BLOCK // 128)
            tl.store(ys_ptr + row * (I // 128) + g, scale, mask=g < I // 128)


def _round_mode(dtype: torch.dtype) -> int:
    # bf16 rounding by the bits, on the GPU too: the compiler folds a cast pair (fp32 -> bf16 -> fp32) away
    # and may then contract a product into the next sum (measured: 1-ulp differences from torch on H200)
    return _ROUND_NONE if dtype == torch.float32 else _ROUND_BF16_GRID


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] with a unit last stride -> a 2-D [R, N] view (a copy only when the leading dims do not merge)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1]).contiguous()


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                    quant: bool = False):
    """Launcher; see ``dsaserve.kernels.rms_norm`` (and ``rms_norm_quant``: ``quant``, N % 128 == 0, adds the
    e4m3 copy [..., N] and its scales [..., N / 128] to the result) for the contract."""
    n = x.shape[-1]
    x2 = _rows(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    res_out = None
    if residual is not None:
        r2 = _rows(residual)
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ro2 = res_out.view(-1, n)
    else:
        r2 = ro2 = x2
    rows = x2.shape[0]
    yq = ys = None
    if quant:
        yq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        ys = torch.empty(*x.shape[:-1], n // 128, dtype=torch.float32, device=x.device)
    if rows > 0:
        block = max(128, triton.next_power_of_2(n))
        _rms_norm_kernel[(rows,)](x2, r2, weight, y2, ro2, n, x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0),
                                  float(eps), HAS_RES=residual is not None, BLOCK_N=block, ROUND=_round_mode(x.dtype),
                                  yq_ptr=yq, ys_ptr=ys, QUANT=quant, MANUAL_E4M3=quant and interpret_mode(),
                                  num_warps=max(1, min(16, block // 512)))
    if quant:
        return y, res_out, (yq, ys)
    return y, res_out


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher; see ``dsaserve.kernels.rope`` for the contract."""
    d, n = x.shape[-1], x.shape[0]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x3 = x if x.dim() == 3 else x[:, None]                # [n, G, D] views (G = heads; 1 for a shared key)
    o3 = out if out.dim() == 3 else out[:, None]
    if x3.stride(-1) != 1 or o3.stride(-1) != 1:
        raise ValueError("rope_triton: x and out need a unit last stride")
    cos, sin = cos.contiguous(), sin.contiguous()
    g = x3.shape[1]
    if n > 0 and g > 0:
        block_g = min(triton.next_power_of_2(g), max(1, 4096 // d))
        _rope_kernel[(n, triton.cdiv(g, block_g))](
            x3, cos, sin, o3, g, x3.stride(0), x3.stride(1), o3.stride(0), o3.stride(1), cos.stride(0),
            HALF=d // 2, INTERLEAVED=interleaved, BLOCK_G=block_g, ROUND=_round_mode(x.dtype), num_warps=4)
    return out


def mla_latent_triton(kv: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                      interleaved: bool) -> torch.Tensor:
    """Launcher; see ``dsaserve.kernels.mla_latent`` for the contract."""
    n, width = kv.shape
    lat = weight.shape[0]
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(n, width, dtype=kv.dtype, device=kv.device)
    if n > 0:
        block = triton.next_power_of_2(lat)
        _mla_latent_kernel[(n,)](kv, weight, cos, sin, out, lat, kv.stride(0), cos.stride(0), out.stride(0),
                                 float(eps), BLOCK_L=block, HALF=cos.shape[1], INTERLEAVED=interleaved,
                                 ROUND=_round_mode(kv.dtype), num_warps=4)
    return out


def silu_mul_triton(gate_up: torch.Tensor, quant: bool):
    """Launcher; see ``dsaserve.kernels.silu_mul`` for the contract."""
    n, two_i = gate_up.shape
    inter = two_i // 2
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    y = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    yq = torch.empty(n, inter, dtype=torch.float8_e4m3fn, device=gate_up.device) if quant else None
    ys = torch.empty(n, inter // 128, dtype=torch.float32, device=gate_up.device) if quant else None
    if n > 0:
        block = min(1024, max(128, triton.next_power_of_2(inter)))
        _silu_mul_kernel[(n, triton.cdiv(inter, block))](
            gate_up, y, yq, ys, inter, gate_up.stride(0), y.stride(0), BLOCK=block, ROUND=_round_mode(y.dtype),
            QUANT=quant, MANUAL_E4M3=quant and interpret_mode(), num_warps=4)
    return y, ((yq, ys) if quant else None)
