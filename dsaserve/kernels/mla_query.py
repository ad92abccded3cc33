"""The absorbed MLA's query for the sparse attention, in one pass (Triton): q_abs[t, h] = [q_nope[t, h] @ W_UK[h] |
RoPE(q_pe[t, h])].

Before the sparse attention each head's query moves into the latent space: the nope part through that head's W_UK
(kv_b_proj's key rows, [nope, L]) and the rope part rotated, both written side by side into the [t, H, L + rope]
buffer the attention reads. The two-pass path is torch's bmm for the first and the RoPE kernel for the second, each
a pass over the queries (the bmm is memory-bound: it writes 1 KB a head and reads 256 B). ``_query_proj_rope_kernel``
reads each query row once and writes the whole 1152-byte output row: per (row block, head) it rotates q_pe with the
RoPE kernel's arithmetic (MLA's interleaved pairs, output as (rotated evens | rotated odds); bit-identical), then
sums q_nope @ W_UK in fp32, 128 latent columns a step, and rounds it to the model dtype (cuBLAS's contract, the sums
in this kernel's order: a value can differ by one rounding).

The reference (CPU) is the two-pass path itself.

Measured on H200 (session 20, benchmarks/mla_projections.py): 0.381 ms against 0.247 for the two passes at an
attention block of V3.2, so the engine does not use it; kept, with its benchmark, for a next attempt (a program reads
its 64 KB of W_UK tiles for only 64 rows).
"""

from __future__ import annotations

import torch

from ._common import interpret_mode, tl, triton
from .norm_rope import _round_mode

# (BM rows, BN latent columns a step, warps, stages): 146 registers, 88 KB of shared memory on sm_90 (2 CTAs an SM);
# not measured yet (benchmarks/mla_projections.py sweeps others)
DEFAULT_CONFIG = (64, 128, 4, 2)
BLOCK_N = 128   # the kernel's latent column steps divide kv_lora_rank in multiples of this

if triton is not None:
    from .norm_rope import _rounded

    @triton.jit
    def _query_proj_rope_kernel(q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, stride_qt, stride_qh, stride_wh,
                                stride_wk, stride_c, stride_ot, stride_oh, NOPE: tl.constexpr, L: tl.constexpr,
                                HALF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ROUND: tl.constexpr,
                                UPCAST: tl.constexpr):
        """Program (row block, head h): out[rows, h, :L] = round_DT(q[rows, h, :NOPE] @ w[h]), BN latent columns a
        step (q_nope loaded once, the weight tiles pipelined), and out[rows, h, L:] = RoPE(q[rows, h, NOPE:])
        (interleaved pairs)."""
        DT = out_ptr.dtype.element_ty                                 # the model dtype (q's, the output's)
        h = tl.program_id(1).to(tl.int64)
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rows = tl.where(rm < T, rm, 0).to(tl.int64)                   # padding rows read row 0, store nothing
        q_rows = q_ptr + rows[:, None] * stride_qt + h * stride_qh    # [BM, 1]
        keep = (rm < T)[:, None]
        out_rows = out_ptr + rm.to(tl.int64)[:, None] * stride_ot + h * stride_oh
        # RoPE of q_pe, op for op as norm_rope._rope_kernel (INTERLEAVED): pairs (2p, 2p + 1) -> (lo | hi)
        x = tl.load(q_rows + NOPE + tl.arange(0, 2 * HALF)[None, :]).to(tl.float32)              # [BM, 2 HALF]
        x1, x2 = tl.split(tl.reshape(x, (BM, HALF, 2)))                                          # [BM, HALF]
        j = tl.arange(0, HALF)
        c = tl.load(cos_ptr + rows[:, None] * stride_c + j[None, :]).to(tl.float32)
        s = tl.load(sin_ptr + rows[:, None] * stride_c + j[None, :]).to(tl.float32)
        lo = _rounded(_rounded(x1 * c, DT, ROUND) - _rounded(x2 * s, DT, ROUND), DT, ROUND)
        hi = _rounded(_rounded(x2 * c, DT, ROUND) + _rounded(x1 * s, DT, ROUND), DT, ROUND)
        tl.store(out_rows + L + j[None, :], lo.to(DT), mask=keep)
        tl.store(out_rows + L + HALF + j[None, :], hi.to(DT), mask=keep)
        rk = tl.arange(0, NOPE)
        a = tl.load(q_rows + rk[None, :])                             # [BM, NOPE]
        if UPCAST:
            a = a.to(tl.float32)
        w_rows = w_ptr + h * stride_wh + rk.to(tl.int64)[:, None] * stride_wk   # [NOPE, 1]
        for n0 in range(0, L, BN):
            rn = n0 + tl.arange(0, BN)
            b = tl.load(w_rows + rn[None, :])                         # [NOPE, BN]
            if UPCAST:
                b = b.to(tl.float32)
            lat = _rounded(tl.dot(a, b), DT, ROUND)                   # the model-dtype value, exact in DT
            tl.store(out_rows + rn[None, :], lat.to(DT), mask=keep)


