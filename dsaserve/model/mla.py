"""Multi-head latent attention (MLA) with DSA top-k sparsity.

Per token the cache holds 576-class values: the normed latent c (kv_lora_rank) and the roped shared key
k_pe (qk_rope_head_dim). Two equivalent ways to attend:
  * expanded (prefill): k_nope, v = kv_b_proj(c) per head; scores = q . [k_nope | k_pe],
  * absorbed (decode):  q_lat = q_nope @ W_UK, scores = q_lat . c + q_pe . k_pe, out = W_UV @ (p @ c).
Keys are always read back from the paged cache, after this step's keys have been written, so a chunk
attends to its cached prefix and CP ranks see the full prefix after the gather.

Two implementations of the attention part, picked per module by ``attn_backend``:
  * "reference": pure PyTorch, a Python loop per request (expanded form for prefill, absorbed for decode);
    the CPU default and the oracle,
  * "kernels": the ``dsaserve.kernels`` ops (Triton on CUDA, their PyTorch references elsewhere). Every
    local token gets one row of top-k cache SLOTS (-1 = none): indexer top-k for requests with more keys
    than index_topk, all keys 0..pos otherwise; then ONE absorbed ``sparse_mla`` call over the whole latent
    pool serves prefill and decode of every request of the step. kv_b-expanded keys are never built.
  * "auto" (default): "kernels" on CUDA tensors, "reference" elsewhere.
The default can be set for a whole process with the environment variable DSASERVE_ATTN_BACKEND (e.g. for
spawned workers), per model with ``set_attn_backend(model, backend)``.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from dsaserve.cache.kv_cache import LayerCache
from dsaserve.config import ModelConfig
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.indexer import Indexer
from dsaserve.model.layers import RMSNorm, apply_rope_interleaved, linear
from dsaserve.model.parallelize import StageComm
from dsaserve.profiling import phase

_SCORE_BLOCK_ELEMS = 1 << 25  # bound on [queries, heads, keys] (x head dim for gathers) per block
# Kernel path: bound on the [tokens, heads, kv_lora + rope] absorbed queries of one sparse_mla call.
_ATTN_BLOCK_ELEMS = 1 << 28
ATTN_BACKENDS = ("auto", "reference", "kernels")


def _env_backend() -> str:
    value = os.environ.get("DSASERVE_ATTN_BACKEND", "auto")
    if value not in ATTN_BACKENDS:
        raise ValueError(f"DSASERVE_ATTN_BACKEND must be one of {', '.join(ATTN_BACKENDS)}, got {value!r}")
    return value


def set_attn_backend(model: nn.Module, backend: str) -> int:
    """Set ``attn_backend`` on every MLAttention inside ``model``; returns how many were set."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {', '.join(ATTN_BACKENDS)}, got {backend!r}")
    count = 0
    for mod in model.modules():
        if isinstance(mod, MLAttention):
            mod.attn_backend = backend
            count += 1
    return count


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] along dim 0; fp8 tensors are gathered as bytes (fp8 indexing support varies by torch version)."""
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)[idx].view(t.dtype)
    return t[idx]


def _dense_slots(batch: ForwardBatch, tok: torch.Tensor, width: int) -> torch.Tensor:
    """All keys 0..pos of each token's own request as cache slots: tok [m] -> int32 [m, width], -1 beyond pos."""
    ps = batch.page_size
    bt = batch.block_tables[batch.token_req[tok]]                                # [m, max_pages]
    j = torch.arange(width, device=bt.device)                                    # key positions
    pages = (j // ps).clamp(max=bt.shape[1] - 1)                                 # beyond the table: masked below
    slots = bt[:, pages] * ps + j % ps                                           # [m, width]
    valid = j[None, :] <= batch.positions[tok][:, None]
    return torch.where(valid, slots, -1).to(torch.int32)


class MLAttention(nn.Module):
    """``self_attn`` of one decoder layer: MLA projections + (optionally) the lightning indexer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device=None,
                 attn_backend: str | None = None):
        super().__init__()
        backend = _env_backend() if attn_backend is None else attn_backend
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {', '.join(ATTN_BACKENDS)}, got {backend!r}")
        self.attn_backend = backend  # "auto" | "reference" | "kernels" (see the module docstring)
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

        if self.uses_kernels(x):
            return self._forward_kernels(q_nope, q_pe, index_q, index_w, batch, cache, indexer_fp8)

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
                    keys = _rows(cache.index_k, key_slots)
                    kscale = cache.index_scale[key_slots] if cache.index_scale is not None else None
                    sel = self.indexer.select(_rows(index_q, tok), index_w[tok], keys, kscale, pos)
                    topk_per_req[r] = sel
                else:                                                            # GLM "shared" layer
                    sel = topk_per_req[r]
            attend = self._attend_absorbed if batch.is_decode else self._attend_expanded
            with phase("sparse_attn"):
                out[tok] = attend(q_nope[tok], q_pe[tok], cache.latent[key_slots], pos, sel)
        with phase("dense_gemm"):
            return self.o_proj(out.view(n, self.n_heads * self.v_dim))

    def uses_kernels(self, x: torch.Tensor) -> bool:
        """Whether this forward takes the kernel path ("auto": on CUDA)."""
        if self.attn_backend == "auto":
            return x.is_cuda
        return self.attn_backend == "kernels"

    # ---- kernel path ---------------------------------------------------------------------------------
    def _forward_kernels(self, q_nope, q_pe, index_q, index_w, batch: ForwardBatch, cache: LayerCache,
                         indexer_fp8: bool) -> torch.Tensor:
        """All local tokens at once: top-k slots per token, one absorbed sparse MLA over the latent pool."""
        from dsaserve.kernels import sparse_mla

        n = q_nope.shape[0]
        slots = self._kernel_slots(index_q, index_w, batch, cache, indexer_fp8)   # [n, width] int32
        w_uk, w_uv = self._w_kv_b()                                              # [H, nope, L], [H, v, L]
        out = torch.empty(n, self.n_heads, self.v_dim, dtype=q_nope.dtype, device=q_nope.device)
        block = max(1, _ATTN_BLOCK_ELEMS // (self.n_heads * (self.kv_lora + self.rope)))
        for s in range(0, n, block):
            e = min(n, s + block)
            with phase("dense_gemm"):
                q_lat = torch.einsum("thn,hnl->thl", q_nope[s:e], w_uk)          # [t, H, L]
                q_abs = torch.cat([q_lat, q_pe[s:e]], dim=-1).contiguous()       # [t, H, L + rope]
            with phase("sparse_attn"):
                out_lat, _ = sparse_mla(q_abs, cache.latent, slots[s:e], self.scale, d_v=self.kv_lora)
            with phase("dense_gemm"):
                out[s:e] = torch.einsum("thl,hvl->thv", out_lat, w_uv)           # [t, H, v]
        with phase("dense_gemm"):
            return self.o_proj(out.view(n, self.n_heads * self.v_dim))

    def _kernel_slots(self, index_q, index_w, batch: ForwardBatch, cache: LayerCache,
                      indexer_fp8: bool) -> torch.Tensor:
        """Top-k key cache slots of every local token -> int32 [n, width] (-1 = none; padding rows all -1).

        width = index_topk when any request has more keys than that, else its longest key count. GLM
        "shared" layers (no indexer) reuse the slots of the last full layer of the step (slot ids are the
        same in every layer's pool).
        """
        if self.indexer is None:
            slots = batch.scratch.get("topk_slots")
            if slots is None:
                raise RuntimeError(f"layer {self.layer_idx} shares the top-k of an earlier indexer layer, but no "
                                   "indexer layer ran before it in this step (check indexer_types)")
            return slots
        n, dev = batch.num_tokens, batch.positions.device
        width = min(self.topk, max(batch.req_seq_lens, default=1))
        slots = torch.full((n, width), -1, dtype=torch.int32, device=dev)
        seq_lens = batch.scratch.get("req_seq_lens_t")
        if seq_lens is None:
            seq_lens = torch.tensor(batch.req_seq_lens, dtype=torch.long, device=dev)
            batch.scratch["req_seq_lens_t"] = seq_lens
        real = batch.token_req >= 0
        tok_len = torch.where(real, seq_lens[batch.token_req.clamp(min=0)], 0)    # [n] keys of the token's request
        dense_tok = (real & (tok_len <= self.topk)).nonzero(as_tuple=True)[0]
        if dense_tok.numel():                                                    # few keys: attend to all of them
            slots[dense_tok] = _dense_slots(batch, dense_tok, width)
        if any(length > self.topk for length in batch.req_seq_lens):
            if batch.is_decode and indexer_fp8 and batch.page_size == _paged_page_size():
                sparse_tok = (real & (tok_len > self.topk)).nonzero(as_tuple=True)[0]
                slots[sparse_tok] = self._decode_select_paged(index_q, index_w, batch, cache, sparse_tok)
            else:
                for r, tok in enumerate(batch.req_token_index()):
                    if tok.numel() == 0 or batch.req_seq_lens[r] <= self.topk:
                        continue
                    key_slots = batch.key_slots(r)                               # [T] int64, position order
                    keys = _rows(cache.index_k, key_slots)
                    kscale = cache.index_scale[key_slots] if cache.index_scale is not None else None
                    sel = self.indexer.select_kernels(_rows(index_q, tok), index_w[tok], keys, kscale,
                                                      batch.positions[tok], num_sms=batch.indexer_num_sms)
                    slots[tok] = torch.where(sel >= 0, key_slots[sel.clamp(min=0).long()], -1).to(torch.int32)
        batch.scratch["topk_slots"] = slots
        return slots

    def _decode_select_paged(self, index_q, index_w, batch: ForwardBatch, cache: LayerCache,
                             tok: torch.Tensor) -> torch.Tensor:
        """Decode top-k straight from the paged fp8 key cache (no gather): tok [m] -> int32 slots [m, topk]."""
        from dsaserve.kernels import paged_mqa_logits, topk_indices

        ps = batch.page_size
        bt = batch.block_tables[batch.token_req[tok]]                            # [m, max_pages] int64
        ctx = (batch.positions[tok] + 1).to(torch.int32)                         # keys 0..pos
        d = cache.index_k.shape[1]
        with phase("indexer_logits"):
            logits = paged_mqa_logits(_rows(index_q, tok), cache.index_k.view(-1, ps, d), cache.index_scale.view(-1, ps),
                                      index_w[tok], ctx, bt.to(torch.int32), num_sms=batch.indexer_num_sms)
        with phase("topk"):
            pos = topk_indices(logits, lengths=ctx, k=self.topk, assume_masked=True)  # [m, topk] positions
        p = pos.clamp(min=0).long()
        slot = bt.gather(1, p // ps) * ps + p % ps
        return torch.where(pos >= 0, slot, -1).to(torch.int32)

    @staticmethod
    def _write(batch: ForwardBatch, comm: StageComm, dest: torch.Tensor, local: torch.Tensor, kind: str):
        """Write this step's keys into the cache; under CP prefill, every rank writes every rank's keys."""
        if batch.gathered_write_slots is not None:
            values, slots = comm.all_gather_tokens(local, kind), batch.gathered_write_slots
        else:
            values, slots = local, batch.write_slots
        keep = slots >= 0                                                        # padding is never cached
        values = values[keep].to(dest.dtype)
        if dest.dtype == torch.float8_e4m3fn:                                    # index_put via bytes: fp8
            dest, values = dest.view(torch.uint8), values.view(torch.uint8)      # support varies by version
        dest[slots[keep]] = values

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


def _paged_page_size() -> int:
    """Page size the paged indexer-logits kernel reads (other cache page sizes use the gather path)."""
    from dsaserve.kernels.reference import PAGE_SIZE

    return PAGE_SIZE
