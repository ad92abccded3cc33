"""The DSA decoder stack (DeepSeek-V3.2 and GLM-5), one pipeline stage at a time.

``DSAModel(cfg, shard, backends=...)`` holds only the layers of its ``StageShard``, the embedding when it is
the first stage and the final norm + lm_head when it is the last, and only its routed experts. Module
names follow the HF checkpoint (``model.layers.{i}.self_attn.q_a_proj`` ...); ``model.state_dict`` lists
exactly the checkpoint tensors (and slices) the shard needs.

The modules are plain: they take no process group and run on one rank as they are. Context parallelism
is applied from outside by ``model.parallelize.parallelize_stage``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dsaserve.cache.kv_cache import KVCache
from dsaserve.config import ModelConfig
from dsaserve.model.backends import ModelBackends, select_backends
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.layers import DenseLinear, GatedMLP, RMSNorm, RotaryEmbedding
from dsaserve.model.mla import MLAttention
from dsaserve.model.indexer import Indexer
from dsaserve.model.moe import MoE, Router
from dsaserve.model.shard import StageShard
from dsaserve.profiling import phase


class DecoderLayer(nn.Module):
    """Pre-norm layer with the residual fused into the norms: attn_norm -> MLA -> ffn_norm -> MLP/MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, shard: StageShard, backends: ModelBackends,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = MLAttention(cfg, layer_idx, attention=backends.attention, indexer=backends.indexer,
                                     linear=backends.linear, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.linear = backends.linear
        if self.is_moe:
            self.mlp = MoE(cfg, shard, backends.experts, backends.linear, dtype, device)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, backends.linear, dtype, device)

    def forward(self, x, residual, batch: ForwardBatch, cache: KVCache, cos, sin):
        # A norm whose output feeds fp8 GEMMs or fp8 experts makes that input's fp8 copy in the same pass (x_fp8;
        # None: the consumers quantize it themselves). Both fp8 GEMM paths take the copy (the Triton GEMM at decode
        # sizes, cuBLASLt's at prefill), which spares each an act_quant launch re-reading the whole input.
        gemm_quant = self.linear.fp8
        x, residual, x_fp8 = self.input_layernorm.forward_quant(x, residual, quant=gemm_quant)
        x = self.self_attn(x, batch, cache[self.layer_idx], cos, sin, x_fp8=x_fp8)
        x, residual, x_fp8 = self.post_attention_layernorm.forward_quant(
            x, residual, quant=gemm_quant or (self.is_moe and self.mlp.experts.fp8))
        if self.is_moe:
            return self.mlp(x, batch, x_fp8=x_fp8), residual
        with phase("dense_gemm"):
            return self.mlp(x, x_fp8), residual                                  # dense: replicated, no comm


class DSAModel(nn.Module):
    """One pipeline stage of a DSA model (the whole model when it is the only stage)."""

    def __init__(self, cfg: ModelConfig, shard: StageShard | None = None, *, backends: ModelBackends | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        shard = shard or StageShard.whole(cfg)
        if shard.num_layers != cfg.num_hidden_layers:
            raise ValueError(f"the shard is of a {shard.num_layers}-layer model; the config has {cfg.num_hidden_layers}")
        backends = backends or select_backends(device=device or "cpu")
        self.cfg = cfg
        self.shard = shard
        self.backends = backends
        self.dtype = dtype
        self.rotary = RotaryEmbedding(cfg, device)
        if self.is_first:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
            self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, shard, backends, dtype, device)
                                     for i in shard.layers})
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
            self.lm_head = DenseLinear()(cfg.hidden_size, cfg.vocab_size, dtype, device)  # never quantized

    @torch.no_grad()
    def weights_loaded(self) -> None:
        """Call once the weights are in place (loaded or drawn): the fp32 router and indexer head-weight
        projections count the bf16 parts their weights need, so prefill multiplies only those (the same
        result; a third of the work for a checkpoint that stores them as bf16, as DeepSeek's does). One device
        sync per layer."""
        for m in self.modules():
            if isinstance(m, (Router, Indexer)):
                m.weights_loaded()

    @property
    def layer_range(self) -> range:
        return self.shard.layers

    @property
    def is_first(self) -> bool:
        """Holds the embedding (``StageShard.is_first``)."""
        return self.shard.is_first

    @property
    def is_last(self) -> bool:
        """Holds the final norm and lm_head (``StageShard.is_last``)."""
        return self.shard.is_last

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache, *, input_ids: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run this stage's layers on the local tokens.

        First stage: ``input_ids`` [n]; later stages: ``hidden``, ``residual`` [n, hidden] from the previous
        stage. Returns (hidden, residual) [n, hidden] each; the last stage's hidden is *not* yet normed.
        """
        if self.is_first:
            hidden, residual = self.embed_tokens(input_ids), None
        cos, sin = self.rotary(batch.positions, self.dtype)
        for layer in self.layers.values():
            hidden, residual = layer(hidden, residual, batch, cache, cos, sin)
        if residual is None:  # a stage with no layers never happens (validated), keep the contract anyway
            residual = hidden
        return hidden, residual

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head for the given rows ([m, hidden] each) -> fp32 logits [m, vocab]."""
        x, _ = self.norm(hidden, residual)
        return self.lm_head(x).float()