def query_proj_rope_reason(q: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor) -> str | None:
    """Why ``query_proj_rope`` cannot use its kernel for these inputs (None: it can)."""
    nope, lat = w_uk.shape[1], w_uk.shape[2]
    rope = q.shape[2] - nope
    if q.dtype not in (torch.bfloat16, torch.float32) or w_uk.dtype != q.dtype or cos.dtype != q.dtype:
        return f"dtypes {q.dtype} / {w_uk.dtype} / {cos.dtype}: the kernel takes bf16 or fp32, the same for all"
    if nope != 128 or rope != 64 or 2 * cos.shape[1] != rope:
        return (f"nope {nope} / rope {rope}: the kernel takes DeepSeek-V3.2's 128 / 64 (the shape it is compiled and "
                "tested at; GLM-5's nope 192 is not a power of two) with cos / sin [t, rope / 2]")
    if lat % BLOCK_N:
        return f"kv_lora_rank {lat} is not a multiple of {BLOCK_N}"
    if q.stride(-1) != 1 or w_uk.stride(-1) != 1:
        return "the head dims must be contiguous"
    return None


def query_proj_rope_reference(q: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              out: torch.Tensor) -> torch.Tensor:
    """The two-pass path: torch's bmm per head into out[..., :L], then the RoPE kernel into out[..., L:]."""
    from . import rope

    nope, lat = w_uk.shape[1], w_uk.shape[2]
    torch.bmm(q[..., :nope].transpose(0, 1), w_uk, out=out[..., :lat].transpose(0, 1))       # [H, t, L]
    rope(q[..., nope:], cos, sin, True, out=out[..., lat:])
    return out


def query_proj_rope(q: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
                    use_kernel: bool = True, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """q [t, H, nope + rope] (unit last stride; MLA's q_b output rows), w_uk [H, nope, L] (unit last stride), cos /
    sin [t, rope / 2] -> out [t, H, L + rope] (written; row and head strides honoured) = [q_nope @ W_UK per head |
    RoPE(q_pe)] (module docstring). The kernel on CUDA tensors and under the interpreter when ``use_kernel``,
    otherwise ``query_proj_rope_reference``. ``config``: (BM, BN, warps, stages), for benchmarks (default
    ``DEFAULT_CONFIG``)."""
    t, h, d = q.shape
    nope, lat = w_uk.shape[1], w_uk.shape[2]
    if w_uk.shape[0] != h or out.shape != (t, h, lat + d - nope) or out.stride(-1) != 1 or cos.shape[0] != t:
        raise ValueError(f"query_proj_rope: q {tuple(q.shape)}, w_uk {tuple(w_uk.shape)}, cos {tuple(cos.shape)} "
                         f"and out {tuple(out.shape)} do not fit [t, H, nope + rope], [H, nope, L], [t, rope / 2], "
                         "[t, H, L + rope] (out with a unit last stride)")
    kernel = (use_kernel and triton is not None and (q.is_cuda or interpret_mode())
              and query_proj_rope_reason(q, w_uk, cos) is None)
    if not kernel:
        return query_proj_rope_reference(q, w_uk, cos, sin, out)
    cos, sin = cos.contiguous(), sin.contiguous()
    if t:
        bm, bn, warps, stages = config or DEFAULT_CONFIG
        _query_proj_rope_kernel[(triton.cdiv(t, bm), h)](
            q, w_uk, cos, sin, out, t, q.stride(0), q.stride(1), w_uk.stride(0), w_uk.stride(1), cos.stride(0),
            out.stride(0), out.stride(1), NOPE=nope, L=lat, HALF=cos.shape[1], BM=bm, BN=bn,
            ROUND=_round_mode(q.dtype),
            UPCAST=interpret_mode(), num_warps=warps, num_stages=stages)
    return out
