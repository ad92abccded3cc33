"""Small building blocks: norms, RoPE (plain and YaRN, interleaved and half-split), the SiLU-gated MLP, and
the linear backends (``DenseLinear``, ``Fp8Linear``).

Numerics follow Hugging Face transformers (our test oracle): RMSNorm in fp32, cos/sin computed in fp32
and cast to the activation dtype, interleaved RoPE written out as (even-rotated | odd-rotated) halves.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsaserve import kernels
from dsaserve.config import ModelConfig
from dsaserve.kernels.fp8_linear import BLOCK as FP8_BLOCK
from dsaserve.kernels.fp8_linear import (
    FP8,
    Fp8LinearWeight,
    fp8_linear_prepared,
    fp8_linear_quantized,
    prepared_fp8_shapes,
)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (``kernels.rms_norm``: one Triton pass on CUDA). ``forward(x, residual)`` fuses the
    residual add: returns (normed, new_residual)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)[0]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.norm(x), x
        return kernels.rms_norm(x, self.weight, self.eps, residual)

    def forward_quant(self, x: torch.Tensor, residual: torch.Tensor | None = None, quant: bool = True):
        """``forward`` plus, with ``quant``, the normed output's fp8 copy for the fp8 linears / experts that read
        it -> (y, new_residual, (e4m3 y, 1x128 scales) or None: not asked, or no kernel makes it, and the
        consumer quantizes)."""
        if not quant:
            return (*self(x, residual), None)
        y, res, q = kernels.rms_norm_quant(x, self.weight, self.eps, residual)
        return y, (x if residual is None else res), q


class LayerNorm(nn.Module):
    """LayerNorm with bias (the indexer's ``k_norm``), computed in fp32."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class LinearFactory(Protocol):
    """The linear backend: makes the model's quantizable projections (``ModelBackends.linear``): the ones an fp8
    checkpoint stores as e4m3 blocks (MLA q_a / q_b / kv_a / o_proj, indexer wq_b / wk, dense MLP, shared
    expert). Projections that stay in the model dtype whatever the checkpoint (lm_head, the indexer's
    weights_proj, kv_b_proj whose per-head views the absorbed attention reads) use ``DenseLinear`` directly.

    ``factory(in_features, out_features, dtype, device)`` returns a module mapping [..., in] -> [..., out] in
    ``dtype``; ``fp8`` says whether its weight is an fp8 block-scaled one (``Fp8Linear``: the routed experts
    then take the same format; its layers also take an input quantized beforehand, ``Fp8Linear.forward(x,
    x_fp8)``, so a norm before them makes that copy while it is at it).
    """

    name: str
    fp8: bool

    def __call__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None) -> nn.Module:
        ...


class DenseLinear:
    """Weights in the model dtype (bf16 / fp32), one torch matmul: a bias-free ``nn.Linear`` without autograd."""

    name = "dense"
    fp8 = False

    def __call__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None) -> nn.Linear:
        layer = nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device)
        layer.weight.requires_grad_(False)
        return layer


class Fp8Linear(nn.Module):
    """A bias-free projection with a block-scaled fp8 weight (DeepSeek's recipe, ``kernels.fp8_linear``):
    activations quantized per token per 128 channels, both scales applied with fp32 accumulation, output in
    ``out_dtype``. CUDA: torch's blockwise ``scaled_mm`` (cuBLASLt) or the Triton kernel for small M; CPU:
    the reference (dequantize, then matmul), the numerics contract the device paths are tested against.

    weight [N_pad, K_pad] e4m3 and weight_scale_inv [ceil(N/128), round_up(ceil(K/128), 4)] fp32 are
    allocated in the layout ``fp8_linear_prepared`` wants (rows and columns zero-padded to 16, scale columns
    to 4; the real DeepSeek shapes need no weight padding), so the loader fills the checkpoint-shaped views
    of ``checkpoint_views()`` in place and nothing is copied at load.
    """

    def __init__(self, in_features: int, out_features: int, out_dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, out_dtype
        w_shape, s_shape = prepared_fp8_shapes(out_features, in_features)
        self.weight = nn.Parameter(torch.zeros(w_shape, dtype=FP8, device=device), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.zeros(s_shape, dtype=torch.float32, device=device),
                                             requires_grad=False)

    def prepared(self) -> Fp8LinearWeight:
        return Fp8LinearWeight(self.weight, self.weight_scale_inv, self.out_features, self.in_features)

    def checkpoint_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [N, K] e4m3, scale_inv [ceil(N/128), ceil(K/128)] fp32): the checkpoint's tensors, as views."""
        return self.prepared().unpadded()

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out]; ``x_fp8`` = act_quant(x, 128) when the caller has it (saves a launch at
        decode sizes; the result is the same)."""
        return fp8_linear_prepared(x, self.prepared(), self.out_dtype, x_fp8=x_fp8)

    def forward_quantized(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """The projection of an input that exists only as act_quant(x, 128): xq [m, in] e4m3, xs [m, in/128]
        fp32 -> [m, out] (``fp8_linear_quantized``: the same result as forward(x, (xq, xs)))."""
        return fp8_linear_quantized(xq, xs, self.prepared(), self.out_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 blocks {FP8_BLOCK}x{FP8_BLOCK}"


class Fp8LinearFactory:
    """The fp8 linear backend (``--quantization fp8``, or ``auto`` on an fp8 checkpoint): ``Fp8Linear`` layers."""

    name = "fp8"
    fp8 = True

    def __call__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None) -> Fp8Linear:
        return Fp8Linear(in_features, out_features, dtype, device)



def project(layer: nn.Module, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """layer(x), handing an fp8 layer the input's fp8 copy when there is one."""
    if x_fp8 is not None and isinstance(layer, Fp8Linear):
        return layer(x, x_fp8)
    return layer(x)


