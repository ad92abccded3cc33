"""What one rank holds of the model: ``StageShard``, the descriptor the model and the runner receive.

``dsaserve.parallel.layout.Layout`` (the one owner of the pipeline / context-parallel sizes) makes one per
rank; the model never sees process groups, ranks or world sizes, only this.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsaserve.checkpoint.spec import part_range
from dsaserve.config import ModelConfig


@dataclass(frozen=True)
class StageShard:
    """One rank's part of the model and of each step's tokens.

    Layers [layer_start, layer_end) of a model of ``num_layers`` (the rank's pipeline stage; the first stage
    also holds the embedding, the last the final norm and lm_head). Within its stage the rank is CP index
    ``cp_index`` of ``cp_size``: it holds that shard of every prefill chunk's tokens (runtime.cp) and part
    ``expert_part`` of ``expert_parts`` of the routed experts, whole experts (expert parallelism,
    ``expert_range``); the shared expert and everything else of its layers are replicated.
    """

    num_layers: int
    layer_start: int
    layer_end: int
    cp_index: int = 0
    cp_size: int = 1
    expert_part: int = 0
    expert_parts: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.layer_start < self.layer_end <= self.num_layers:
            raise ValueError(f"bad layer range [{self.layer_start}, {self.layer_end}) for {self.num_layers} layers")
        if not 0 <= self.cp_index < self.cp_size or not 0 <= self.expert_part < self.expert_parts:
            raise ValueError(f"bad shard index: cp {self.cp_index} of {self.cp_size}, experts {self.expert_part} of "
                             f"{self.expert_parts}")

    @classmethod
    def whole(cls, cfg: ModelConfig) -> "StageShard":
        """The whole model on one rank."""
        return cls(cfg.num_hidden_layers, 0, cfg.num_hidden_layers)

    @property
    def layers(self) -> range:
        return range(self.layer_start, self.layer_end)

    @property
    def is_first(self) -> bool:
        """Holds the embedding and takes token ids as input."""
        return self.layer_start == 0

    @property
    def is_last(self) -> bool:
        """Holds the final norm and lm_head and samples."""
        return self.layer_end == self.num_layers

    def expert_range(self, n_experts: int) -> range:
        """The routed experts this rank holds whole: [p*E//P, (p+1)*E//P) for part p of P (uneven splits such
        as 8 experts over 3 ranks give 2, 3, 3; a rank may hold none when P > E)."""
        return range(*part_range(n_experts, self.expert_part, self.expert_parts))
