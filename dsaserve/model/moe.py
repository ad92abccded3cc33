"""Mixture of experts: sigmoid router with correction bias and group-limited top-k, routed + shared experts.

Expert parallelism: a rank holds whole routed experts, ``StageShard.expert_range`` (all of them on a stage
of one rank); the shared expert is replicated and always runs on the rank's own tokens. Every rank routes
its own tokens; which tokens reach its experts, and how their partial sums become outputs, is the
``tokens`` collaborator: ``StageTokens`` (one rank: its own tokens, nothing to combine); under context
parallelism ``model.parallelize`` swaps in one that all-gathers the stage's routed tokens first and
reduce-scatters (prefill) or all-reduces (decode) the routed partial sums after.

The routed experts are a backend (``ModelBackends.experts``), both on the same stacked weights
(``ExpertWeights``: the ``kernels.grouped_moe.LocalExperts`` layout, bf16 or fp8 128x128 blocks):
  * ``GroupedExperts`` ("grouped", the default on CUDA): ``kernels.grouped_moe``, one grouped GEMM launch
    per projection over all local experts, routing and permutation on the device, no host sync; its
    PyTorch reference on CPU;
  * ``LoopExperts`` ("loop", the default on CPU): one expert at a time over the tokens routed to it (a host
    sync per layer); the CPU oracle, with the engine's original bf16 arithmetic.
With fp8 experts the tokens are quantized once (``act_quant``, per token per 128 channels) BEFORE the
exchange: the quantization is per token, so quantize-then-gather equals gather-then-quantize bit for bit,
and the gather moves half the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsaserve.config import ConfigError, ModelConfig
from dsaserve.kernels import act_quant, moe_route
from dsaserve.kernels.f32_linear import bf16_parts_needed, linear_f32
from dsaserve.kernels.fp8_linear import BLOCK, FP8
from dsaserve.kernels.grouped_moe import (
    LocalExperts,
    default_moe_config,
    grouped_moe,
    grouped_moe_quantized,
    grouped_moe_quantized_reference,
    warm_routing_plans,
)
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.layers import GatedMLP, LinearFactory
from dsaserve.model.shard import StageShard
from dsaserve.profiling import phase


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Router(nn.Module):
    """``mlp.gate``: weight [E, hidden] fp32, e_score_correction_bias [E] fp32 (replicated on every rank)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        e = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.zeros(e, cfg.hidden_size, device=device), requires_grad=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(e, device=device))
        self.weight_parts = 3                # bf16 parts of the weight the prefill GEMM multiplies (weights_loaded)

    def weights_loaded(self) -> None:
        """Count the bf16 parts the weight needs (``f32_linear.bf16_parts_needed``: 1 for DeepSeek's bf16-stored
        router), so that prefill's fp32 GEMM skips the all-zero ones. A device sync: once, after loading."""
        self.weight_parts = bf16_parts_needed(self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, hidden] -> (expert ids [n, k] int64, weights [n, k] fp32)."""
        logits = linear_f32(x, self.weight, parts=self.weight_parts)           # [n, E] fp32
        return moe_route(logits, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                         self.norm_topk_prob, self.scaling)


@dataclass
class RoutedTokens:
    """Tokens on their way to the routed experts: activations in the experts' input format and the routing.

    x [n, hidden]: the model dtype, or e4m3 for fp8 experts with x_scale [n, ceil(hidden/128)] fp32 (None
    otherwise); ids [n, k] int64 global expert ids; weights [n, k] fp32.
    """

    x: torch.Tensor
    x_scale: torch.Tensor | None
    ids: torch.Tensor
    weights: torch.Tensor


class ExpertWeights(nn.Module):
    """The routed experts a rank holds, whole, stacked in ``kernels.grouped_moe.LocalExperts``' layout.

    ``local`` = the global ids held (a contiguous range, possibly empty); ``expert_map`` [E] int32 maps a
    global id to its local index or -1. Weights, I = moe_intermediate_size:
      * model dtype: w_gate_up [E_l, 2I, hidden] (gate rows, then up rows), w_down [E_l, hidden, I];
      * fp8 (I_pad = I rounded up to 128, zero padding): w13 [E_l, 2*I_pad, hidden] e4m3 (gate rows 0..I-1,
        up rows I_pad..I_pad+I-1) with s13 [E_l, 2*I_pad/128, ceil(hidden/128)] fp32 block scales, w2
        [E_l, hidden, I_pad] e4m3 with s2 [E_l, ceil(hidden/128), I_pad/128].
    ``expert_views(j)`` gives the checkpoint-shaped views of local expert j that the loader fills in place.
    """

    name = "?"

    def __init__(self, n_experts: int, local: range, hidden: int, inter: int, dtype: torch.dtype, fp8: bool,
                 device=None):
        super().__init__()
        if local.step != 1 or not 0 <= local.start <= local.stop <= n_experts:
            raise ValueError(f"local experts {local} must be a contiguous range within [0, {n_experts})")
        self.n_experts, self.local, self.hidden, self.inter = n_experts, local, hidden, inter
        self.dtype, self.fp8 = dtype, fp8
        e_l = len(local)
        if fp8:
            i_pad = _cdiv(inter, BLOCK) * BLOCK
            nb_h, nb_i = _cdiv(hidden, BLOCK), i_pad // BLOCK
            self.w13 = self._zeros((e_l, 2 * i_pad, hidden), FP8, device)
            self.s13 = self._zeros((e_l, 2 * nb_i, nb_h), torch.float32, device)
            self.w2 = self._zeros((e_l, hidden, i_pad), FP8, device)
            self.s2 = self._zeros((e_l, nb_h, nb_i), torch.float32, device)
        else:
            self.w_gate_up = self._zeros((e_l, 2 * inter, hidden), dtype, device)
            self.w_down = self._zeros((e_l, hidden, inter), dtype, device)
        expert_map = torch.full((n_experts,), -1, dtype=torch.int32)
        expert_map[local.start:local.stop] = torch.arange(e_l, dtype=torch.int32)
        self.register_buffer("expert_map", expert_map.to(device), persistent=False)

    @staticmethod
    def _zeros(shape, dtype, device) -> nn.Parameter:
        return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)

    def local_experts(self) -> LocalExperts:
        """The kernels' view of these weights (no copy)."""
        common = dict(n_experts=self.n_experts, expert_ids=tuple(self.local), expert_map=self.expert_map,
                      hidden=self.hidden, inter=self.inter)
        if self.fp8:
            return LocalExperts(**common, w13=self.w13, s13=self.s13, w2=self.w2, s2=self.s2)
        return LocalExperts(**common, w_gate_up=self.w_gate_up, w_down=self.w_down)

    def expert_views(self, j: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Local expert j's {gate_proj, up_proj, down_proj}: (weight view [out, in], fp8 scale view or None)."""
        i = self.inter
        if not self.fp8:
            return {"gate_proj": (self.w_gate_up[j, :i], None), "up_proj": (self.w_gate_up[j, i:], None),
                    "down_proj": (self.w_down[j], None)}
        i_pad, nb_i = self.w2.shape[2], self.s2.shape[2]
        return {"gate_proj": (self.w13[j, :i], self.s13[j, :nb_i]),
                "up_proj": (self.w13[j, i_pad:i_pad + i], self.s13[j, nb_i:]),
                "down_proj": (self.w2[j, :, :i], self.s2[j])}

    def prepare_input(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [n, hidden] model dtype -> the experts' input: (x, None), or (e4m3 x, scales) for fp8 experts
        (``x_fp8`` when the caller already has act_quant(x, 128))."""
        if not self.fp8:
            return x, None
        return x_fp8 if x_fp8 is not None else act_quant(x, BLOCK)

    def extra_repr(self) -> str:
        fmt = "fp8 128x128 blocks" if self.fp8 else str(self.dtype)
        return f"experts {self.local.start}..{self.local.stop - 1} of {self.n_experts}, inter={self.inter}, {fmt}"


class GroupedExperts(ExpertWeights):
    """Grouped-GEMM experts (``kernels.grouped_moe``): on CUDA one launch per projection over all local
    experts with device-side routing (no host sync); on CPU the kernels' PyTorch reference. ``gemm_kernel``
    ("auto" | "triton") picks the fp8 GEMM kernel at prefill sizes and ``schedule`` ("auto" or one of
    ``MOE_SCHEDULES``) how the Hopper kernel's programs take work items, ``group_m`` (0: the default) its
    raster, ``mma_order`` ("auto" | "ordered" | "free") whether its two consumer warpgroups issue their MMAs in turn
    (``grouped_moe.default_moe_config``)."""

    name = "grouped"

    def __init__(self, n_experts: int, local: range, hidden: int, inter: int, dtype: torch.dtype, fp8: bool,
                 device=None, gemm_kernel: str = "auto", schedule: str = "auto", group_m: int = 0,
                 mma_order: str = "auto"):
        super().__init__(n_experts, local, hidden, inter, dtype, fp8, device)
        self.gemm_kernel = gemm_kernel
        self.schedule = schedule
        self.group_m = group_m
        self.mma_order = mma_order
        if torch.device(device or "cpu").type == "cuda" and not fp8:
            if dtype != torch.bfloat16:
                raise ConfigError(f"moe_backend 'grouped' with {dtype} weights: torch's grouped_mm takes bf16 only "
                                  "on CUDA; use --dtype bfloat16, --quantization fp8 or --moe-backend loop")
            if hidden % 8 or inter % 8:
                raise ConfigError(f"moe_backend 'grouped' with bf16 weights needs hidden ({hidden}) and "
                                  f"moe_intermediate_size ({inter}) divisible by 8; use --moe-backend loop")

    def warm_up(self, top_k: int) -> int:
        """Compile (CUDA) the routing-plan variants any step size needs (``warm_routing_plans``)."""
        return warm_routing_plans(self.local_experts(), top_k)

    def forward(self, x: torch.Tensor, x_scale: torch.Tensor | None, ids: torch.Tensor,
                weights: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """Routed tokens (``RoutedTokens`` fields) -> [N, hidden] model dtype: each token's weighted sum over
        its experts that live on this rank, + ``add`` [N, hidden] when given (in the combine kernel on CUDA;
        the same bits as adding it after)."""
        backend = "grouped" if x.is_cuda else "reference"
        if self.fp8:
            config = default_moe_config(ids.shape[0], ids.shape[1], self.n_experts, self.gemm_kernel,
                                        self.schedule, self.group_m, self.mma_order)
            return grouped_moe_quantized(x, x_scale, ids, weights, self.local_experts(), self.dtype, backend,
                                         config, add=add)
        return grouped_moe(x, ids, weights, self.local_experts(), backend, add=add)


@dataclass(frozen=True)
class GroupedExpertsWith:
    """The "grouped" experts backend with its fp8 GEMM kernel or its Hopper schedule pinned (``--moe-gemm triton``,
    ``--moe-schedule queue``, ``--moe-mma-order ordered``: the ablations)."""

    gemm_kernel: str
    schedule: str = "auto"
    group_m: int = 0
    mma_order: str = "auto"
    name = "grouped"

    def __call__(self, n_experts: int, local: range, hidden: int, inter: int, dtype: torch.dtype, fp8: bool,
                 device=None) -> GroupedExperts:
        return GroupedExperts(n_experts, local, hidden, inter, dtype, fp8, device, gemm_kernel=self.gemm_kernel,
                              schedule=self.schedule, group_m=self.group_m, mma_order=self.mma_order)


class LoopExperts(ExpertWeights):
    """One local expert at a time over the tokens routed to it (bincount + a host sync per layer): the CPU
    oracle. bf16 / fp32 weights: the engine's original arithmetic (a model-dtype ``index_add_`` per expert,
    experts in id order); fp8 weights: the grouped kernels' per-expert reference."""

    name = "loop"

    def forward(self, x: torch.Tensor, x_scale: torch.Tensor | None, ids: torch.Tensor,
                weights: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as ``GroupedExperts.forward``."""
        out = self._routed(x, x_scale, ids, weights)
        return out if add is None else out + add

    def _routed(self, x: torch.Tensor, x_scale: torch.Tensor | None, ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            return grouped_moe_quantized_reference(x, x_scale, ids, weights, self.local_experts(), self.dtype)
        e_l = len(self.local)
        out = torch.zeros_like(x)
        local = self.expert_map[ids]                                             # [N, k] local index, -1 elsewhere
        key = torch.where(local >= 0, local, e_l).flatten().long()               # other ranks' experts sort last
        order = key.argsort(stable=True)
        counts = torch.bincount(key, minlength=e_l + 1).tolist()[:e_l]
        token_of = order // ids.shape[1]                                         # token row of each routed slot
        flat_weights = weights.flatten()
        start = 0
        for j, cnt in enumerate(counts):
            if cnt == 0:
                continue
            rows = token_of[start:start + cnt]
            slot = order[start:start + cnt]
            start += cnt
            gate, up = F.linear(x[rows], self.w_gate_up[j]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w_down[j])                      # [cnt, hidden]
            out.index_add_(0, rows, y * flat_weights[slot, None].to(y.dtype))
        return out


class ExpertsFactory(Protocol):
    """The MoE backend (``ModelBackends.experts``): ``factory(n_experts, local, hidden, inter, dtype, fp8,
    device)`` -> an ``ExpertWeights`` with ``forward(x, x_scale, ids, weights, add=None) -> [N, hidden]``."""

    name: str

    def __call__(self, n_experts: int, local: range, hidden: int, inter: int, dtype: torch.dtype, fp8: bool,
                 device=None) -> ExpertWeights:
        ...


class StageTokens:
    """Which tokens this rank's experts see, and how their partial sums become outputs: on a stage of one
    rank, its own tokens and nothing to combine. ``model.parallelize`` swaps in the CP exchange.
    ``local``: dispatch and combine are the identity (the experts' output rows are this rank's tokens)."""

    local = True

    def dispatch(self, tokens: RoutedTokens, batch: ForwardBatch) -> RoutedTokens:
        """This rank's routed tokens -> the routed tokens its experts compute on."""
        return tokens

    def combine(self, partial: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Partial routed sums [N, hidden] of the dispatched tokens -> [n, hidden] for this rank's tokens."""
        return partial


class MoE(nn.Module):
    """Router + routed experts (the rank's whole experts) + shared expert (replicated)."""

    def __init__(self, cfg: ModelConfig, shard: StageShard, experts: ExpertsFactory, linear: LinearFactory,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        h = cfg.hidden_size
        self.gate = Router(cfg, device)
        self.experts = experts(self.n_experts, shard.expert_range(self.n_experts), h, cfg.moe_intermediate_size,
                               dtype, linear.fp8, device)
        self.shared_experts = None
        if cfg.n_shared_experts > 0:
            self.shared_experts = GatedMLP(h, cfg.moe_intermediate_size * cfg.n_shared_experts, linear, dtype, device)
        self.tokens = StageTokens()

    def forward(self, x: torch.Tensor, batch: ForwardBatch,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [n, hidden] this rank's tokens -> [n, hidden]: routed experts (summed over the stage's ranks)
        plus the shared expert. ``x_fp8``: act_quant(x, 128), when the caller made it."""
        with phase("moe"):
            ids, weights = self.gate(x)                                          # [n, k] each
            x_in, x_scale = self.experts.prepare_input(x, x_fp8)
            # on one rank the shared expert's output is added by the routed experts' combine (one pass over
            # [n, hidden] less); under CP the routed sums are reduced over the stage first
            fuse_shared = self.shared_experts is not None and self.tokens.local
            shared = self.shared_experts(x, x_fp8) if fuse_shared else None     # [n, hidden]
        routed = self.tokens.dispatch(RoutedTokens(x_in, x_scale, ids, weights), batch)   # [N, ...]
        with phase("moe"):
            partial = self.experts(routed.x, routed.x_scale, routed.ids, routed.weights, add=shared)  # [N, hidden]
        out = self.tokens.combine(partial, batch)                                # [n, hidden]
        if self.shared_experts is not None and not fuse_shared:
            with phase("moe"):
                out = out + self.shared_experts(x, x_fp8)
        return out
