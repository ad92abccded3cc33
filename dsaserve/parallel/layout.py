"""The parallel layout: world = PP x CP; stage s owns ranks s*C .. s*C+C-1 and a contiguous layer range."""

from __future__ import annotations

from dataclasses import dataclass

from dsaserve.config import ConfigError, ModelConfig


def stage_layer_ranges(num_layers: int, pp_size: int, partition: str | list[int] | None = None) -> list[range]:
    """Layer range per stage. Default: even split, the remainder on the later stages.

    ``partition`` ("30,31" or [30, 31]) gives the number of layers per stage explicitly.
    """
    if pp_size < 1:
        raise ConfigError(f"pp_size must be >= 1, got {pp_size}")
    if pp_size > num_layers:
        raise ConfigError(f"pp_size={pp_size} is larger than the model's {num_layers} layers: "
                          "every pipeline stage needs at least one layer")
    if partition is None or partition == "":
        base, extra = divmod(num_layers, pp_size)
        counts = [base + (1 if s >= pp_size - extra else 0) for s in range(pp_size)]
    else:
        try:
            counts = [int(x) for x in partition.split(",")] if isinstance(partition, str) else [int(x) for x in partition]
        except ValueError:
            raise ConfigError(f"--pp-layer-partition {partition!r} must be comma-separated integers, e.g. '30,31'")
        if len(counts) != pp_size:
            raise ConfigError(f"--pp-layer-partition {partition!r} has {len(counts)} entries but pp_size is {pp_size}")
        if any(c < 1 for c in counts):
            raise ConfigError(f"--pp-layer-partition {partition!r}: every stage needs at least one layer")
        if sum(counts) != num_layers:
            raise ConfigError(f"--pp-layer-partition {partition!r} sums to {sum(counts)} layers; the model has {num_layers}")
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


@dataclass(frozen=True)
class Layout:
    """Where every rank sits. Rank r is stage r // C, CP index r % C."""

    pp_size: int
    cp_size: int
    stage_layers: tuple[range, ...]

    @property
    def world_size(self) -> int:
        return self.pp_size * self.cp_size

    def stage_of(self, rank: int) -> int:
        return rank // self.cp_size

    def cp_rank_of(self, rank: int) -> int:
        return rank % self.cp_size

    def stage_ranks(self, stage: int) -> list[int]:
        return list(range(stage * self.cp_size, (stage + 1) * self.cp_size))

    @classmethod
    def build(cls, cfg: ModelConfig, pp_size: int, cp_size: int, partition=None) -> "Layout":
        if cp_size < 1:
            raise ConfigError(f"cp_size must be >= 1, got {cp_size}")
        ranges = stage_layer_ranges(cfg.num_hidden_layers, pp_size, partition)
        for s, r in enumerate(ranges[1:], start=1):
            if not cfg.has_indexer(r.start):
                raise ConfigError(f"pipeline stage {s} would start at layer {r.start}, a 'shared' indexer layer that "
                                  "reuses the previous layer's top-k; move the boundary with --pp-layer-partition")
        if "sparse" in cfg.mlp_layer_types and cp_size > cfg.moe_intermediate_size:
            raise ConfigError(f"cp_size={cp_size} exceeds moe_intermediate_size={cfg.moe_intermediate_size}: "
                              "experts are split along it over the CP group")
        return cls(pp_size, cp_size, tuple(ranges))
