"""Multi-head latent attention (MLA) with DSA top-k sparsity.

Per token the cache holds 576-class values: the normed latent c (kv_lora_rank) and the roped shared key
k_pe (qk_rope_head_dim). Two equivalent ways to attend:
  * expanded (prefill): k_nope, v = kv_b_proj(c) per head; scores = q . [k_nope | k_pe],
  * absorbed (decode):  q_lat = q_nope @ W_UK, scores = q_lat . c + q_pe . k_pe, out = W_UV @ (p @ c).
Keys are always read back from the paged cache, after this step's keys have been written, so a chunk
attends to its cached prefix and CP ranks see the full prefix after the gather.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dsaserve.cache.kv_cache import LayerCache
from dsaserve.config import ModelConfig
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.indexer import Indexer
from dsaserve.model.layers import RMSNorm, apply_rope_interleaved, linear
from dsaserve.parallel.comm import StageComm
from dsaserve.profiling import phase

_SCORE_BLOCK_ELEMS = 1 << 25  # bound on [queries, heads, keys] (x head dim for gathers) per block


class MLAttention(nn.Module):
    """``self_attn`` of one decoder layer: MLA projections + (optionally) the lightning indexer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device=None):
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
        self.kv_b_proj = linear(self.kv_lora, self.n_heads * (self.nope + self.v_dim), dtype, device)
        self.o_proj = linear(self.n_heads * self.v_dim, cfg.hidden_size, dtype, device)
        self.indexer = Indexer(cfg, dtype, device) if cfg.has_indexer(layer_idx) else None

    # ---- weights in the two forms ------------------------------------------------------------------
    def _w_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, L], W_UV [H, v, L]) views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora)
        return w[:, : self.nope], w[:, self.nope:]

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: LayerCache, comm: StageComm,
                cos: torch.Tensor, sin: torch.Tensor, indexer_fp8: bool) -> torch.Tensor:
        n = x.shape[0]
        with phase("dense_gemm"):
            qr = self.q_a_layernorm.norm(self.q_a_proj(x))                       # [n, q_lora]
            q = self.q_b_proj(qr).view(n, self.n_heads, self.nope + self.rope)   # [n, H, nope+rope]
            q_nope, q_pe = q[..., : self.nope], apply_rope_interleaved(q[..., self.nope:], cos, sin)
            kv = self.kv_a_proj_with_mqa(x)                                      # [n, L + rope]
            c = self.kv_a_layernorm.norm(kv[:, : self.kv_lora])
            k_pe = apply_rope_interleaved(kv[:, self.kv_lora:], cos, sin)
            latent = torch.cat([c, k_pe], dim=-1)                                # [n, 576]
            index_q = index_w = None
            if self.indexer is not None:
                index_q, index_w, index_k, index_scale = self.indexer.project(x, qr, cos, sin, indexer_fp8)
        with phase("cp_gather"):
            if self.indexer is not None:
                self._write(batch, comm, cache.index_k, index_k, "cp_index_gather")
                if index_scale is not None:
                    self._write(batch, comm, cache.index_scale, index_scale, "cp_index_gather")
            self._write(batch, comm, cache.latent, latent, "cp_kv_gather")

        out = torch.zeros(n, self.n_heads, self.v_dim, dtype=x.dtype, device=x.device)  # padding stays 0
        topk_per_req = batch.scratch.setdefault("topk", {})
        for r, tok in enumerate(batch.req_token_index()):
            if tok.numel() == 0:
                continue
            key_slots = batch.key_slots(r)                                       # [T]
            pos = batch.positions[tok]
            sel = None
            if key_slots.numel() > self.topk:                                    # sparse: ask the indexer
                if self.indexer is not None:
                    keys = cache.index_k[key_slots]
                    kscale = cache.index_scale[key_slots] if cache.index_scale is not None else None
                    sel = self.indexer.select(index_q[tok], index_w[tok], keys, kscale, pos)
                    topk_per_req[r] = sel
                else:                                                            # GLM "shared" layer
                    sel = topk_per_req[r]
            attend = self._attend_absorbed if batch.is_decode else self._attend_expanded
            with phase("sparse_attn"):
                out[tok] = attend(q_nope[tok], q_pe[tok], cache.latent[key_slots], pos, sel)
        with phase("dense_gemm"):
            return self.o_proj(out.view(n, self.n_heads * self.v_dim))

    @staticmethod
    def _write(batch: ForwardBatch, comm: StageComm, dest: torch.Tensor, local: torch.Tensor, kind: str):
        """Write this step's keys into the cache; under CP prefill, every rank writes every rank's keys."""
        if batch.gathered_write_slots is not None:
            values, slots = comm.all_gather_tokens(local, kind), batch.gathered_write_slots
        else:
            values, slots = local, batch.write_slots
        keep = slots >= 0                                                        # padding is never cached
        dest[slots[keep]] = values[keep].to(dest.dtype)

    def _attend_expanded(self, q_nope, q_pe, latent, pos, sel):
        """Prefill form. q_nope [t,H,nope], q_pe [t,H,rope], latent [T,576] in position order, pos [t],
        sel [t,k] selected key positions (-1 invalid) or None (all keys <= pos) -> [t, H, v]."""
        T = latent.shape[0]
        kv = self.kv_b_proj(latent[:, : self.kv_lora]).view(T, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv[..., : self.nope], kv[..., self.nope:]                    # [T, H, nope], [T, H, v]
        k_pe = latent[:, self.kv_lora:]                                          # [T, rope]
        t = q_nope.shape[0]
        out = torch.empty(t, self.n_heads, self.v_dim, dtype=q_nope.dtype, device=q_nope.device)
        width = T if sel is None else sel.shape[1]
        per_query = self.n_heads * width * (1 if sel is None else self.nope + self.v_dim)
        block = max(1, _SCORE_BLOCK_ELEMS // per_query)
        for s in range(0, t, block):
            e = min(t, s + block)
            if sel is None:
                scores = (torch.einsum("thd,jhd->thj", q_nope[s:e], k_nope)
                          + torch.einsum("thd,jd->thj", q_pe[s:e], k_pe)) * self.scale
                mask = torch.arange(T, device=pos.device)[None, None, :] > pos[s:e, None, None]
                probs = scores.masked_fill(mask, float("-inf")).float().softmax(-1).to(v.dtype)
                out[s:e] = torch.einsum("thj,jhd->thd", probs, v)
            else:
                idx = sel[s:e].clamp(min=0)                                      # [tb, k]
                scores = (torch.einsum("thd,tjhd->thj", q_nope[s:e], k_nope[idx])
                          + torch.einsum("thd,tjd->thj", q_pe[s:e], k_pe[idx])) * self.scale
                scores.masked_fill_((sel[s:e] < 0)[:, None, :], float("-inf"))
                probs = scores.float().softmax(-1).to(v.dtype)
                out[s:e] = torch.einsum("thj,tjhd->thd", probs, v[idx])
        return out

    def _attend_absorbed(self, q_nope, q_pe, latent, pos, sel):
        """Decode form, in the latent space: same arguments and result as ``_attend_expanded``."""
        w_uk, w_uv = self._w_kv_b()
        q_lat = torch.einsum("thn,hnl->thl", q_nope, w_uk)                      # [t, H, L]
        c, k_pe = latent[:, : self.kv_lora], latent[:, self.kv_lora:]
        T = latent.shape[0]
        if sel is None:
            scores = torch.einsum("thl,jl->thj", q_lat, c) + torch.einsum("thr,jr->thj", q_pe, k_pe)
            scores = scores.masked_fill(torch.arange(T, device=pos.device)[None, None, :] > pos[:, None, None],
                                        float("-inf"))
            probs = (scores * self.scale).float().softmax(-1).to(c.dtype)
            out_lat = torch.einsum("thj,jl->thl", probs, c)                      # [t, H, L]
        else:
            idx = sel.clamp(min=0)
            scores = torch.einsum("thl,tjl->thj", q_lat, c[idx]) + torch.einsum("thr,tjr->thj", q_pe, k_pe[idx])
            scores = scores.masked_fill((sel < 0)[:, None, :], float("-inf"))
            probs = (scores * self.scale).float().softmax(-1).to(c.dtype)
            out_lat = torch.einsum("thj,tjl->thl", probs, c[idx])
        return torch.einsum("thl,hvl->thv", out_lat, w_uv)
