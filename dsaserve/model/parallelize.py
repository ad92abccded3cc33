"""What the model needs from the context-parallel group of its stage, and the single-rank version.

The model never talks to torch.distributed directly: it calls these methods, so the same layer code runs
on one process (``LocalStageComm``: identities) and on a CP group (``dsaserve.parallel.state``).
"""

from __future__ import annotations

import torch


class StageComm:
    """Collectives over the C ranks of one pipeline stage (tokens are sharded, weights replicated)."""

    size: int = 1           # ranks in the stage (C)

    def all_gather_tokens(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """x [n, ...] on every rank (same n) -> [C*n, ...], rank-major."""
        raise NotImplementedError

    def reduce_scatter_tokens(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """x [C*n, ...] partial sums on every rank -> [n, ...]: this rank's rows, summed over ranks."""
        raise NotImplementedError

    def all_reduce(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Sum of x over the stage's ranks."""
        raise NotImplementedError


class LocalStageComm(StageComm):
    """A stage of one rank: every collective is the identity."""

    def all_gather_tokens(self, x, kind):
        return x

    def reduce_scatter_tokens(self, x, kind):
        return x

    def all_reduce(self, x, kind):
        return x
