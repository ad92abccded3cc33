"""Mixture of experts: sigmoid router with correction bias and group-limited top-k, routed + shared experts.

Under CP the experts (and the shared expert) are split along their intermediate dim over the stage's C
ranks: each rank computes a partial sum for *all* tokens of the stage and the partials are reduced
(reduce-scatter back to each rank's tokens in prefill, all-reduce in decode).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsaserve.config import ModelConfig
from dsaserve.model.layers import GatedMLP
from dsaserve.model.shard import StageShard


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


class MoE(nn.Module):
    """Routed experts (this rank's intermediate shard of each) + shared experts (same sharding)."""

    def __init__(self, cfg: ModelConfig, shard: StageShard, dtype: torch.dtype, device=None):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.inter = shard.mlp_size(cfg.moe_intermediate_size)                   # this rank's part
        h = cfg.hidden_size
        self.gate = Router(cfg, device)
        # Stacked expert weights: [E, 2*I_local, hidden] (gate rows then up rows) and [E, hidden, I_local].
        self.w_gate_up = nn.Parameter(torch.zeros(self.n_experts, 2 * self.inter, h, dtype=dtype, device=device),
                                      requires_grad=False)
        self.w_down = nn.Parameter(torch.zeros(self.n_experts, h, self.inter, dtype=dtype, device=device),
                                   requires_grad=False)
        self.shared_experts = None
        if cfg.n_shared_experts > 0:
            shared_inter = cfg.moe_intermediate_size * cfg.n_shared_experts
            self.shared_experts = GatedMLP(h, shard.mlp_size(shared_inter), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, hidden] (all tokens of the stage) -> this rank's partial output [n, hidden]."""
        ids, weights = self.gate(x)
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
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
