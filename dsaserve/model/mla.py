"""Multi-head latent attention (MLA) with DSA top-k sparsity: projections, cache writes, the attention call.

Per token the cache holds 576-class values: the normed latent c (kv_lora_rank) and the roped shared key
k_pe (qk_rope_head_dim). Keys are always read back from the paged cache, after this step's keys have been
written, so a chunk attends to its cached prefix and CP ranks see the full prefix after the gather.

Two collaborators, chosen from outside:
  * ``attention`` (``ModelBackends.attention``, ``dsaserve.model.attention``): how the queries attend over
    the keys the indexer selects ("reference": PyTorch, "triton": the ``dsaserve.kernels`` ops),
  * ``cache_writer``: how this step's keys reach the cache. ``CacheWriter`` writes the local tokens at their
    own slots; under context parallelism ``model.parallelize`` swaps in one that all-gathers the stage's
    keys first, so every rank of a stage holds the whole prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

from dsaserve.cache.kv_cache import LayerCache, write_rows, write_rows_unmasked
from dsaserve.config import ModelConfig
from dsaserve.kernels import mla_latent, write_cache_rows
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.indexer import Indexer, IndexerNumerics
from dsaserve.model.layers import (
    DenseLinear,
    Fp8Linear,
    LinearFactory,
    RMSNorm,
    apply_rope_interleaved,
    fuse_projections,
    project,
)
from dsaserve.profiling import phase


@dataclass(frozen=True)
class QueryRope:
    """The RoPE of q_pe that MLA left to the attention backend (``query_rope_out`` answered None): cos / sin
    [n, rope/2] of the step's tokens. ``rows`` ropes a row block straight into the backend's buffer, so a
    backend that attends in blocks of tokens writes each block's roped queries once, with no copy."""

    cos: torch.Tensor
    sin: torch.Tensor

    def rows(self, q_pe: torch.Tensor, s: int, e: int, out: torch.Tensor) -> torch.Tensor:
        """RoPE of q_pe[s:e] [e - s, H, rope] (MLA's convention: interleaved pairs) into out [e - s, H, rope]."""
        return apply_rope_interleaved(q_pe[s:e], self.cos[s:e], self.sin[s:e], out=out)


