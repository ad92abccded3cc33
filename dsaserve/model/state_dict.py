"""Hugging Face tensor names -> this shard's parameters, and the slice of each tensor a rank keeps.

``checkpoint_specs(model)`` lists exactly the checkpoint tensors a ``DSAModel`` (one ``StageShard``) needs:
its stage's layers only (so the loader never reads other stages' weights; the MTP layer of real
checkpoints is never listed), and for the routed and shared experts only the rank's part of the
intermediate dim (``StageShard.mlp_range``; the loader slices with the same ``part_range``).
"""

from __future__ import annotations

import torch

from dsaserve.checkpoint.spec import TensorSpec
from dsaserve.model.deepseek_v32 import DSAModel
from dsaserve.model.moe import MoE


def checkpoint_specs(model: DSAModel) -> list[TensorSpec]:
    """The HF tensors ``model`` needs and where each one goes (names follow the module tree)."""
    cfg, shard = model.cfg, model.shard
    specs: list[TensorSpec] = []

    def add(name: str, dest: torch.Tensor, **slicing):
        specs.append(TensorSpec(name, dest, **slicing))

    if model.is_first:
        add("model.embed_tokens.weight", model.embed_tokens.weight)
    if model.is_last:
        add("model.norm.weight", model.norm.weight)
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        add(head, model.lm_head.weight)
    # experts: gate/up keep rows, down keeps columns of this rank's part of the intermediate dim
    part = dict(shard_index=shard.mlp_part, shard_count=shard.mlp_parts)
    inter = cfg.moe_intermediate_size
    rows, cols = dict(shard_dim=0, full_size=inter, **part), dict(shard_dim=1, full_size=inter, **part)
    shared = inter * cfg.n_shared_experts
    shared_rows, shared_cols = dict(rows, full_size=shared), dict(cols, full_size=shared)
    for i, layer in model.layers.items():
        prefix = f"model.layers.{i}."
        for name, tensor in layer.named_parameters():
            if name.startswith("mlp.") and layer.is_moe:
                continue  # expert tensors are mapped below
            add(prefix + name, tensor)
        if not layer.is_moe:
            continue
        moe: MoE = layer.mlp
        add(prefix + "mlp.gate.weight", moe.gate.weight)
        add(prefix + "mlp.gate.e_score_correction_bias", moe.gate.e_score_correction_bias)
        experts = moe.experts                                                # stacked: [E, 2I, H] and [E, H, I]
        for e in range(moe.n_experts):
            ep = f"{prefix}mlp.experts.{e}."
            add(ep + "gate_proj.weight", experts.w_gate_up[e, : moe.inter], **rows)
            add(ep + "up_proj.weight", experts.w_gate_up[e, moe.inter:], **rows)
            add(ep + "down_proj.weight", experts.w_down[e], **cols)
        if moe.shared_experts is not None:
            sp = prefix + "mlp.shared_experts."
            add(sp + "gate_proj.weight", moe.shared_experts.gate_proj.weight, **shared_rows)
            add(sp + "up_proj.weight", moe.shared_experts.up_proj.weight, **shared_rows)
            add(sp + "down_proj.weight", moe.shared_experts.down_proj.weight, **shared_cols)
    return specs
