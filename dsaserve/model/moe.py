"""Mixture of experts: sigmoid router with correction bias and group-limited top-k, routed + shared experts.

A rank holds its ``StageShard`` part of every expert's (and the shared expert's) intermediate dim, so it
computes a partial sum for every token its experts see. Which tokens those are, and how partial sums are
combined, is the ``tokens`` collaborator: ``StageTokens`` (one rank: its own tokens, nothing to combine);
under context parallelism ``model.parallelize`` swaps in one that all-gathers the stage's tokens first and
reduce-scatters (prefill) or all-reduces (decode) the partials after.

The routed experts are a backend (``ModelBackends.experts``): ``LoopExperts`` runs one expert at a time
over the tokens routed to it; a grouped-GEMM implementation plugs in with the same interface.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsaserve.config import ModelConfig
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.layers import GatedMLP, LinearFactory
from dsaserve.model.shard import StageShard
from dsaserve.profiling import phase


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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, hidden] -> (expert ids [n, k] int64, weights [n, k] fp32)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()             # [n, E]
        biased = scores + self.e_score_correction_bias
        n, e = biased.shape
        if self.n_group > 1:
            groups = biased.view(n, self.n_group, e // self.n_group)
            group_scores = groups.topk(2, dim=-1).values.sum(-1)                # [n, G]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            biased = biased.masked_fill(~keep.repeat_interleave(e // self.n_group, dim=1), float("-inf"))
        ids = biased.topk(self.top_k, dim=-1).indices                            # [n, k]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class LoopExperts(nn.Module):
    """Routed experts as stacked weights, run one expert at a time over the tokens routed to it.

    w_gate_up [E, 2*I, hidden] (gate rows then up rows) and w_down [E, hidden, I], I = this rank's part of
    the intermediate dim. ``model.state_dict`` maps ``mlp.experts.{e}.{gate,up,down}_proj.weight`` here.
    """

    name = "loop"

    def __init__(self, n_experts: int, hidden: int, inter: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.n_experts, self.inter = n_experts, inter
        self.w_gate_up = nn.Parameter(torch.zeros(n_experts, 2 * inter, hidden, dtype=dtype, device=device),
                                      requires_grad=False)
        self.w_down = nn.Parameter(torch.zeros(n_experts, hidden, inter, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [n, hidden], ids [n, k] expert of each routed slot, weights [n, k] fp32 -> [n, hidden], the
        weighted sum of each token's experts (this rank's part of each)."""
        out = torch.zeros_like(x)
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.n_experts).tolist()
        token_of = order // ids.shape[1]                                         # token row of each routed slot
        start = 0
        for e, cnt in enumerate(counts):
            if cnt == 0:
                continue
            rows = token_of[start:start + cnt]
            slot = order[start:start + cnt]
            start += cnt
            gate, up = F.linear(x[rows], self.w_gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w_down[e])                      # [cnt, hidden]
            out.index_add_(0, rows, y * weights.flatten()[slot, None].to(y.dtype))
        return out


class ExpertsFactory(Protocol):
    """The MoE backend (``ModelBackends.experts``): ``factory(n_experts, hidden, inter, dtype, device)`` -> a
    module with ``forward(x, ids, weights) -> [n, hidden]`` and LoopExperts' stacked weight layout."""

    name: str

    def __call__(self, n_experts: int, hidden: int, inter: int, dtype: torch.dtype, device=None) -> nn.Module:
        ...


class StageTokens:
    """Which tokens this rank's experts see, and how their partial sums become outputs: on a stage of one
    rank, its own tokens and nothing to combine. ``model.parallelize`` swaps in the CP exchange."""

    def gather(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x [n, hidden] this rank's tokens -> the tokens its expert parts compute on."""
        return x

    def combine(self, partial: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Partial expert sums for the gathered tokens -> [n, hidden] outputs of this rank's tokens."""
        return partial


class MoE(nn.Module):
    """Router + routed experts (this rank's intermediate part of each) + shared experts (same split)."""

    def __init__(self, cfg: ModelConfig, shard: StageShard, experts: ExpertsFactory, linear: LinearFactory,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.inter = shard.mlp_size(cfg.moe_intermediate_size)                   # this rank's part
        h = cfg.hidden_size
        self.gate = Router(cfg, device)
        self.experts = experts(self.n_experts, h, self.inter, dtype, device)
        self.shared_experts = None
        if cfg.n_shared_experts > 0:
            shared_inter = cfg.moe_intermediate_size * cfg.n_shared_experts
            self.shared_experts = GatedMLP(h, shard.mlp_size(shared_inter), linear, dtype, device)
        self.tokens = StageTokens()

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x [n, hidden] this rank's tokens -> [n, hidden] (summed over the stage's expert parts)."""
        seen = self.tokens.gather(x, batch)                                      # [N, hidden]
        with phase("moe"):
            partial = self.partial(seen)
        return self.tokens.combine(partial, batch)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] -> this rank's partial output [N, hidden]: its part of every routed + shared expert."""
        ids, weights = self.gate(x)
        out = self.experts(x, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
