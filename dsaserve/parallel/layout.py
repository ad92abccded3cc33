"""The parallel layout: world = PP x CP; stage s owns ranks s*C .. s*C+C-1 and a contiguous layer range.

``Layout`` is the one owner of pp_size / cp_size: it validates them once (``Layout.build``) and answers
every question about who is where (``rank_view(rank)``: stage, CP index, peers, the model shard).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dsaserve.config import ConfigError, ModelConfig
from dsaserve.model.shard import StageShard


def stage_layer_ranges(num_layers: int, pp_size: int, partition: str | list[int] | None = None,
                       can_start: Callable[[int], bool] | None = None) -> list[range]:
    """Layer range per stage. Default: even split, the remainder on the later stages; with ``can_start``
    (a layer a stage may begin with), the most even split whose every stage begins on such a layer.

    ``partition`` ("30,31" or [30, 31]) gives the number of layers per stage explicitly (checked by the caller).
    """
    if pp_size > num_layers:
        raise ConfigError(f"pp_size={pp_size} is larger than the model's {num_layers} layers: "
                          "every pipeline stage needs at least one layer")
    if partition is None or partition == "":
        base, extra = divmod(num_layers, pp_size)
        counts = [base + (1 if s >= pp_size - extra else 0) for s in range(pp_size)]
        if can_start is not None and not all(can_start(sum(counts[:s])) for s in range(1, pp_size)):
            counts = _even_counts_on_valid_starts(num_layers, pp_size, counts, can_start)
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


def _even_counts_on_valid_starts(num_layers: int, pp_size: int, even: list[int],
                                 can_start: Callable[[int], bool]) -> list[int]:
    """Stage sizes whose boundaries are all layers in ``can_start``: the smallest largest stage first,
    then the boundaries closest to the even split's, then the earlier ones (remainder on later stages)."""
    starts = [i for i in range(1, num_layers) if can_start(i)]
    if len(starts) < pp_size - 1:
        raise ConfigError(f"pp_size={pp_size} needs {pp_size - 1} stage boundaries, but only layers {starts} can "
                          f"start a stage (the others reuse the previous layer's top-k: 'shared' indexer layers); "
                          f"use pp_size <= {len(starts) + 1}")
    ideal = [sum(even[:s]) for s in range(1, pp_size)]
    # best[b] after placing boundary s at b: (largest stage so far, total distance to the ideal, boundaries)
    best = {b: (b, abs(b - ideal[0]), (b,)) for b in starts}
    for s in range(1, pp_size - 1):
        nxt = {}
        for b in starts:
            options = [(max(m, b - a), d + abs(b - ideal[s]), bs + (b,)) for a, (m, d, bs) in best.items() if a < b]
            if options:
                nxt[b] = min(options)
        best = nxt
    m, _, bounds = min((max(m, num_layers - b), d, bs) for b, (m, d, bs) in best.items())
    edges = [0, *bounds, num_layers]
    return [edges[i + 1] - edges[i] for i in range(pp_size)]


def _check_size(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Layout:
    """Where every rank sits: the one owner of the pipeline and context-parallel sizes.

    world = pp_size x cp_size ranks; rank r is stage r // cp_size, CP index r % cp_size. Stage s owns
    ranks s*C .. s*C+C-1 and the contiguous layer range ``stage_layers[s]``. Built (and validated) once
    by ``Layout.build``; everything else asks it, through ``rank_view(rank)`` for one rank's questions.
    """

    pp_size: int
    cp_size: int
    stage_layers: tuple[range, ...]

    @classmethod
    def build(cls, cfg: ModelConfig, pp_size: int, cp_size: int, partition=None) -> "Layout":
        """Validate the sizes against the model and split its layers over the stages."""
        _check_size("pp_size", pp_size)
        _check_size("cp_size", cp_size)
        # the default split moves its boundaries off 'shared' indexer layers by itself; an explicit one is checked
        ranges = stage_layer_ranges(cfg.num_hidden_layers, pp_size, partition, can_start=cfg.has_indexer)
        for s, r in enumerate(ranges[1:], start=1):
            if not cfg.has_indexer(r.start):
                raise ConfigError(f"pipeline stage {s} would start at layer {r.start}, a 'shared' indexer layer that "
                                  "reuses the previous layer's top-k; move the boundary with --pp-layer-partition")
        return cls(pp_size, cp_size, tuple(ranges))

    @property
    def world_size(self) -> int:
        return self.pp_size * self.cp_size

    @property
    def num_layers(self) -> int:
        return self.stage_layers[-1].stop

    def check_world_size(self, world_size: int, launcher: str = "torchrun") -> None:
        """An externally started world (torchrun) must have exactly pp_size x cp_size processes."""
        if world_size != self.world_size:
            raise ConfigError(f"{launcher} started {world_size} processes but pp_size x cp_size = {self.pp_size} x "
                              f"{self.cp_size} = {self.world_size}; make them equal")

    # ---- who is where ------------------------------------------------------------------------------
    def stage_of(self, rank: int) -> int:
        return rank // self.cp_size

    def cp_rank_of(self, rank: int) -> int:
        return rank % self.cp_size

    def stage_ranks(self, stage: int) -> list[int]:
        """The CP group of ``stage``: its ranks in CP-index order."""
        return list(range(stage * self.cp_size, (stage + 1) * self.cp_size))

    def last_stage_ranks(self) -> list[int]:
        return self.stage_ranks(self.pp_size - 1)

    def stage_of_layer(self, layer: int) -> int:
        for s, r in enumerate(self.stage_layers):
            if layer in r:
                return s
        raise ValueError(f"layer {layer} is outside the model's {self.num_layers} layers")

    def rank_view(self, rank: int) -> "RankView":
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")
        return RankView(self, rank)


@dataclass(frozen=True)
class RankView:
    """One rank's questions about the layout: its stage, CP index, peers and shard of the model."""

    layout: Layout
    rank: int

    @property
    def stage(self) -> int:
        return self.layout.stage_of(self.rank)

    @property
    def cp_rank(self) -> int:
        return self.layout.cp_rank_of(self.rank)

    @property
    def cp_size(self) -> int:
        return self.layout.cp_size

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.layout.pp_size - 1

    @property
    def cp_peers(self) -> list[int]:
        """Every rank of this rank's stage (itself included), in CP-index order."""
        return self.layout.stage_ranks(self.stage)

    @property
    def prev_rank(self) -> int | None:
        """The peer in the previous stage with the same CP index (it sends this rank its shard), if any."""
        return None if self.is_first_stage else self.rank - self.layout.cp_size

    @property
    def next_rank(self) -> int | None:
        """The peer in the next stage with the same CP index (this rank sends it its shard), if any."""
        return None if self.is_last_stage else self.rank + self.layout.cp_size

    @property
    def layers(self) -> range:
        return self.layout.stage_layers[self.stage]

    def shard(self) -> StageShard:
        """What the model and the runner of this rank hold (whole routed experts split over the CP group)."""
        layers = self.layers
        return StageShard(self.layout.num_layers, layers.start, layers.stop, cp_index=self.cp_rank,
                          cp_size=self.cp_size, expert_part=self.cp_rank, expert_parts=self.cp_size)