class AttentionBackend(Protocol):
    """How MLA attends over each local token's selected keys (see ``dsaserve.model.attention``)."""

    name: str
    supports_static_decode: bool     # runs a static (fixed-shape, CUDA-graph-safe) decode batch

    def query_rope_out(self, attn: "MLAttention", q_pe: torch.Tensor) -> torch.Tensor | None:
        """Where MLA writes its roped q_pe [n, H, rope]: q_pe itself (in place) or a view of the backend's own
        query buffer (saves ``attend`` a copy); None: MLA leaves q_pe un-roped and hands ``attend`` a
        ``QueryRope`` (the backend ropes it where it needs it)."""
        ...

    def attend(self, attn: "MLAttention", q_nope: torch.Tensor, q_pe: torch.Tensor, index_q: torch.Tensor | None,
               index_w: torch.Tensor | None, batch: ForwardBatch, cache: LayerCache,
               q_rope: QueryRope | None = None,
               fp8_out: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """q_nope [n, H, nope], q_pe [n, H, rope] (roped, or un-roped with ``q_rope`` given), the indexer's q /
        head weights (None on a layer that shares an earlier layer's top-k) -> attention output [n, H, v] before
        o_proj (padding rows 0). ``fp8_out`` (o_proj is an fp8 layer): the backend may return that output only as
        act_quant's (e4m3 [n, H * v], scales [n, H * v / 128]) instead, made where it computes the output."""
        ...


class CacheWriter:
    """Writes a step's new keys into one layer's paged cache: each local token at its own slot (padding rows,
    slot -1, never; in a static batch they write the sink slot instead, without a host-side mask).
    ``model.parallelize.GatheringCacheWriter`` is the context-parallel version."""

    def write(self, batch: ForwardBatch, cache: LayerCache, latent: torch.Tensor, index_k: torch.Tensor | None,
              index_scale: torch.Tensor | None) -> None:
        """latent [n, 576], index_k [n, D] (e4m3 or model dtype), index_scale [n] fp32 (fp8 keys only)."""
        pairs = [(cache.latent, latent)]
        if index_k is not None:
            pairs.append((cache.index_k, index_k))
            if index_scale is not None:
                pairs.append((cache.index_scale, index_scale))
        if all(dest.is_contiguous() and dest.dtype == values.dtype for dest, values in pairs):
            write_cache_rows(batch.write_slots, pairs)                           # one launch, no host sync
            return
        write = write_rows_unmasked if batch.static else write_rows
        for dest, values in pairs:
            write(dest, batch.write_slots, values)


class MLAttention(nn.Module):
    """``self_attn`` of one decoder layer: MLA projections + (optionally) the lightning indexer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, attention: AttentionBackend, indexer: IndexerNumerics,
                 linear: LinearFactory, dtype: torch.dtype, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope = cfg.qk_nope_head_dim
        self.rope = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.topk = cfg.index_topk
        self.q_a_proj = linear(cfg.hidden_size, cfg.q_lora_rank, dtype, device)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype, device)
        self.q_b_proj = linear(cfg.q_lora_rank, self.n_heads * cfg.qk_head_dim, dtype, device)
        self.kv_a_proj_with_mqa = linear(cfg.hidden_size, self.kv_lora + self.rope, dtype, device)
        self.kv_a_layernorm = RMSNorm(self.kv_lora, 1e-6, dtype, device)
        # kv_b stays in the model dtype whatever the weight format: the absorbed attention multiplies by its
        # per-head views (w_kv_b) every step; an fp8 checkpoint's kv_b is dequantized at load (1 GB for V3.2)
        self.kv_b_proj = DenseLinear()(self.kv_lora, self.n_heads * (self.nope + self.v_dim), dtype, device)
        self.o_proj = linear(self.n_heads * self.v_dim, cfg.hidden_size, dtype, device)
        self.linear = linear
        self.indexer = Indexer(cfg, indexer, linear, dtype, device) if cfg.has_indexer(layer_idx) else None
        self.attention = attention
        self.cache_writer = CacheWriter()
        # One GEMM per shared input (None: separate GEMMs): x -> q_a | indexer wk | kv_a (kv_a last: 576 rows are
        # not whole fp8 scale blocks), and q_a's normed output -> q_b | indexer wq_b.
        wk = [self.indexer.wk] if self.indexer is not None else []
        self.x_proj = fuse_projections([self.q_a_proj, *wk, self.kv_a_proj_with_mqa])
        self.qr_proj = fuse_projections([self.q_b_proj, self.indexer.wq_b]) if self.indexer is not None else None

    def w_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, L], W_UV [H, v, L]) views of kv_b_proj: the absorbed (latent-space) form."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora)
        return w[:, : self.nope], w[:, self.nope:]

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: LayerCache, cos: torch.Tensor,
                sin: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [n, hidden] this rank's tokens -> [n, hidden]. ``x_fp8``: act_quant(x, 128), when the caller made it."""
        n = x.shape[0]
        with phase("dense_gemm"):
            index_k_proj = index_q_proj = None                                   # the indexer's, when fused
            if self.x_proj is not None:
                parts = self.x_proj.split(self.x_proj(x, x_fp8))                 # column views of one GEMM
                q_a, kv = parts[0], parts[-1]
                if self.indexer is not None:
                    index_k_proj = parts[1]                                      # [n, D]
            else:                                                                # [n, q_lora], [n, L + rope]
                q_a, kv = project(self.q_a_proj, x, x_fp8), project(self.kv_a_proj_with_mqa, x, x_fp8)
            qr, _, qr_fp8 = self.q_a_layernorm.forward_quant(                     # [n, q_lora] (+ its fp8 copy)
                q_a, quant=self.linear.fp8)
            if self.qr_proj is not None:                                         # [n, H*(nope+rope)], [n, Hi*D]
                q, index_q_proj = self.qr_proj.split(self.qr_proj(qr, qr_fp8))
            else:
                q = project(self.q_b_proj, qr, qr_fp8)
            q = q.view(n, self.n_heads, self.nope + self.rope)                   # [n, H, nope+rope]
            q_nope, q_pe = q[..., : self.nope], q[..., self.nope:]               # views of q
            # roped in place or straight into the attention backend's query buffer (no copy there), or left to
            # the backend (it ropes block by block into its buffer)
            rope_out = self.attention.query_rope_out(self, q_pe)
            q_rope = None
            if rope_out is None:
                q_rope = QueryRope(cos, sin)
            else:
                q_pe = apply_rope_interleaved(q_pe, cos, sin, out=rope_out)
            # [kv_a_layernorm(c) | rope(k_pe)]: one pass (interleaved RoPE, like apply_rope_interleaved)
            latent = mla_latent(kv, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos, sin)  # [n, 576]
            index_q = index_w = index_k = index_scale = None
            if self.indexer is not None:
                index_q, index_w, index_k, index_scale = self.indexer.project(
                    x, qr, cos, sin, q_proj=index_q_proj, k_proj=index_k_proj)
        with phase("cp_gather"):
            self.cache_writer.write(batch, cache, latent, index_k, index_scale)
        out = self.attention.attend(self, q_nope, q_pe, index_q, index_w, batch, cache, q_rope,
                                    fp8_out=isinstance(self.o_proj, Fp8Linear))      # [n, H, v] or its fp8 copy
        with phase("dense_gemm"):
            if isinstance(out, tuple):                                           # (e4m3 [n, H*v], scales)
                return self.o_proj.forward_quantized(*out)
            return self.o_proj(out.view(n, self.n_heads * self.v_dim))
