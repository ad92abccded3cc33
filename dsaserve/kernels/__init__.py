"""dsaserve kernels: the public entry points.

Each function checks shapes and dtypes (raising ``KernelInputError`` that names the argument), then runs
the Triton kernel on CUDA tensors and the PyTorch reference (``dsaserve.kernels.reference``) otherwise.
``backend='triton'`` forces the Triton path (CUDA, or the CPU interpreter under TRITON_INTERPRET=1; the
tests use this), ``backend='reference'`` forces the reference. Where a Triton kernel cannot take a shape
(non power-of-two dims, ...), 'auto' falls back to the reference and ``fallback_reason`` says why.

Contracts (shapes in brackets):
- act_quant(x [..., N], block=128, ue8m0=False) -> (e4m3 [..., N], fp32 scale [..., ceil(N/block)])
- hadamard_rotate(x [..., D]) -> [..., D]
- hadamard_act_quant(x [..., D]) -> (e4m3 [..., D], fp32 scale [..., 1]) == act_quant(hadamard_rotate(x.float()), D)
- mqa_logits(q_fp8 [S,H,D], k_fp8 [Skv,D], k_scale [Skv], weights [S,H], ks [S], ke [S], num_sms) -> [S, Skv]
- paged_mqa_logits(q_fp8 [B,H,D], k_cache [P,64,D], k_scale_cache [P,64], weights [B,H],
                   context_lens [B], block_table [B, max_pages], num_sms) -> [B, max_pages*64]
- topk_indices(logits [S,N], ks [S], ke [S], k, offset=0) -> int32 [S, k] (-1 padded)
- mqa_topk_indices(q_fp8, k_fp8, k_scale, weights, ks, ke, k, offset=0, num_sms, fused=True) -> int32 [S, k]
  (the top-k of mqa_logits per row without the [S, Skv] logits; fused=False: mqa_logits + topk_indices)
- rms_norm(x [..., N], weight [N], eps, residual=None) -> (y [..., N], residual + x or None)
- rms_norm_quant(...same) -> (y, residual + x or None, act_quant(y, 128) or None when no kernel makes it)
- indexer_key(k [n, D], ln weight, ln bias, eps, cos, sin, interleaved, quantize) -> (key, scale [n] or None):
  k_norm LayerNorm -> RoPE of the rope dims -> (Hadamard + e4m3) in one pass
- indexer_query(q [n, H, D], cos, sin, interleaved, weights [n, H]) -> (e4m3 q, weights * scale): RoPE ->
  Hadamard + e4m3 per head, in one pass
- mla_latent(kv [n, L+R], weight [L], eps, cos, sin) -> [rms_norm(kv[:, :L]) | rope(kv[:, L:])] in one pass
- silu_mul(gate_up [n, 2I], quant=False) -> (silu(gate) * up [n, I], act_quant of it or None)
- write_cache_rows(slots [m], [(dest, values), ...]) -> None: up to 3 caches' new rows in one launch
- rope(x [n, D] or [n, G, D], cos [n, D/2], sin [n, D/2], interleaved, out=None) -> [n, (G,) D]
- moe_route(logits [n, E] fp32, bias [E], top_k, n_group, topk_group, norm_topk_prob, scaling)
  -> (ids [n, top_k] int64, weights [n, top_k] fp32)
- slots_of_positions(pos [m, k] int, block_tables [m, W] int, page_size) -> int32 slots [m, k] (-1 kept)
- sparse_mla(q [t,h,dqk], kv [slots,dqk], indices [t,topk], sm_scale, d_v=512) -> (out [t,h,d_v], lse [t,h])
"""

from __future__ import annotations

import torch

from . import reference
from ._common import HAVE_TRITON, KernelInputError, check, check_shape, is_pow2, use_triton

__all__ = [
    "KernelInputError", "act_quant", "hadamard_rotate", "hadamard_act_quant", "mqa_logits", "paged_mqa_logits", "topk_indices",
    "mqa_topk_indices", "sparse_mla", "rms_norm", "rms_norm_quant", "indexer_key", "indexer_query", "mla_latent", "write_cache_rows", "silu_mul", "rope", "moe_route", "slots_of_positions", "fallback_reason", "reference",
]

_FP8 = torch.float8_e4m3fn
_I32 = torch.int32


def _fallback(reason: str | None, backend: str, name: str) -> bool:
    """True when the Triton path must be skipped; an explicit backend='triton' turns the reason into an error."""
    if reason is None:
        return False
    if backend == "triton":
        raise KernelInputError(f"{name}: the Triton kernel cannot run this input: {reason}")
    return True


