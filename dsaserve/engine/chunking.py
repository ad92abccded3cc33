"""Dynamic prefill chunk sizing: with pipeline stages, chunks of one long prompt shrink as its cached prefix
grows, so every chunk costs about the same time per stage and no stage idles waiting for a long chunk.

Why: stage s works on chunk c while stage s+1 works on chunk c-1. With fixed-size chunks, later chunks cost
more (each query of the indexer scores every earlier key), so the pipeline runs at the pace of its most
expensive chunk and the drain is as long as that chunk. Equal-cost chunks keep the stages in step.

The cost of computing the prompt positions [start, end) on one stage (``ChunkCostModel``):

    per_token_ms     * (end - start)                                   dense GEMMs, MoE, CP gathers, ...
  + per_key_ms       * sum_{p=start}^{end-1} (p + 1)                   indexer logits + top-k: query p scores
                                                                       keys 0..p (grows with the prefix)
  + per_attended_ms  * sum_{p=start}^{end-1} min(p + 1, index_topk)    sparse attention: query p attends to
                                                                       at most index_topk keys

The coefficients are fitted (``ChunkCostModel.fit``) from the per-phase times the ranks record when profiling
is on (``profiling.phase`` regions, read through ``LLMEngine.stats()``): each group of phases divided by its
feature summed over the spans that were computed. Before any timing exists the defaults come from the
newest 1-GPU breakdown in the repository (``DEFAULT_SOURCE``). Only the ratios matter for the chunk lengths.

``DynamicChunker`` turns the model into chunk lengths: the first chunk is ``--chunked-prefill-size``; a
chunk starting at ``start`` is the longest whose cost does not exceed the first chunk's cost, its end rounded
down to a multiple of ``align`` and its length at least ``min_chunk``. The runtime accepts any chunk
boundaries (fixed chunks of 3 or 7 tokens are tested under CP); alignment to the KV page size is chosen so
that every chunk after the first starts on a page boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from dsaserve.args import DYNAMIC_CHUNKING_MODES

# Phase names (``with phase(...)`` in the model / runtime) whose time grows with the prefix.
INDEXER_PHASES = ("indexer_logits", "topk", "indexer_topk")   # indexer_topk: the fused kernel
ATTENTION_PHASES = ("sparse_attn",)
# Waiting is not work: a stage's time waiting for the previous stage says nothing about chunk cost.
IGNORED_PHASES = ("pp_recv_wait",)

# The newest 1-GPU per-phase breakdown in the repository: 1x1, 65536 tokens, 8-layer DeepSeek-V3.2 geometry
# with 32 experts, bf16 + fp8 indexer, H200 (benchmarks/results/prefill_h200x4_dispatch_ahead_2026-11-28.json,
# run "1x1 baseline 65536", breakdown rows "max"). Exclusive ms per phase name; index_topk 2048.
DEFAULT_SOURCE = {
    "file": "benchmarks/results/prefill_h200x4_dispatch_ahead_2026-11-28.json",
    "input_len": 65536,
    "index_topk": 2048,
    "phases_ms": {"indexer_logits": 343.7, "topk": 259.6, "sparse_attn": 1194.6, "moe": 886.7,
                  "dense_gemm": 929.2, "cp_gather": 28.7},
}

def causal_keys(x: int) -> int:
    """sum_{p=0}^{x-1} (p + 1): keys scored by the indexer for the first x positions."""
    return x * (x + 1) // 2


def attended_keys(x: int, topk: int) -> int:
    """sum_{p=0}^{x-1} min(p + 1, topk): keys the sparse attention reads for the first x positions."""
    if x <= topk:
        return causal_keys(x)
    return causal_keys(topk) + (x - topk) * topk


@dataclass(frozen=True)
class ChunkCostModel:
    """Cost in ms of computing prompt positions [start, end) on one pipeline stage (module docstring)."""

    per_token_ms: float
    per_key_ms: float
    per_attended_ms: float
    index_topk: int

    def cumulative(self, x: int) -> float:
        """Cost of positions [0, x)."""
        return (self.per_token_ms * x + self.per_key_ms * causal_keys(x)
                + self.per_attended_ms * attended_keys(x, self.index_topk))

    def span(self, start: int, end: int) -> float:
        return self.cumulative(end) - self.cumulative(start)

    def with_topk(self, index_topk: int) -> "ChunkCostModel":
        """The same per-key costs for a model with another index_topk."""
        return ChunkCostModel(self.per_token_ms, self.per_key_ms, self.per_attended_ms, index_topk)

    @classmethod
    def fit(cls, phases_ms: dict[str, float], spans: Iterable[tuple[int, int]], index_topk: int) -> "ChunkCostModel":
        """Coefficients from exclusive phase times (ms by phase name) recorded while the position ranges
        ``spans`` ([start, end) per request and step) were computed. Every phase that is neither indexer,
        attention nor waiting is counted as per-token work."""
        spans = [(int(s), int(e)) for s, e in spans if e > s]
        if not spans:
            raise ValueError("fitting the chunk cost model needs at least one computed span [start, end)")
        tokens = sum(e - s for s, e in spans)
        keys = sum(causal_keys(e) - causal_keys(s) for s, e in spans)
        attended = sum(attended_keys(e, index_topk) - attended_keys(s, index_topk) for s, e in spans)
        indexer = sum(phases_ms.get(p, 0.0) for p in INDEXER_PHASES)
        attention = sum(phases_ms.get(p, 0.0) for p in ATTENTION_PHASES)
        linear = sum(ms for p, ms in phases_ms.items()
                     if p not in INDEXER_PHASES + ATTENTION_PHASES + IGNORED_PHASES)
        if min(indexer, attention, linear) < 0:
            raise ValueError(f"phase times must be >= 0, got {phases_ms}")
        return cls(linear / tokens, indexer / keys, attention / attended, index_topk)

    @classmethod
    def default(cls, index_topk: int) -> "ChunkCostModel":
        """The model fitted on ``DEFAULT_SOURCE`` (used until this engine has its own timings)."""
        src = DEFAULT_SOURCE
        fitted = cls.fit(src["phases_ms"], [(0, src["input_len"])], src["index_topk"])
        return fitted.with_topk(index_topk)


@dataclass(frozen=True)
class DynamicChunker:
    """Chunk lengths of equal cost (module docstring). ``chunk_len(start)`` is what the scheduler asks."""

    first_chunk: int
    cost: ChunkCostModel
    align: int = 1
    min_chunk: int = 1

    def __post_init__(self):
        if self.first_chunk < 1 or self.align < 1:
            raise ValueError(f"first_chunk and align must be >= 1, got {self.first_chunk}, {self.align}")
        if not 1 <= self.min_chunk <= self.first_chunk or self.min_chunk % self.align:
            raise ValueError(f"min_chunk {self.min_chunk} must be in [1, first_chunk={self.first_chunk}] and a "
                             f"multiple of align={self.align}")

    def chunk_len(self, start: int) -> int:
        """Length of the chunk that starts at position ``start`` (before clipping to the prompt's end)."""
        if start <= 0:
            return self.first_chunk
        target = self.cost.span(0, self.first_chunk) * (1 + 1e-12)
        lo, hi = 0, self.first_chunk                  # the longest length whose cost is <= target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.cost.span(start, start + mid) <= target else (lo, mid - 1)
        end = start + lo
        end -= end % self.align
        return min(self.first_chunk, max(self.min_chunk, end - start))

    def sequence(self, n: int) -> list[int]:
        """The chunk lengths of an n-token prompt prefilled alone (they sum to n)."""
        out, start = [], 0
        while start < n:
            length = min(n - start, self.chunk_len(start))
            out.append(length)
            start += length
        return out


def dynamic_chunking_enabled(mode: str, pp_size: int) -> bool:
    """--dynamic-chunking: auto = on when there are pipeline stages to keep in step."""
    if mode not in DYNAMIC_CHUNKING_MODES:
        raise ValueError(f"dynamic_chunking must be one of {', '.join(DYNAMIC_CHUNKING_MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and pp_size > 1)


def make_chunker(first_chunk: int, page_size: int, cost: ChunkCostModel) -> DynamicChunker:
    """The engine's chunker: ends on KV page boundaries when the first chunk is whole pages (otherwise every
    later start would be off the page grid anyway), and no chunk under a quarter of the first, so a huge
    prefix never turns into many tiny steps that each pay the per-step host and launch cost."""
    align = page_size if first_chunk % page_size == 0 else 1
    min_chunk = max(align, first_chunk // 4 // align * align)
    return DynamicChunker(first_chunk, cost, align, min_chunk)
