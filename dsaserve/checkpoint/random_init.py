"""Seeded random weights for benchmarks: no multi-GB files to move, same weights for every layout.

Each tensor is drawn whole from a generator seeded by (seed, tensor name) on the target device, then
this rank's shard is cut out, so a 1-GPU run and a PP x CP run use exactly the same model. A block-fp8
destination (``TensorSpec.scale_dest``) gets the same draw quantized on the device (128x128 blocks), so
the fp8 and bf16 bench models of one seed differ only by the weights' fp8 rounding and no host memory is
involved.
"""

from __future__ import annotations

import zlib

import torch

from dsaserve.checkpoint.spec import TensorSpec
from dsaserve.kernels.fp8_linear import quantize_weight_fp8


def _init_full(name: str, shape: tuple[int, ...], gen: torch.Generator, device) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape, device=device)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return torch.zeros(shape, device=device)
    std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5   # keeps activations O(1) layer after layer
    return torch.randn(shape, generator=gen, device=device) * std


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