# ----------------------------------------------------------------------------------------------- act_quant
def act_quant(x: torch.Tensor, block: int = 128, ue8m0: bool = False, backend: str = "auto"):
    """Quantize the last dim to float8 e4m3 with one fp32 scale per ``block`` values (whole row if N < block).

    amax is clamped >= 1e-4; scale = amax / 448 (ue8m0: rounded up to a power of two); values are clamped to
    +-448. Returns (x_fp8 [..., N], scale [..., ceil(N / block)]).
    """
    check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
          f"act_quant: x must be fp32/bf16/fp16, got {x.dtype}")
    check(x.dim() >= 1 and x.shape[-1] > 0, f"act_quant: x needs a non-empty last dim, got {tuple(x.shape)}")
    check(block > 0, f"act_quant: block must be positive, got {block}")
    if use_triton(x, backend=backend):
        from .quant import act_quant_triton

        return act_quant_triton(x, block, ue8m0)
    return reference.act_quant(x, block, ue8m0)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard transform of the last dim (a power of two), scale D^-0.5 (torch)."""
    check(x.dtype.is_floating_point, f"hadamard_rotate: x must be floating point, got {x.dtype}")
    return reference.hadamard_rotate(x)


def hadamard_act_quant(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``act_quant(hadamard_rotate(x.float()), block=D)`` in one pass: the fp8 indexer's q / k quantization.

    x [..., D] (D a power of two, 2..1024) -> (e4m3 [..., D], fp32 scale [..., 1]). The Triton kernel is
    bit-identical to the reference composition (same butterflies in fp32, same rounding); the reference runs
    7 + 2 passes over fp32 copies of x (log2(D) butterfly stages), which dominated the indexer projections.
    """
    check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
          f"hadamard_act_quant: x must be fp32/bf16/fp16, got {x.dtype}")
    d = x.shape[-1] if x.dim() else 0
    check(x.dim() >= 1 and is_pow2(d) and 2 <= d <= 1024,
          f"hadamard_act_quant: the last dim must be a power of two in [2, 1024], got shape {tuple(x.shape)}")
    if use_triton(x, backend=backend):
        from .quant import hadamard_act_quant_triton

        return hadamard_act_quant_triton(x)
    return reference.act_quant(reference.hadamard_rotate(x.float()), block=d)


