"""The indexer's query path (RoPE -> Hadamard -> e4m3 per head, the head weight times the scale) in Gluon, one
row a thread.

Why (benchmarks/KERNELS_NOTES.md, "The indexer query kernel is issue-bound"): ``key_path._indexer_rows_kernel``
spreads a 128-wide head over many threads, so its butterflies cross threads (shuffles, layout conversions) and each
element's rope pair is gathered by a computed index: ~91 SASS instructions per element on sm_90, ~4x its bytes'
time. Here a thread owns whole rows (16-byte loads of its 256 bytes), so the rope pairs and all seven butterfly
stages stay in its registers. The arithmetic is the Triton kernel's op for op (the same roundings of the rope's
products and sums to bf16, the same butterfly pairs in the same order, act_quant's IEEE divisions), so the e4m3
bytes and the head weights must equal it bit for bit (tests/gpu/test_glue_kernels_gpu.py). Scope: bf16 queries
whose rope part is the first half of the head (DeepSeek-V3.2 and GLM-5: 64 of 128). Gluon has no CPU interpreter:
CI compiles it (tests/scripts/test_gluon_compiles.py), the GPU tests run it.
"""

from __future__ import annotations

import torch

from ._common import HAVE_GLUON, gl, gluon


if HAVE_GLUON:

    @gluon.jit
    def _round_bf16(v):
        """fp32 -> the nearest bf16 value (ties to even), kept in fp32, by the bits (as ``norm_rope._rounded``)."""
        bits = v.to(gl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(gl.float32, bitcast=True)

    @gluon.jit
    def _indexer_query_gluon_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, hw_ptr, hw_out_ptr, R, G, stride_xt, stride_xg,
                                    stride_c, stride_ot, stride_og, D: gl.constexpr, LOG2_D: gl.constexpr,
                                    HALF: gl.constexpr, INTERLEAVED: gl.constexpr, num_warps: gl.constexpr):
        """Rows r = (token r // G, head r % G), 32 * num_warps a program, one a thread: out[r] = e4m3 of the
        Hadamard-rotated roped row over its scale, hw_out[r] = hw[r] * scale (``key_path`` with QUANT and HAS_HW)."""
        BR: gl.constexpr = 32 * num_warps
        ROW: gl.constexpr = gl.BlockedLayout([1, D], [32, 1], [num_warps, 1], [1, 0])
        PAIR: gl.constexpr = gl.BlockedLayout([1, HALF], [32, 1], [num_warps, 1], [1, 0])
        r0 = gl.program_id(0) * BR
        rows = r0 + gl.arange(0, BR, layout=gl.SliceLayout(1, ROW))               # [BR]
        rmask = rows < R
        t = (rows // G).to(gl.int64)
        g = (rows % G).to(gl.int64)
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, ROW))
        x = gl.load(x_ptr + (t * stride_xt + g * stride_xg)[:, None] + cols[None, :], mask=rmask[:, None],
                    other=0.0).to(gl.float32)                                     # [BR, D], a row a thread
        rope, nope = gl.split(gl.permute(gl.reshape(x, [BR, 2, D // 2]), [0, 2, 1]))   # columns [0, D/2), [D/2, D)
        if INTERLEAVED:   # pairs (2p, 2p + 1)
            x1, x2 = gl.split(gl.reshape(rope, [BR, HALF, 2]))
        else:             # pairs (p, p + HALF)
            x1, x2 = gl.split(gl.permute(gl.reshape(rope, [BR, 2, HALF]), [0, 2, 1]))
        crows = r0 + gl.arange(0, BR, layout=gl.SliceLayout(1, PAIR))
        coffs = (crows // G).to(gl.int64)[:, None] * stride_c + gl.arange(0, HALF, layout=gl.SliceLayout(0, PAIR))[None, :]
        cmask = (crows < R)[:, None]
        c = gl.convert_layout(gl.load(cos_ptr + coffs, mask=cmask, other=0.0).to(gl.float32), x1.type.layout)
        s = gl.convert_layout(gl.load(sin_ptr + coffs, mask=cmask, other=0.0).to(gl.float32), x1.type.layout)
        # lo = x1 c - x2 s, hi = x2 c + x1 s, every product and the sum rounded to bf16, written as the Triton kernel
        # writes them: x1 c + (-(x2 s)). Triton's unary minus is 0 - x, so -(+0) is +0 there; "x1 c - x2 s" gave
        # -0 instead of +0 for some all-zero rows (H200, 2026-12-05)
        lo = _round_bf16(_round_bf16(x1 * c) + (-_round_bf16(x2 * s)))
        hi = _round_bf16(_round_bf16(x2 * c) + _round_bf16(x1 * s))
        rope = gl.reshape(gl.permute(gl.join(lo, hi), [0, 2, 1]), [BR, D // 2])  # (rotated lo | rotated hi)
        HALFROW: gl.constexpr = gl.BlockedLayout([1, D // 2], [32, 1], [num_warps, 1], [1, 0])
        rope = gl.convert_layout(rope, HALFROW)          # both halves in one layout (in-thread either way)
        nope = gl.convert_layout(nope, HALFROW)
        y = gl.reshape(gl.permute(gl.join(rope, nope), [0, 2, 1]), [BR, D])
        for st in gl.static_range(LOG2_D):  # the Hadamard kernel's butterflies (same pairs, same order)
            v = gl.permute(gl.reshape(y, [BR, D // (2 << st), 2, 1 << st]), [0, 1, 3, 2])
            a, b = gl.split(v)
            v = gl.join(a + b, a - b)
            y = gl.reshape(gl.permute(v, [0, 1, 3, 2]), [BR, D])
        y = gl.convert_layout(y, ROW) * (D ** -0.5)
        scale = gl.div_rn(gl.maximum(gl.max(gl.abs(y), axis=1), 1e-4), 448.0)      # [BR]
        q = gl.minimum(gl.maximum(gl.div_rn(y, scale[:, None]), -448.0), 448.0)
        gl.store(out_ptr + (t * stride_ot + g * stride_og)[:, None] + cols[None, :], q.to(gl.float8e4nv),
                 mask=rmask[:, None])
        hw = gl.load(hw_ptr + rows, mask=rmask, other=0.0)
        gl.store(hw_out_ptr + rows, hw * scale, mask=rmask)


def indexer_query_gluon_reason(q: torch.Tensor, cos: torch.Tensor) -> str | None:
    """Why ``indexer_query_gluon`` cannot take these inputs (None: it can)."""
    if not HAVE_GLUON:
        return "this Triton has no Gluon"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 8:
        return "needs a CUDA GPU (sm_80 or newer)"
    d = q.shape[-1]
    if q.dtype != torch.bfloat16 or cos.dtype != torch.bfloat16:
        return f"bf16 queries and cos / sin only (got {q.dtype} / {cos.dtype})"
    if d != 128 or 4 * cos.shape[1] != d:
        return f"head dim {d} with {2 * cos.shape[1]} rope dims: the kernel takes 128 with 64 (DeepSeek-V3.2, GLM-5)"
    if q.stride(-1) != 1:
        return "the head dim must be contiguous"
    return None


def indexer_query_gluon(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                        weights: torch.Tensor, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``key_path.indexer_query_triton``'s contract (q [n, H, D] bf16, cos / sin [n, D/4] -> (e4m3 [n, H, D],
    weights * scale [n, H] fp32)) for the inputs ``indexer_query_gluon_reason`` accepts."""
    n, h, d = q.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(n, h, d, dtype=torch.float8_e4m3fn, device=q.device)
    hw_out = torch.empty(n, h, dtype=torch.float32, device=q.device)
    rows = n * h
    if rows:
        br = 32 * num_warps
        _indexer_query_gluon_kernel[(-(-rows // br),)](
            q, cos, sin, out, weights.contiguous(), hw_out, rows, h, q.stride(0), q.stride(1), cos.stride(0),
            out.stride(0), out.stride(1), D=d, LOG2_D=d.bit_length() - 1, HALF=cos.shape[1],
            INTERLEAVED=interleaved, num_warps=num_warps)
    return out, hw_out
