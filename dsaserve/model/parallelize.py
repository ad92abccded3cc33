"""Context parallelism applied to a plain ``DSAModel`` from outside (gpt-fast / torchtitan style).

The modules never talk to a process group. ``parallelize_stage(model, comm)`` gives a stage whose C ranks
each hold a shard of the tokens (``runtime.cp``) the two collaborators that need the whole stage:
  * every ``MLAttention.cache_writer`` becomes a ``GatheringCacheWriter``: a CP prefill all-gathers the
    latent KV and indexer keys of the stage's tokens and every rank writes all of them into its cache, so
    each rank attends over the full prefix;
  * every ``MoE.tokens`` becomes an ``ExpertParallelTokens``: each rank holds whole routed experts
    (``StageShard.expert_range``) and routes its own tokens; a CP prefill all-gathers the stage's routed
    tokens (activations in the experts' input format -- e4m3 + scales for fp8 experts, half the bytes --
    plus expert ids and weights), every rank runs its experts on the rows routed to them, and the partial
    sums go back to the token owners (reduce-scatter). Decode tokens are replicated on the stage: nothing
    to gather, partials are all-reduced. The shared expert runs on each rank's own tokens, outside this.
The weights were already placed when the shard was built and loaded; nothing else changes.
``StageComm`` is all this needs from the group (``dsaserve.parallel.stage_comm.GroupStageComm``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from dsaserve.cache.kv_cache import LayerCache, write_rows
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.deepseek_v32 import DSAModel
from dsaserve.model.mla import CacheWriter
from dsaserve.model.moe import RoutedTokens, StageTokens
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


class ExpertParallelTokens(StageTokens):
    """Expert parallelism over a CP stage: every rank's experts see the whole stage's routed tokens; the
    routed partial sums are reduced over the stage. Byte counters: ``moe_gather`` (activations),
    ``moe_route_gather`` (ids, weights and fp8 scales in one fp32 tensor), ``moe_scatter`` / ``moe_allreduce``."""

    local = False

    def __init__(self, comm: StageComm):
        self.comm = comm

    def dispatch(self, tokens: RoutedTokens, batch: ForwardBatch) -> RoutedTokens:
        if batch.is_decode:                                                      # already on every rank
            return tokens
        with phase("moe_comm"):
            x = self.comm.all_gather_tokens(tokens.x, "moe_gather")              # [C*n, hidden]
            # one gather for the small per-token rest: fp8 scales, expert ids (exact in fp32: < 2^24), weights
            side = [tokens.ids.to(torch.float32), tokens.weights.float()]
            if tokens.x_scale is not None:
                side.insert(0, tokens.x_scale)
            packed = self.comm.all_gather_tokens(torch.cat(side, dim=1), "moe_route_gather")  # [C*n, n_scale + 2k]
        k = tokens.ids.shape[1]
        n_scale = 0 if tokens.x_scale is None else tokens.x_scale.shape[1]
        x_scale = packed[:, :n_scale].contiguous() if tokens.x_scale is not None else None  # [C*n, n_scale]
        ids = packed[:, n_scale:n_scale + k].to(torch.int64)                    # [C*n, k]
        weights = packed[:, n_scale + k:].contiguous()                           # [C*n, k] fp32
        return RoutedTokens(x, x_scale, ids, weights)

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
    writer, tokens = GatheringCacheWriter(comm), ExpertParallelTokens(comm)
    for layer in model.layers.values():
        layer.self_attn.cache_writer = writer
        if layer.is_moe:
            layer.mlp.tokens = tokens
    return model
