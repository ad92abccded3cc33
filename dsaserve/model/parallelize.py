"""Context parallelism applied to a plain ``DSAModel`` from outside (gpt-fast / torchtitan style).

The modules never talk to a process group. ``parallelize_stage(model, comm)`` gives a stage whose C ranks
each hold a shard of the tokens (``runtime.cp``) the two collaborators that need the whole stage:
  * every ``MLAttention.cache_writer`` becomes a ``GatheringCacheWriter``: a CP prefill all-gathers the
    latent KV and indexer keys of the stage's tokens and every rank writes all of them into its cache, so
    each rank attends over the full prefix;
  * every ``MoE.tokens`` becomes a ``StageMoETokens``: the experts (split along their intermediate dim,
    ``StageShard.mlp_range``) see every token of the stage (all-gather) and the partial sums go back to the
    token owners (reduce-scatter); decode tokens are replicated on the stage, so partials are all-reduced.
The weights were already sliced when the shard was built and loaded; nothing else changes.
``StageComm`` is all this needs from the group (``dsaserve.parallel.stage_comm.GroupStageComm``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from dsaserve.cache.kv_cache import LayerCache, write_rows
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.deepseek_v32 import DSAModel
from dsaserve.model.mla import CacheWriter
from dsaserve.model.moe import StageTokens
from dsaserve.profiling import phase


class StageComm(Protocol):
    """Collectives over the C ranks of one pipeline stage. ``kind`` labels the bytes in the comm counters."""

    size: int    # C

    def all_gather_tokens(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """x [n, ...] on every rank (same n) -> [C*n, ...], rank-major."""
        ...

    def reduce_scatter_tokens(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """x [C*n, ...] partial sums on every rank -> [n, ...]: this rank's rows, summed over ranks."""
        ...

    def all_reduce(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Sum of x over the stage's ranks."""
        ...


class GatheringCacheWriter(CacheWriter):
    """Under CP prefill every rank writes every rank's keys (at ``batch.gathered_write_slots``, rank-major)."""

    def __init__(self, comm: StageComm):
        self.comm = comm

    def write(self, batch: ForwardBatch, cache: LayerCache, latent: torch.Tensor, index_k: torch.Tensor | None,
              index_scale: torch.Tensor | None) -> None:
        slots = batch.gathered_write_slots                                       # [C*n] or None
        if slots is None:                                                        # decode: tokens are replicated
            super().write(batch, cache, latent, index_k, index_scale)
            return
        if index_k is not None:
            write_rows(cache.index_k, slots, self.comm.all_gather_tokens(index_k, "cp_index_gather"))
            if index_scale is not None:
                write_rows(cache.index_scale, slots, self.comm.all_gather_tokens(index_scale, "cp_index_gather"))
        write_rows(cache.latent, slots, self.comm.all_gather_tokens(latent, "cp_kv_gather"))


class StageMoETokens(StageTokens):
    """The experts of a CP stage see every token of the stage; partial sums are reduced over the stage."""

    def __init__(self, comm: StageComm):
        self.comm = comm

    def gather(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if batch.is_decode:                                                      # already on every rank
            return x
        with phase("moe_comm"):
            return self.comm.all_gather_tokens(x, "moe_gather")                  # [C*n, hidden]

    def combine(self, partial: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        with phase("moe_comm"):
            if batch.is_decode:
                return self.comm.all_reduce(partial, "moe_allreduce")
            return self.comm.reduce_scatter_tokens(partial, "moe_scatter")      # [n, hidden]


def parallelize_stage(model: DSAModel, comm: StageComm) -> DSAModel:
    """Make ``model`` (one rank's shard) run as one of the ``comm.size`` CP ranks of its stage; in place.
    A stage of one rank needs nothing."""
    if comm.size == 1:
        return model
    writer, tokens = GatheringCacheWriter(comm), StageMoETokens(comm)
    for layer in model.layers.values():
        layer.self_attn.cache_writer = writer
        if layer.is_moe:
            layer.mlp.tokens = tokens
    return model
