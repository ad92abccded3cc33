"""act_quant: fp32/bf16 -> float8 e4m3 with one fp32 scale per group of ``block`` values (Triton), and
hadamard_act_quant: the indexer's Hadamard rotation fused with a whole-row act_quant (one pass, not 7+2).

Bit-exact with ``reference.act_quant`` on the GPU: amax is exact, the divisions are IEEE round-to-nearest
(``div_rn``; Triton's plain ``/`` is approximate), the ue8m0 exponent comes from the float's bits, and
the e4m3 conversion rounds to nearest-even like torch's.
"""

from __future__ import annotations

import torch

from ._common import check, interpret_mode, tl, triton
from .reference import AMAX_MIN, FP8_MAX

if triton is not None:

    @triton.jit
    def _round_to_e4m3_grid(v):
        """Round fp32 v (|v| <= 448) to the nearest-even e4m3 value, staying in fp32.

        Used only under TRITON_INTERPRET=1, whose fp32->fp8 cast drops the carry when rounding overflows
        the mantissa (e.g. 127.9 -> 64 instead of 128); the GPU uses the hardware conversion.
        """
        a = tl.abs(v)
        bits = a.to(tl.int32, bitcast=True)
        lsb = (bits >> 20) & 1
        normal = ((bits + 0x7FFFF + lsb) & ~0xFFFFF).to(tl.float32, bitcast=True)
        sub = (a + 16384.0) - 16384.0  # e4m3 subnormal quantum is 2^-9 = ulp of fp32 at 2^14
        r = tl.where(a >= 0.015625, normal, sub)
        # v's sign by its bit (a value that rounds to zero keeps it: -0, like the hardware conversion; the
        # negation -r would give +0)
        sign = v.to(tl.int32, bitcast=True) & -2147483648
        return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _act_quant_kernel(
        x_ptr, y_ptr, s_ptr, R, N, NG,
        G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
        UE8M0: tl.constexpr, MANUAL_ROUND: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        g = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        cols = g * G + tl.arange(0, BLOCK_G)  # [BLOCK_G]
        cmask = (tl.arange(0, BLOCK_G) < G) & (cols < N)
        mask = (rows < R)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_G]
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)  # [BLOCK_R]; == AMAX_MIN
        scale = tl.math.div_rn(amax, 448.0)
        if UE8M0:
            # 2^ceil(log2(scale)) from the bits: exponent, plus one unless the mantissa is zero
            bits = scale.to(tl.int32, bitcast=True)
            e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
            scale = (e << 23).to(tl.float32, bitcast=True)
        y = tl.math.div_rn(x, scale[:, None])
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        if MANUAL_ROUND:
            y = _round_to_e4m3_grid(y)
        tl.store(y_ptr + offs, y.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + rows.to(tl.int64) * NG + g, scale, mask=rows < R)


    @triton.jit
    def _hadamard_quant_kernel(
        x_ptr, y_ptr, s_ptr, R, D: tl.constexpr, LOG2_D: tl.constexpr, BLOCK_R: tl.constexpr,
        MANUAL_ROUND: tl.constexpr,
    ):
        """One pass per row: fp32 Sylvester-Hadamard butterflies in registers, scale D^-0.5, then act_quant
        of the whole row (one scale). The butterflies are the reference's, op for op: at distance h the
        pair (a, b) becomes (a + b, a - b), so the rotated values are bit-identical to it."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        cols = tl.arange(0, D)
        rmask = rows < R
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        y = tl.load(x_ptr + offs, mask=rmask[:, None], other=0.0).to(tl.float32)  # [BLOCK_R, D]
        for s in tl.static_range(LOG2_D):
            # distance h = 2^s: [R, D] -> [R, D/2h, 2, h] -> pair axis last -> (a, b) -> (a + b, a - b) -> back
            v = tl.permute(tl.reshape(y, (BLOCK_R, D // (2 << s), 2, 1 << s)), (0, 1, 3, 2))
            a, b = tl.split(v)
            v = tl.join(a + b, a - b)  # [R, D/2h, h, 2]
            y = tl.reshape(tl.permute(v, (0, 1, 3, 2)), (BLOCK_R, D))
        y = y * (D ** -0.5)
        amax = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-4)  # [BLOCK_R]; == AMAX_MIN
        scale = tl.math.div_rn(amax, 448.0)
        q = tl.math.div_rn(y, scale[:, None])
        q = tl.minimum(tl.maximum(q, -448.0), 448.0)
        if MANUAL_ROUND:
            q = _round_to_e4m3_grid(q)
        tl.store(y_ptr + offs, q.to(tl.float8e4nv), mask=rmask[:, None])
        tl.store(s_ptr + rows, scale, mask=rmask)


def hadamard_act_quant_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher; see ``dsaserve.kernels.hadamard_act_quant`` for the contract."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()  # [R, D]
    r = x2.shape[0]
    y = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(r, dtype=torch.float32, device=x.device)
    if r > 0:
        block_r = max(1, min(32, 4096 // d))
        _hadamard_quant_kernel[(triton.cdiv(r, block_r),)](
            x2, y, s, r, D=d, LOG2_D=d.bit_length() - 1, BLOCK_R=block_r, MANUAL_ROUND=interpret_mode(),
            num_warps=4,
        )
    return y.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def act_quant_triton(x: torch.Tensor, block: int = 128, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher; see ``dsaserve.kernels.act_quant`` for the contract."""
    assert AMAX_MIN == 1e-4 and FP8_MAX == 448.0  # constants written into the kernel
    n = x.shape[-1]
    check(n > 0, "act_quant: last dim is empty")
    g = min(block, n)
    ng = (n + g - 1) // g
    x2 = x.reshape(-1, n).contiguous()  # [R, N]
    r = x2.shape[0]
    y = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(r, ng, dtype=torch.float32, device=x.device)
    if r > 0:
        block_g = triton.next_power_of_2(g)
        block_r = max(1, min(64, 4096 // block_g, triton.next_power_of_2(r)))  # no idle rows for decode's few
        grid = (triton.cdiv(r, block_r), ng)
        _act_quant_kernel[grid](
            x2, y, s, r, n, ng, G=g, BLOCK_G=block_g, BLOCK_R=block_r, UE8M0=ue8m0,
            MANUAL_ROUND=interpret_mode(), num_warps=4,
        )
    return y.reshape(x.shape), s.reshape(*x.shape[:-1], ng)
