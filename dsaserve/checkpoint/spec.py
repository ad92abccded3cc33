"""The contract between models and the checkpoint loader.

A model (or one pipeline stage of it) lists the checkpoint tensors it needs as ``TensorSpec``s: the HF
tensor name, the destination tensor to fill, and optionally which equal part along one dimension this
rank keeps. The loader reads exactly those tensors, so a stage (or a rank holding some of the experts)
never touches the rest of the checkpoint. A block-fp8 destination (``scale_dest`` set) receives an e4m3
weight and its 128x128 block scales, whatever the checkpoint stores (see ``checkpoint.loader``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def part_range(size: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of part ``index`` when ``size`` is cut into ``count`` near-equal parts (sizes differ by at
    most one; the later parts are the larger ones). The one definition of a shard's extent: the model sizes
    its sharded parameters with it and the loader slices checkpoint tensors with it."""
    return index * size // count, (index + 1) * size // count


@dataclass
class TensorSpec:
    name: str                       # HF name, e.g. "model.layers.3.mlp.experts.7.gate_proj.weight"
    dest: torch.Tensor              # parameter (or a view of one) that receives the values
    shard_dim: int | None = None    # slice the checkpoint tensor along this dim ...
    shard_index: int = 0            # ... keeping part `shard_index` of `shard_count` near-equal parts
    shard_count: int = 1
    full_size: int | None = None    # size of the unsharded dim (default: dest size x shard_count)
    scale_dest: torch.Tensor | None = None  # block-fp8 dest: fp32 [ceil(out/128), ceil(in/128)] for the scales

    def part_range(self, size: int) -> tuple[int, int]:
        """[start, stop) of this part along the shard dim (see ``part_range``)."""
        return part_range(size, self.shard_index, self.shard_count)

    def expected_full_shape(self) -> tuple[int, ...]:
        shape = list(self.dest.shape)
        if self.shard_dim is not None:
            shape[self.shard_dim] = self.full_size if self.full_size is not None else shape[self.shard_dim] * self.shard_count
        return tuple(shape)