class FusedProjection:
    """Projections that read the same input, computed by one GEMM (one launch and one weight stream instead of
    one per projection: at decode sizes each launch costs several microseconds above its bytes).

    Their weights become row blocks of one [sum(out), in] weight held here; each member module keeps its
    checkpoint name and gets a view of its block as its parameter, so loading (in place into the views),
    ``named_parameters`` accounting and a member's own forward are unchanged. Build with
    ``fuse_projections``. ``__call__(x)`` -> [..., sum(out)]; ``split(y)`` -> the members' column views.
    """

    def __init__(self, fused: nn.Module, widths: list[int]):
        self._fused = [fused]        # in a list: not a registered submodule (its tensors are the members')
        self.widths = widths

    def __call__(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return project(self._fused[0], x, x_fp8)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(y, self.widths, dim=-1))


def fuse_projections(members: list[nn.Module]) -> FusedProjection | None:
    """Re-home the weights of ``members`` (same class, input size and dtype; made by one ``LinearFactory``,
    weights not loaded yet) into one fused weight -> its ``FusedProjection``, or None when they cannot share
    one: fp8 block scales cover 128 output rows, so every fp8 member but the last needs out_features % 128 == 0
    (put an odd-sized member such as MLA's 576-row kv_a last)."""
    first = members[0]
    if len(members) < 2 or any(type(m) is not type(first) for m in members):
        return None
    widths = [m.out_features for m in members]
    if isinstance(first, Fp8Linear):
        if any(m.in_features != first.in_features or m.out_dtype != first.out_dtype for m in members) or \
                any(w % FP8_BLOCK for w in widths[:-1]):
            return None
        fused = Fp8Linear(first.in_features, sum(widths), first.out_dtype, first.weight.device)
        row = 0
        for m, w in zip(members, widths):
            rows, blocks = m.weight.shape[0], m.weight_scale_inv.shape[0]
            m.weight = nn.Parameter(fused.weight[row:row + rows], requires_grad=False)
            m.weight_scale_inv = nn.Parameter(
                fused.weight_scale_inv[row // FP8_BLOCK:row // FP8_BLOCK + blocks], requires_grad=False)
            row += w
        return FusedProjection(fused, widths)
    if isinstance(first, nn.Linear) and first.bias is None:
        w0 = first.weight
        if any(m.bias is not None or m.in_features != first.in_features or m.weight.dtype != w0.dtype
               for m in members):
            return None
        fused = nn.Linear(first.in_features, sum(widths), bias=False, dtype=w0.dtype, device=w0.device)
        fused.weight.requires_grad_(False)
        row = 0
        for m, w in zip(members, widths):
            m.weight = nn.Parameter(fused.weight[row:row + w], requires_grad=False)
            row += w
        return FusedProjection(fused, widths)
    return None


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``; used for dense layers and shared experts (possibly one CP shard of it).
    gate and up run as one GEMM (``FusedProjection``) when their weights can share one."""

    def __init__(self, hidden: int, intermediate: int, linear: LinearFactory, dtype: torch.dtype, device=None):
        super().__init__()
        self.gate_proj = linear(hidden, intermediate, dtype, device)
        self.up_proj = linear(hidden, intermediate, dtype, device)
        self.down_proj = linear(intermediate, hidden, dtype, device)
        self.gate_up = fuse_projections([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.gate_up is None:
            gate, up = project(self.gate_proj, x, x_fp8), project(self.up_proj, x, x_fp8)
            return self.down_proj(F.silu(gate) * up)
        # silu * up in one pass over the fused GEMM's output, with down_proj's fp8 input when it is an fp8 layer
        quant = isinstance(self.down_proj, Fp8Linear)
        h, h_fp8 = kernels.silu_mul(self.gate_up(x, x_fp8), quant=quant)
        return project(self.down_proj, h, h_fp8)


# ---------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies [dim/2] for RoPE, YaRN-blended when the config asks for it."""
    r = cfg.rope
    pos_freqs = r.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if r.type != "yarn":
        return 1.0 / pos_freqs

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(r.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(r.theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (r.factor * pos_freqs)
    return inv_inter * (1 - extrapolation_weight) + inv_extra * extrapolation_weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the rope slice (qk_rope_head_dim) of MLA and of the indexer."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.dim = cfg.qk_rope_head_dim
        self.attention_factor = cfg.rope_attention_factor
        self.register_buffer("inv_freq", rope_inv_freq(cfg, self.dim).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [n] -> (cos, sin), each [n, dim/2], one angle per rotated pair."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]); output laid out as (rotated evens | rotated odds) like transformers.

    x [n, D] or [n, G, D]; cos/sin [n, D/2]. The permuted layout is harmless: q and k get the same one.
    ``out`` (may be x: in place) receives the result (``kernels.rope``: one Triton pass on CUDA).
    """
    return kernels.rope(x, cos, sin, True, out)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Non-interleaved ("rotate half") RoPE: pairs (x[i], x[i + D/2]). x [n, D] or [n, G, D]; cos/sin [n, D/2]."""
    return kernels.rope(x, cos, sin, False, out)
