"""The DSA decoder stack (DeepSeek-V3.2 and GLM-5), one pipeline stage at a time.

``DSAModel(cfg, layer_start, layer_end, ...)`` holds only layers [layer_start, layer_end), the embedding
when it is the first stage and the final norm + lm_head when it is the last. Module names follow the HF
checkpoint (``model.layers.{i}.self_attn.q_a_proj`` ...), and ``checkpoint_specs()`` lists exactly the
tensors this stage/CP-rank needs, so the loader never reads other stages' weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dsaserve.cache.kv_cache import KVCache
from dsaserve.checkpoint.spec import TensorSpec
from dsaserve.config import ModelConfig
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, linear
from dsaserve.model.mla import MLAttention
from dsaserve.model.moe import MoE
from dsaserve.model.parallelize import LocalStageComm, StageComm
from dsaserve.profiling import phase


class DecoderLayer(nn.Module):
    """Pre-norm layer with the residual fused into the norms: attn_norm -> MLA -> ffn_norm -> MLP/MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, cp_rank: int, cp_size: int, dtype: torch.dtype,
                 device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = MLAttention(cfg, layer_idx, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = MoE(cfg, cp_rank, cp_size, dtype, device)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype, device)

    def forward(self, x, residual, batch: ForwardBatch, cache: KVCache, comm: StageComm, cos, sin, indexer_fp8):
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch, cache[self.layer_idx], comm, cos, sin, indexer_fp8)
        x, residual = self.post_attention_layernorm(x, residual)
        if not self.is_moe:
            with phase("dense_gemm"):
                return self.mlp(x), residual                                     # dense: replicated, no comm
        if comm.cp_size == 1:
            with phase("moe"):
                return self.mlp(x), residual
        if batch.is_decode:                                                      # tokens replicated on the stage
            with phase("moe"):
                partial = self.mlp(x)
            with phase("moe_comm"):
                return comm.all_reduce(partial, "moe_allreduce"), residual
        with phase("moe_comm"):
            full = comm.all_gather_tokens(x, "moe_gather")                       # [C*n, hidden]
        with phase("moe"):
            partial = self.mlp(full)
        with phase("moe_comm"):
            return comm.reduce_scatter_tokens(partial, "moe_scatter"), residual


class DSAModel(nn.Module):
    """One pipeline stage of a DSA model (the whole model when it is the only stage)."""

    def __init__(self, cfg: ModelConfig, layer_start: int = 0, layer_end: int | None = None, *,
                 cp_rank: int = 0, cp_size: int = 1, dtype: torch.dtype = torch.float32, device=None,
                 indexer_fp8: bool = False):
        super().__init__()
        layer_end = cfg.num_hidden_layers if layer_end is None else layer_end
        if not 0 <= layer_start < layer_end <= cfg.num_hidden_layers:
            raise ValueError(f"bad layer range [{layer_start}, {layer_end}) for {cfg.num_hidden_layers} layers")
        self.cfg = cfg
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first, self.is_last = layer_start == 0, layer_end == cfg.num_hidden_layers
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.dtype = dtype
        self.indexer_fp8 = indexer_fp8
        self.rotary = RotaryEmbedding(cfg, device)
        if self.is_first:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
            self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, cp_rank, cp_size, dtype, device)
                                     for i in range(layer_start, layer_end)})
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, dtype, device)

    @property
    def layer_range(self) -> range:
        return range(self.layer_start, self.layer_end)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache, *, input_ids: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                comm: StageComm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run this stage's layers on the local tokens.

        First stage: ``input_ids`` [n]; later stages: ``hidden``, ``residual`` [n, hidden] from the previous
        stage. Returns (hidden, residual) [n, hidden] each; the last stage's hidden is *not* yet normed.
        """
        comm = comm or LocalStageComm()
        if self.is_first:
            hidden, residual = self.embed_tokens(input_ids), None
        cos, sin = self.rotary(batch.positions, self.dtype)
        for layer in self.layers.values():
            hidden, residual = layer(hidden, residual, batch, cache, comm, cos, sin, self.indexer_fp8)
        if residual is None:  # a stage with no layers never happens (validated), keep the contract anyway
            residual = hidden
        return hidden, residual

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head for the given rows ([m, hidden] each) -> fp32 logits [m, vocab]."""
        x, _ = self.norm(hidden, residual)
        return self.lm_head(x).float()

    # ---- checkpoint --------------------------------------------------------------------------------
    def checkpoint_specs(self) -> list[TensorSpec]:
        """The HF tensors this stage / CP rank needs and where each one goes."""
        specs: list[TensorSpec] = []

        def add(name: str, dest: torch.Tensor, **shard):
            specs.append(TensorSpec(name, dest, **shard))

        if self.is_first:
            add("model.embed_tokens.weight", self.embed_tokens.weight)
        if self.is_last:
            add("model.norm.weight", self.norm.weight)
            head = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
            add(head, self.lm_head.weight)
        inter = self.cfg.moe_intermediate_size
        shard = dict(shard_index=self.cp_rank, shard_count=self.cp_size)
        rows, cols = dict(shard_dim=0, full_size=inter, **shard), dict(shard_dim=1, full_size=inter, **shard)
        shared = inter * self.cfg.n_shared_experts
        shared_rows, shared_cols = dict(rows, full_size=shared), dict(cols, full_size=shared)
        for i, layer in self.layers.items():
            prefix = f"model.layers.{i}."
            for name, tensor in layer.named_parameters():
                if name.startswith("mlp.") and layer.is_moe:
                    continue  # expert tensors are mapped below
                add(prefix + name, tensor)
            if not layer.is_moe:
                continue
            moe: MoE = layer.mlp
            add(prefix + "mlp.gate.weight", moe.gate.weight)
            add(prefix + "mlp.gate.e_score_correction_bias", moe.gate.e_score_correction_bias)
            for e in range(moe.n_experts):
                ep = f"{prefix}mlp.experts.{e}."
                add(ep + "gate_proj.weight", moe.w_gate_up[e, : moe.inter], **rows)
                add(ep + "up_proj.weight", moe.w_gate_up[e, moe.inter:], **rows)
                add(ep + "down_proj.weight", moe.w_down[e], **cols)
            if moe.shared_experts is not None:
                sp = prefix + "mlp.shared_experts."
                add(sp + "gate_proj.weight", moe.shared_experts.gate_proj.weight, **shared_rows)
                add(sp + "up_proj.weight", moe.shared_experts.up_proj.weight, **shared_rows)
                add(sp + "down_proj.weight", moe.shared_experts.down_proj.weight, **shared_cols)
        return specs
