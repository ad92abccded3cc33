"""Seeded random weights for benchmarks: no multi-GB files to move, same weights for every layout.

Each tensor is drawn whole from a generator seeded by (seed, tensor name) on the target device, then
this rank's shard is cut out, so a 1-GPU run and a PP x CP run use exactly the same model. A block-fp8
destination (``TensorSpec.scale_dest``) gets the same draw quantized on the device (128x128 blocks), so
the fp8 and bf16 bench models of one seed differ only by the weights' fp8 rounding and no host memory is
involved. The router and the indexer's head weights, fp32 in the model, are drawn as bf16 values
(``CHECKPOINT_BF16``): DeepSeek's checkpoints store them in bf16, which makes their prefill GEMM cheaper
(``DSAModel.weights_loaded``), so a bench model pays what the real one does.
"""

from __future__ import annotations

import zlib

import torch

from dsaserve.checkpoint.spec import TensorSpec
from dsaserve.kernels.fp8_linear import quantize_weight_fp8


# fp32 model tensors that DeepSeek-V3.2's checkpoint stores in bf16 (its reference code: the gate's weight takes
# the default bf16 dtype; "weights_proj in the checkpoint is stored in bf16")
CHECKPOINT_BF16 = (".mlp.gate.weight", ".indexer.weights_proj.weight")


def _init_full(name: str, shape: tuple[int, ...], gen: torch.Generator, device) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape, device=device)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return torch.zeros(shape, device=device)
    std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5   # keeps activations O(1) layer after layer
    full = torch.randn(shape, generator=gen, device=device) * std
    return full.to(torch.bfloat16).float() if name.endswith(CHECKPOINT_BF16) else full


@torch.no_grad()
def init_random_weights(specs: list[TensorSpec], seed: int) -> None:
    for spec in specs:
        device = spec.dest.device
        gen = torch.Generator(device=device)
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % (1 << 62))
        full = _init_full(spec.name, spec.expected_full_shape(), gen, device)
        if spec.scale_dest is not None:
            q, scale = quantize_weight_fp8(full)
            spec.dest.copy_(q)
            spec.scale_dest.copy_(scale)
            continue
        if spec.shard_dim is not None:
            start, stop = spec.part_range(full.shape[spec.shard_dim])
            full = full.narrow(spec.shard_dim, start, stop - start)
        spec.dest.copy_(full.to(spec.dest.dtype))
