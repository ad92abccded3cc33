"""Hugging Face tensor names -> this shard's parameters.

``checkpoint_specs(model)`` lists exactly the checkpoint tensors a ``DSAModel`` (one ``StageShard``) needs:
its stage's layers only (so the loader never reads other stages' weights; the MTP layer of real
checkpoints is never listed), and of the routed experts only the ones the rank holds
(``StageShard.expert_range``), each whole. Block-fp8 parameters (``Fp8Linear`` layers, fp8 experts) are
listed once per weight with their scale as ``TensorSpec.scale_dest``: the loader copies an fp8
checkpoint's e4m3 values and ``weight_scale_inv`` as they are, and quantizes a bf16 checkpoint's weight
(``--quantization fp8``); both land in checkpoint-shaped views of the padded kernel layout.
"""

from __future__ import annotations

import torch

from dsaserve.checkpoint.spec import TensorSpec
from dsaserve.model.deepseek_v32 import DSAModel
from dsaserve.model.layers import Fp8Linear
from dsaserve.model.moe import MoE


def checkpoint_specs(model: DSAModel) -> list[TensorSpec]:
    """The HF tensors ``model`` needs and where each one goes (names follow the module tree)."""
    cfg = model.cfg
    specs: list[TensorSpec] = []

    def add(name: str, dest: torch.Tensor, scale_dest: torch.Tensor | None = None):
        specs.append(TensorSpec(name, dest, scale_dest=scale_dest))

    if model.is_first:
        add("model.embed_tokens.weight", model.embed_tokens.weight)
    if model.is_last:
        add("model.norm.weight", model.norm.weight)
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        add(head, model.lm_head.weight)
    for i, layer in model.layers.items():
        prefix = f"model.layers.{i}."
        fp8_modules = {name for name, m in layer.named_modules() if isinstance(m, Fp8Linear)}
        for name in sorted(fp8_modules):
            add(prefix + name + ".weight", *layer.get_submodule(name).checkpoint_views())
        for name, tensor in layer.named_parameters():
            owner = name.rpartition(".")[0]
            if owner in fp8_modules or name.startswith("mlp.experts."):
                continue  # listed above / below
            add(prefix + name, tensor)
        if not layer.is_moe:
            continue
        moe: MoE = layer.mlp
        add(prefix + "mlp.gate.e_score_correction_bias", moe.gate.e_score_correction_bias)
        for j, e in enumerate(moe.experts.local):                           # this rank's experts, whole
            for proj, (dest, scale) in moe.experts.expert_views(j).items():
                add(f"{prefix}mlp.experts.{e}.{proj}.weight", dest, scale)
    return specs