# ------------------------------------------------------------------------------------------- norm, rope
_GLUE_DTYPES = (torch.bfloat16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of the last dim in fp32, the residual added first when given -> (y, new residual or None).

    Triton (one pass): the residual is bit-identical to the reference, y within one rounding of x's dtype
    (the fp32 mean sums in another order); bf16 / fp32 inputs, else the reference.
    """
    check(x.dim() >= 1 and weight.shape == (x.shape[-1],),
          f"rms_norm: weight must be [{x.shape[-1] if x.dim() else '?'}], got {tuple(weight.shape)}")
    check(residual is None or (residual.shape == x.shape and residual.dtype == x.dtype),
          f"rms_norm: residual must match x ({tuple(x.shape)}, {x.dtype})")
    if x.dtype in _GLUE_DTYPES and weight.dtype == x.dtype and use_triton(x, backend=backend):
        from .norm_rope import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                   backend: str = "auto"):
    """``rms_norm`` that also returns ``act_quant(y, 128)`` when one kernel can make it -> (y, new residual or
    None, (y e4m3 [..., N], scales [..., N / 128] fp32) or None).

    Triton, bf16 / fp32, N % 128 == 0: the quantized copy is bit-identical to ``act_quant`` of the returned y
    (for the fp8 linears and experts that read y: one launch less each). Otherwise (CPU: the reference) the
    third item is None and the consumer quantizes y itself, with the same result.
    """
    check(x.dim() >= 1 and weight.shape == (x.shape[-1],),
          f"rms_norm_quant: weight must be [{x.shape[-1] if x.dim() else '?'}], got {tuple(weight.shape)}")
    check(residual is None or (residual.shape == x.shape and residual.dtype == x.dtype),
          f"rms_norm_quant: residual must match x ({tuple(x.shape)}, {x.dtype})")
    if x.dtype in _GLUE_DTYPES and weight.dtype == x.dtype and x.shape[-1] % 128 == 0 \
            and use_triton(x, backend=backend):
        from .norm_rope import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual, quant=True)
    return (*rms_norm(x, weight, eps, residual, backend=backend), None)


def indexer_key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, cos: torch.Tensor,
                sin: torch.Tensor, interleaved: bool, quantize: bool, backend: str = "auto"):
    """The indexer's key path of x [n, D] (its wk projection, any row stride): LayerNorm (weight, bias [D]) ->
    RoPE of the first 2 * cos.shape[1] dims (cos / sin [n, rope/2] in x's dtype) -> with ``quantize`` the
    Hadamard rotation + act_quant over the key -> (key [n, D] in x's dtype or e4m3, scale [n] fp32 or None).

    Triton (one launch): the normed key within one rounding of x's dtype of the reference's (the LayerNorm
    sums in another order), the rest bit-identical given the same normed key; bf16 / fp32, D a power of two.
    """
    check(x.dim() == 2 and weight.shape == (x.shape[1],) and bias.shape == weight.shape,
          f"indexer_key: x must be [n, D] with weight / bias [D]; got x {tuple(x.shape)}, weight "
          f"{tuple(weight.shape)}, bias {tuple(bias.shape)}")
    check(cos.shape == sin.shape and cos.shape[0] == x.shape[0] and 0 < 2 * cos.shape[1] <= x.shape[1],
          f"indexer_key: cos / sin must be [n, rope/2] with rope <= D; got {tuple(cos.shape)} for x {tuple(x.shape)}")
    if x.dtype in _GLUE_DTYPES and is_pow2(x.shape[1]) and x.shape[1] <= 1024 and use_triton(x, backend=backend):
        from .key_path import indexer_key_triton

        return indexer_key_triton(x, weight, bias, eps, cos, sin, interleaved, quantize)
    return reference.indexer_key(x, weight, bias, eps, cos, sin, interleaved, quantize)


def indexer_query(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, weights: torch.Tensor,
                  backend: str = "auto", kernel: str = "triton") -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 indexer's query path of q [n, H, D] (its wq_b projection, any token / head strides): RoPE of
    the first 2 * cos.shape[1] dims -> Hadamard rotation + e4m3 per (token, head) -> (q e4m3 [n, H, D],
    weights [n, H] fp32 times each row's scale). Triton (one launch): bit-identical to the reference (RoPE,
    then ``hadamard_act_quant``, then the product). ``kernel="gluon"``: the Gluon kernel, one row a thread, where
    it takes the input (``key_path_gluon``; the same arithmetic), else the Triton one."""
    check(q.dim() == 3 and weights.shape == q.shape[:2] and weights.dtype == torch.float32,
          f"indexer_query: q must be [n, H, D] with fp32 weights [n, H]; got q {tuple(q.shape)}, weights "
          f"{tuple(weights.shape)} {weights.dtype}")
    check(cos.shape == sin.shape and cos.shape[0] == q.shape[0] and 0 < 2 * cos.shape[1] <= q.shape[2],
          f"indexer_query: cos / sin must be [n, rope/2]; got {tuple(cos.shape)} for q {tuple(q.shape)}")
    check(kernel in ("triton", "gluon"), f"indexer_query: kernel must be 'triton' or 'gluon', got {kernel!r}")
    if q.dtype in _GLUE_DTYPES and is_pow2(q.shape[2]) and q.shape[2] <= 1024 and use_triton(q, backend=backend):
        if kernel == "gluon":
            from .key_path_gluon import indexer_query_gluon, indexer_query_gluon_reason

            if indexer_query_gluon_reason(q, cos) is None:
                return indexer_query_gluon(q, cos, sin, interleaved, weights)
        from .key_path import indexer_query_triton

        return indexer_query_triton(q, cos, sin, interleaved, weights)
    return reference.indexer_query(q, cos, sin, interleaved, weights)


def mla_latent(kv: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool = True, backend: str = "auto") -> torch.Tensor:
    """MLA's cache row from the kv_a projection kv [n, L + R] (any row stride): [rms_norm(kv[:, :L]) (weight
    [L]) | RoPE(kv[:, L:]) (cos / sin [n, R/2])] -> [n, L + R] in kv's dtype. Triton: one launch, each part
    bit-identical to the ``rms_norm`` / ``rope`` kernels (the norm within one rounding of the reference)."""
    lat = weight.shape[0] if weight.dim() == 1 else -1
    check(kv.dim() == 2 and 0 < lat < kv.shape[1] and cos.shape == sin.shape
          and cos.shape == (kv.shape[0], (kv.shape[1] - lat) // 2) and (kv.shape[1] - lat) % 2 == 0,
          f"mla_latent: kv must be [n, L + R] with weight [L] and cos / sin [n, R/2]; got kv {tuple(kv.shape)}, "
          f"weight {tuple(weight.shape)}, cos {tuple(cos.shape)}")
    if kv.dtype in _GLUE_DTYPES and weight.dtype == kv.dtype and use_triton(kv, backend=backend):
        from .norm_rope import mla_latent_triton

        return mla_latent_triton(kv, weight, eps, cos, sin, interleaved)
    return reference.mla_latent(kv, weight, eps, cos, sin, interleaved)


def write_cache_rows(slots: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                     backend: str = "auto") -> None:
    """dest[slots[i]] = values[i] for every (dest [slots_total, ...], values [m, ...]) pair (up to 3, e.g. one
    layer's latent, indexer keys and key scales) and every slot >= 0; slots [m] int64. Triton: one launch for
    all pairs, no host sync (the reference's boolean mask syncs); each pair's dtypes must match."""
    check(1 <= len(pairs) <= 3, f"write_cache_rows: 1 to 3 (dest, values) pairs, got {len(pairs)}")
    for dest, values in pairs:
        check(dest.dtype == values.dtype and dest.shape[1:] == values.shape[1:] and values.shape[0] == slots.shape[0],
              f"write_cache_rows: values {values.dtype} {tuple(values.shape)} do not fit rows of {dest.dtype} "
              f"{tuple(dest.shape)} at {slots.shape[0]} slots")
    if use_triton(slots, *[t for pair in pairs for t in pair], backend=backend) and \
            all(d.is_contiguous() for d, _ in pairs):
        from .paging import write_cache_rows_triton

        return write_cache_rows_triton(slots, pairs)
    return reference.write_cache_rows(slots, pairs)


def silu_mul(gate_up: torch.Tensor, quant: bool = False, backend: str = "auto"):
    """silu(gate) * up of gate_up [n, 2I] (= gate | up, e.g. the fused gate / up GEMM's output) -> (y [n, I],
    act_quant(y, 128) or None). Triton (one launch; ``quant`` with I % 128 == 0 adds the e4m3 copy,
    bit-identical to act_quant of y): silu's exp differs from torch's in the last fp32 bits, so y can sit one
    rounding of its dtype away from the reference. Elsewhere: the reference, and None for the copy."""
    check(gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0,
          f"silu_mul: gate_up must be [n, 2I], got {tuple(gate_up.shape)}")
    if gate_up.dtype in _GLUE_DTYPES and use_triton(gate_up, backend=backend):
        from .norm_rope import silu_mul_triton

        return silu_mul_triton(gate_up, quant and (gate_up.shape[1] // 2) % 128 == 0)
    return reference.silu_mul(gate_up), None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, out: torch.Tensor | None = None,
         backend: str = "auto") -> torch.Tensor:
    """RoPE of x [n, D] or [n, G, D] (any row / head strides, unit last stride) with cos / sin [n, D/2] in x's
    dtype; written into ``out`` when given (may be x itself: in place). Triton: bit-identical to the reference."""
    check(x.dim() in (2, 3) and x.shape[-1] % 2 == 0 and cos.shape == (x.shape[0], x.shape[-1] // 2)
          and sin.shape == cos.shape,
          f"rope: x must be [n, D] or [n, G, D] with even D and cos/sin [n, D/2]; got x {tuple(x.shape)}, "
          f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    check(out is None or (out.shape == x.shape and out.dtype == x.dtype), "rope: out must match x's shape and dtype")
    d = x.shape[-1]
    if (x.dtype in _GLUE_DTYPES and cos.dtype == x.dtype and sin.dtype == x.dtype and is_pow2(d // 2)
            and x.stride(-1) == 1 and (out is None or out.stride(-1) == 1) and use_triton(x, backend=backend)):
        from .norm_rope import rope_triton

        return rope_triton(x, cos, sin, interleaved, out)
    y = reference.rope(x, cos, sin, interleaved)
    if out is None:
        return y
    out.copy_(y)
    return out


def moe_route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
              norm_topk_prob: bool, scaling: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's noaux_tc expert choice from router logits [n, E] fp32 (see ``reference.moe_route``) ->
    (ids [n, top_k] int64, weights [n, top_k] fp32). Triton: one launch instead of ~15; ties go to the lower
    index (torch.topk's tie order is unspecified)."""
    check(logits.dim() == 2 and logits.dtype == torch.float32, f"moe_route: logits must be [n, E] fp32, got "
          f"{logits.dtype} {tuple(logits.shape)}")
    n, e = logits.shape
    check(bias.shape == (e,), f"moe_route: bias must be [{e}], got {tuple(bias.shape)}")
    check(n_group >= 1 and e % n_group == 0 and 1 <= topk_group <= n_group,
          f"moe_route: {e} experts must split into n_group={n_group} equal groups with 1 <= topk_group "
          f"({topk_group}) <= n_group")
    check(1 <= top_k <= topk_group * (e // n_group) and (n_group == 1 or e // n_group >= 2),
          f"moe_route: top_k={top_k} must be in [1, experts in the kept groups] (groups need >= 2 experts)")
    if is_pow2(n_group) and e <= 1024 and top_k <= 32 and use_triton(logits, bias, backend=backend):
        from .router import moe_route_triton

        return moe_route_triton(logits.contiguous(), bias.float().contiguous(), top_k, n_group, topk_group,
                                norm_topk_prob, scaling)
    return reference.moe_route(logits, bias, top_k, n_group, topk_group, norm_topk_prob, scaling)


def slots_of_positions(pos: torch.Tensor, block_tables: torch.Tensor, page_size: int,
                       backend: str = "auto") -> torch.Tensor:
    """Key positions [m, k] (-1 = none) -> int32 cache slots [m, k] (-1 kept) through each row's block table
    [m, W] (see ``reference.slots_of_positions``); no host reads (CUDA-graph safe). Triton: one launch."""
    check(pos.dim() == 2 and block_tables.dim() == 2 and block_tables.shape[0] == pos.shape[0],
          f"slots_of_positions: pos [m, k] and block_tables [m, W] must share m, got {tuple(pos.shape)} and "
          f"{tuple(block_tables.shape)}")
    check(not pos.dtype.is_floating_point and not block_tables.dtype.is_floating_point,
          "slots_of_positions: pos and block_tables must be integer tensors")
    if use_triton(pos, block_tables, backend=backend):
        from .paging import slots_of_positions_triton

        return slots_of_positions_triton(pos, block_tables, page_size)
    return reference.slots_of_positions(pos, block_tables, page_size)


# ----------------------------------------------------------------------------------------------- logits
def _logits_reason(h: int, d: int) -> str | None:
    if not is_pow2(h) or not is_pow2(d):
        return f"heads ({h}) and head dim ({d}) must be powers of two"
    if d < 16:
        return f"head dim {d} < 16 (the fp8 MMA needs K >= 16)"
    if h > 256:
        return f"{h} heads > 256 (one MMA column block holds all heads of a query)"
    return None


def fallback_reason(op: str, **dims) -> str | None:
    """Why the Triton kernel of ``op`` would not take these dims (None = it would). For logs and tests."""
    if op in ("mqa_logits", "paged_mqa_logits", "mqa_topk_indices"):
        return _logits_reason(dims["h"], dims["d"])
    if op == "sparse_mla":
        return _mla_reason(dims["dqk"], dims["d_v"])
    raise KeyError(op)

def _check_indexer_inputs(name, q_fp8, k_fp8, k_scale, weights, ks, ke, num_sms) -> tuple[int, int, int, int]:
    """The indexer kernels' shared input contract (q [S, H, D] e4m3, k [Skv, D] e4m3, k_scale fp32 [Skv],
    weights fp32 [S, H], ks/ke int32 [S]) -> (S, H, D, Skv); errors name ``name`` and the argument."""
    check(q_fp8.dim() == 3, f"{name}: q_fp8 must be [S, H, D], got {tuple(q_fp8.shape)}")
    s, h, d = q_fp8.shape
    check_shape(f"{name}: q_fp8", q_fp8, (s, h, d), _FP8)
    check_shape(f"{name}: k_fp8", k_fp8, (None, d), _FP8)
    skv = k_fp8.shape[0]
    check_shape(f"{name}: k_scale", k_scale, (skv,), torch.float32)
    check_shape(f"{name}: weights", weights, (s, h), torch.float32)
    check_shape(f"{name}: ks", ks, (s,), _I32)
    check_shape(f"{name}: ke", ke, (s,), _I32)
    check(num_sms is None or num_sms >= 1, f"{name}: num_sms must be >= 1, got {num_sms}")
    return s, h, d, skv



def mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke, num_sms: int | None = None, backend: str = "auto",
               config=None, kernel: str = "auto", key_stride: int = 1) -> torch.Tensor:
    """Indexer logits for prefill.

    logits[i, j] = k_scale[j] * sum_h weights[i, h] * relu(q[i, h] . k[j]) for ks[i] <= j < ke[i], -inf
    elsewhere (rows with ks >= ke are all -inf). The caller folds q's dequant scale and softmax-type factors
    into ``weights``. q_fp8 [S, H, D] e4m3, k_fp8 [Skv, D] e4m3, k_scale fp32 [Skv], weights fp32 [S, H],
    ks/ke int32 [S] -> fp32 [S, Skv]. ``num_sms``: SMs the persistent grid may use (default: all).
    ``kernel`` (GPU path): "auto" (the Gluon kernel on sm_90 where it takes the shape and there are at least
    ``indexer_logits_hopper.AUTO_MIN_KEYS`` keys, else Triton), "triton", or "gluon" (an error where it cannot
    run); a Triton ``config`` implies "triton".
    ``key_stride`` > 1: only keys 0, key_stride, 2 key_stride, ... -> fp32 [S, ceil(Skv / key_stride)], column j
    being key j * key_stride, valid where ks[i] <= j * key_stride < ke[i] (the threshold top-k's sample). The
    Triton kernel reads those keys in place; the other paths gather them first.
    """
    s, h, d, skv = _check_indexer_inputs("mqa_logits", q_fp8, k_fp8, k_scale, weights, ks, ke, num_sms)
    check(kernel in ("auto", "triton", "gluon"), f"mqa_logits: kernel must be auto, triton or gluon, got {kernel!r}")
    check(isinstance(key_stride, int) and key_stride >= 1, f"mqa_logits: key_stride must be an int >= 1, got "
          f"{key_stride!r}")
    n_cols = -(-skv // key_stride)
    tensors = (q_fp8, k_fp8, k_scale, weights, ks, ke)
    if use_triton(*tensors, backend=backend) and not _fallback(_logits_reason(h, d), backend, "mqa_logits"):
        if kernel != "triton" and config is None:
            from . import indexer_logits_hopper as G

            reason = G.unsupported_reason(q_fp8)
            check(reason is None or kernel == "auto", f"mqa_logits: kernel='gluon' cannot run here: {reason}")
            if reason is None and (kernel == "gluon" or n_cols >= G.AUTO_MIN_KEYS):
                if key_stride > 1:
                    return mqa_logits(*_sampled_keys(tensors, key_stride), num_sms=num_sms, kernel="gluon")
                return G.mqa_logits_hopper(*(t.contiguous() for t in tensors), num_sms=num_sms)
        from .indexer_logits import mqa_logits_triton

        return mqa_logits_triton(*(t.contiguous() for t in tensors), num_sms=num_sms, config=config,
                                 key_stride=key_stride)
    if key_stride > 1:
        return reference.mqa_logits(*_sampled_keys(tensors, key_stride))
    return reference.mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke)


def _sampled_keys(tensors, stride: int):
    """``mqa_logits``'s inputs with keys 0, stride, 2 stride, ... gathered and each row's [ks, ke) in them: key
    j * stride is in the row when ceil(ks / stride) <= j < ceil(ke / stride) (ks, ke clamped to [0, Skv])."""
    q_fp8, k_fp8, k_scale, weights, ks, ke = tensors
    skv = k_fp8.shape[0]
    ks_s = ((ks.clamp(0, skv) + stride - 1) // stride).to(torch.int32)
    ke_s = ((ke.clamp(0, skv) + stride - 1) // stride).to(torch.int32)
    return q_fp8, k_fp8[::stride].contiguous(), k_scale[::stride].contiguous(), weights, ks_s, ke_s


def paged_mqa_logits(q_fp8, k_cache_fp8, k_scale_cache, weights, context_lens, block_table,
                     num_sms: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Indexer logits for decode over the paged key cache (64-token pages).

    Request b's single query sits at position context_lens[b]-1 and sees keys 0..context_lens[b]-1 of its
    own pages (block_table[b]). Returns fp32 [B, max_pages * 64], -inf beyond each context.
    """
    check(q_fp8.dim() == 3, f"paged_mqa_logits: q_fp8 must be [B, H, D], got {tuple(q_fp8.shape)}")
    b, h, d = q_fp8.shape
    check_shape("paged_mqa_logits: q_fp8", q_fp8, (b, h, d), _FP8)
    check_shape("paged_mqa_logits: k_cache_fp8", k_cache_fp8, (None, reference.PAGE_SIZE, d), _FP8)
    n_pages = k_cache_fp8.shape[0]
    check_shape("paged_mqa_logits: k_scale_cache", k_scale_cache, (n_pages, reference.PAGE_SIZE), torch.float32)
    check_shape("paged_mqa_logits: weights", weights, (b, h), torch.float32)
    check_shape("paged_mqa_logits: context_lens", context_lens, (b,), _I32)
    check_shape("paged_mqa_logits: block_table", block_table, (b, None), _I32)
    tensors = (q_fp8, k_cache_fp8, k_scale_cache, weights, context_lens, block_table)
    if use_triton(*tensors, backend=backend) and not _fallback(_logits_reason(h, d), backend, "paged_mqa_logits"):
        from .indexer_logits import paged_mqa_logits_triton

        return paged_mqa_logits_triton(*(t.contiguous() for t in tensors), num_sms=num_sms)
    return reference.paged_mqa_logits(*tensors)


# ----------------------------------------------------------------------------------------------- top-k
def topk_indices(logits: torch.Tensor, ks: torch.Tensor | None = None, ke: torch.Tensor | None = None,
                 k: int = 2048, offset: int | torch.Tensor = 0, lengths: torch.Tensor | None = None,
                 assume_masked: bool = False, backend: str = "auto") -> torch.Tensor:
    """Top-k column indices per row among valid columns ks[i] <= j < ke[i] -> int32 [S, k], -1 padded.

    Give either (ks, ke) or ``lengths`` (= ke with ks = 0). ``offset`` (int or [S]) is added to the returned
    indices (e.g. a request's first slot or position). ``assume_masked``: logits are already -inf outside
    the ranges (as mqa_logits returns them), which saves a pass on the GPU.
    """
    check(logits.dim() == 2 and logits.dtype == torch.float32,
          f"topk_indices: logits must be fp32 [S, N], got {logits.dtype} {tuple(logits.shape)}")
    check(k >= 1, f"topk_indices: k must be >= 1, got {k}")
    s, n = logits.shape
    if lengths is not None:
        check(ks is None and ke is None, "topk_indices: give either lengths or ks/ke, not both")
        check_shape("topk_indices: lengths", lengths, (s,), (torch.int32, torch.int64))
        ke = lengths
    else:
        check(ks is not None and ke is not None, "topk_indices: give ks and ke (or lengths)")
        check_shape("topk_indices: ks", ks, (s,), (torch.int32, torch.int64))
    check_shape("topk_indices: ke", ke, (s,), (torch.int32, torch.int64))
    if isinstance(offset, torch.Tensor):
        check_shape("topk_indices: offset", offset, (s,), (torch.int32, torch.int64))
    if backend != "reference" and logits.is_cuda:
        from .topk import topk_indices_gpu

        return topk_indices_gpu(logits, ks, ke, k, offset, assume_masked=assume_masked)   # ks None = 0
    return reference.topk_indices(logits, torch.zeros_like(ke) if ks is None else ks, ke, k, offset)


# ----------------------------------------------------------------------------------------------- fused top-k
def mqa_topk_indices(q_fp8, k_fp8, k_scale, weights, ks, ke, k: int = 2048, offset: int | torch.Tensor = 0,
                     num_sms: int | None = None, fused: bool = True, backend: str = "auto",
                     config=None, kernel: str = "auto", mark=None,
                     redo_rows: torch.Tensor | None = None, select: str = "auto", filter_config=None) -> torch.Tensor:
    """Indexer top-k for prefill: the k largest ``mqa_logits`` columns of each row, -1 padded.

    Same inputs as ``mqa_logits`` plus k and ``offset`` (int or int32/int64 [S], added to every valid
    index) -> int32 [S, k]. Rows with fewer than k valid columns (ks <= j < ke) list them all, then -1.
    ``fused=True`` (Triton on CUDA): one kernel, no [S, Skv] logits (memory: the output plus a workspace
    bounded by the SM count, see ``indexer_topk``); ties at the k-th value go to the higher column
    (``reference.select_topk_ordered``), rows come in descending column order (the Triton kernel; see
    ``kernel``). ``fused=False``: ``mqa_logits`` + ``topk_indices`` (the unfused path, for ablations; ties as
    torch.topk breaks them).
    ``kernel`` (fused, GPU path): "threshold" (``threshold_topk.mqa_topk_threshold``: a sampled per-row
    threshold, the Gluon logits kernel appending the keys above it, an exact select, the missed rows redone;
    sm_90, at most 64 heads; a row's columns in candidate order), "triton" (the fused Triton kernel,
    ``indexer_topk``), or "auto" (threshold where it runs and there are at least ``THRESHOLD_MIN_KEYS`` keys,
    else triton); a Triton ``config`` implies triton. Both select the same set per row. ``mark`` (name -> context
    manager): the threshold path's selection-only work runs inside ``mark("topk")`` (see ``mqa_topk_threshold``);
    ``redo_rows`` (device int64 [1]): the threshold path adds the rows it had to redo. ``select``: the threshold
    path's row kernels (``threshold_topk.ThresholdTopkConfig.select``: auto, gluon or triton; same results);
    ``filter_config``: its filter kernel's launch (``indexer_logits_hopper.LogitsHopperConfig``; None = the default).
    On CPU (or ``backend='reference'``) ``reference.mqa_topk_indices`` runs, chunked over queries.
    """
    s, h, d, skv = _check_indexer_inputs("mqa_topk_indices", q_fp8, k_fp8, k_scale, weights, ks, ke, num_sms)
    check(k >= 1, f"mqa_topk_indices: k must be >= 1, got {k}")
    if isinstance(offset, torch.Tensor):
        check_shape("mqa_topk_indices: offset", offset, (s,), (torch.int32, torch.int64))
    tensors = (q_fp8, k_fp8, k_scale, weights, ks, ke)
    if not fused:
        logits = mqa_logits(*tensors, num_sms=num_sms, backend=backend)
        return topk_indices(logits, ks, ke, k, offset, assume_masked=True, backend=backend)
    check(kernel in ("auto", "triton", "threshold"),
          f"mqa_topk_indices: kernel must be auto, triton or threshold, got {kernel!r}")
    if use_triton(*tensors, backend=backend) and not _fallback(_logits_reason(h, d), backend, "mqa_topk_indices"):
        if kernel != "triton" and config is None:
            reason = threshold_topk_reason(q_fp8)
            check(reason is None or kernel == "auto", f"mqa_topk_indices: kernel='threshold' cannot run here: {reason}")
            if reason is None and (kernel == "threshold" or skv >= THRESHOLD_MIN_KEYS):
                from .indexer_logits_hopper import LogitsHopperConfig
                from .threshold_topk import ThresholdTopkConfig, mqa_topk_threshold

                cfg = ThresholdTopkConfig(select=select, filter_config=filter_config or LogitsHopperConfig())
                return mqa_topk_threshold(*(t.contiguous() for t in tensors), k, offset, num_sms=num_sms, mark=mark,
                                          redo_rows=redo_rows, config=cfg)
        from .indexer_topk import mqa_topk_triton

        return mqa_topk_triton(*(t.contiguous() for t in tensors), k, offset, num_sms=num_sms, config=config)
    return reference.mqa_topk_indices(*tensors, k, offset)


# ``mqa_topk_indices(kernel="auto")`` takes the threshold top-k from this many keys (the Gluon logits kernel's own
# threshold: below it the Triton kernels' two programs per SM win)
THRESHOLD_MIN_KEYS = 16384
# ... and at most this many heads: 4+ queries a 256-column block (indexer_logits_hopper.N_COLS // 4), the filter's
# lane layout
THRESHOLD_MAX_HEADS = 64


def threshold_topk_reason(q_fp8: torch.Tensor) -> str | None:
    """Why ``mqa_topk_indices(kernel='threshold')`` cannot take q (None = it can): the Gluon logits kernel's
    conditions and at most ``THRESHOLD_MAX_HEADS`` heads."""
    from . import indexer_logits_hopper as G

    reason = G.unsupported_reason(q_fp8)
    if reason is None and q_fp8.shape[1] > THRESHOLD_MAX_HEADS:
        reason = f"the threshold filter takes at most {THRESHOLD_MAX_HEADS} heads, got {q_fp8.shape[1]}"
    return reason


# ----------------------------------------------------------------------------------------------- sparse MLA
def _mla_reason(dqk: int, d_v: int) -> str | None:
    d_r = dqk - d_v
    if not (is_pow2(d_v) and d_v >= 16 and is_pow2(d_r) and d_r >= 16):
        return f"value dim {d_v} and rope dim {dqk - d_v} must be powers of two >= 16"
    return None


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512,
               backend: str = "auto", num_splits: int | None = None, config=None, prefill_kernel: str = "auto"):
    """Sparse MLA (prefill and decode) in the absorbed latent space.

    q [t, h, dqk] bf16/fp32 (dqk = d_v + rope, 576 for DeepSeek-V3.2), kv [slots, dqk] same dtype, indices
    int32 [t, topk] into kv's first dim (-1 = invalid). Softmax over the selected keys of sm_scale * q . kv
    (all dqk dims), out = probs @ kv[:, :d_v] -> (out [t, h, d_v] in q's dtype, lse fp32 [t, h], natural
    log). Rows with no valid index: out = 0, lse = -inf. ``num_splits`` splits each row's top-k list
    (default: chosen so small decode batches fill the GPU). ``prefill_kernel``: "auto" = the Gluon kernel for
    Hopper on one-split (prefill-sized) calls it takes, "triton" = the Triton kernels only.
    """
    check(q.dim() == 3, f"sparse_mla: q must be [t, h, dqk], got {tuple(q.shape)}")
    t, h, dqk = q.shape
    check(q.dtype in (torch.bfloat16, torch.float16, torch.float32), f"sparse_mla: q dtype {q.dtype} unsupported")
    check_shape("sparse_mla: kv", kv, (None, dqk), q.dtype)
    check_shape("sparse_mla: indices", indices, (t, None), _I32)
    check(0 < d_v <= dqk, f"sparse_mla: d_v={d_v} must be in (0, {dqk}]")
    check(kv.stride(-1) == 1 and q.stride(-1) == 1, "sparse_mla: q and kv need a contiguous last dim")
    check(prefill_kernel in ("auto", "triton"), f"sparse_mla: prefill_kernel must be 'auto' or 'triton', got "
          f"{prefill_kernel!r}")
    if use_triton(q, kv, indices, backend=backend) and not _fallback(_mla_reason(dqk, d_v), backend, "sparse_mla"):
        from .sparse_attention import sparse_mla_triton

        return sparse_mla_triton(q, kv, indices.contiguous(), sm_scale, d_v, config=config, num_splits=num_splits,
                                 prefill_kernel=prefill_kernel)
    return reference.sparse_mla(q, kv, indices, sm_scale, d_v)
