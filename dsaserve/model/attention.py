"""The attention backends of MLA (``ModelBackends.attention``): how queries attend over their selected keys.

Both read the keys back from the paged cache (this step's keys are already written) and return the
attention output [n, H, v] before ``o_proj``:
  * ``ReferenceAttention`` ("reference"): pure PyTorch, a loop over the step's requests; top-k from
    ``Indexer.select``; the expanded form (kv_b_proj applied to the cached latents) for prefill and the
    absorbed form (queries moved into the latent space) for decode. The oracle, and the default off CUDA.
  * ``TritonAttention`` ("triton"): the ``dsaserve.kernels`` ops (Triton on CUDA, their PyTorch references
    elsewhere). Every local token gets one row of top-k cache SLOTS from ``Indexer.topk_slots``; then one
    absorbed ``sparse_mla`` call over the whole latent pool serves prefill and decode of every request of
    the step. kv_b-expanded keys are never built. The default on CUDA.
GLM "shared" indexer layers (no indexer) reuse the top-k of the step's last indexer layer (kept in
``batch.scratch``; cache slot ids are the same in every layer's pool).
``supports_static_decode``: whether the backend runs a static (fixed-shape, CUDA-graph-safe) decode batch
(``ForwardBatch.static``); the runner builds such batches only for backends that do.
"""

from __future__ import annotations

import torch

from dsaserve.cache.kv_cache import LayerCache
from dsaserve.kernels import sparse_mla
from dsaserve.kernels.mla_value import GROUP as VALUE_GROUP
from dsaserve.kernels.mla_value import value_proj_fp8
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.indexer import gather_rows
from dsaserve.model.mla import MLAttention, QueryRope
from dsaserve.profiling import phase

_SCORE_BLOCK_ELEMS = 1 << 25  # reference: bound on [queries, heads, keys] (x head dim for gathers) per block
# triton: bound on the [tokens, heads, kv_lora + rope] absorbed queries of one sparse_mla call.
_ATTN_BLOCK_ELEMS = 1 << 28


def _shared_topk(attn: MLAttention, scratch: dict, key: str):
    """The top-k an earlier indexer layer of this step left in ``batch.scratch`` (GLM "shared" layers)."""
    value = scratch.get(key)
    if value is None:
        raise RuntimeError(f"layer {attn.layer_idx} shares the top-k of an earlier indexer layer, but no "
                           "indexer layer ran before it in this step (check indexer_types)")
    return value


class ReferenceAttention:
    """PyTorch attention, one request at a time (see the module docstring)."""

    name = "reference"
    supports_static_decode = False     # a loop over requests that reads their lengths on the host

    def query_rope_out(self, attn: MLAttention, q_pe: torch.Tensor) -> torch.Tensor:
        return q_pe                    # MLA ropes q_pe in place

    def attend(self, attn: MLAttention, q_nope, q_pe, index_q, index_w, batch: ForwardBatch,
               cache: LayerCache, q_rope: QueryRope | None = None, fp8_out: bool = False) -> torch.Tensor:
        if batch.static:
            raise RuntimeError("the reference attention cannot run a static decode batch (the runner builds "
                               "them only for backends with supports_static_decode)")
        n = q_nope.shape[0]
        if q_rope is not None:         # MLA never leaves it to this backend, but the protocol allows it
            q_pe = q_rope.rows(q_pe, 0, n, out=q_pe)
        out = torch.zeros(n, attn.n_heads, attn.v_dim, dtype=q_nope.dtype, device=q_nope.device)  # padding stays 0
        topk_per_req = batch.scratch.setdefault("topk", {})
        for r, tok in enumerate(batch.req_token_index()):
            if tok.numel() == 0:
                continue
            key_slots = batch.key_slots(r)                                       # [T]
            pos = batch.positions[tok]
            sel = None
            if key_slots.numel() > attn.topk:                                    # sparse: ask the indexer
                if attn.indexer is not None:
                    keys = gather_rows(cache.index_k, key_slots)
                    kscale = cache.index_scale[key_slots] if cache.index_scale is not None else None
                    sel = attn.indexer.select(gather_rows(index_q, tok), index_w[tok], keys, kscale, pos)
                    topk_per_req[r] = sel
                else:                                                            # GLM "shared" layer
                    sel = _shared_topk(attn, topk_per_req, r)
            attend = self.absorbed if batch.is_decode else self.expanded
            with phase("sparse_attn"):
                out[tok] = attend(attn, q_nope[tok], q_pe[tok], cache.latent[key_slots], pos, sel)
        return out

    @staticmethod
    def expanded(attn: MLAttention, q_nope, q_pe, latent, pos, sel):
        """Prefill form. q_nope [t,H,nope], q_pe [t,H,rope], latent [T,576] in position order, pos [t],
        sel [t,k] selected key positions (-1 invalid) or None (all keys <= pos) -> [t, H, v]."""
        H, nope, v_dim, kv_lora = attn.n_heads, attn.nope, attn.v_dim, attn.kv_lora
        T = latent.shape[0]
        kv = attn.kv_b_proj(latent[:, :kv_lora]).view(T, H, nope + v_dim)
        k_nope, v = kv[..., :nope], kv[..., nope:]                               # [T, H, nope], [T, H, v]
        k_pe = latent[:, kv_lora:]                                               # [T, rope]
        t = q_nope.shape[0]
        out = torch.empty(t, H, v_dim, dtype=q_nope.dtype, device=q_nope.device)
        width = T if sel is None else sel.shape[1]
        per_query = H * width * (1 if sel is None else nope + v_dim)
        block = max(1, _SCORE_BLOCK_ELEMS // per_query)
        for s in range(0, t, block):
            e = min(t, s + block)
            if sel is None:
                scores = (torch.einsum("thd,jhd->thj", q_nope[s:e], k_nope)
                          + torch.einsum("thd,jd->thj", q_pe[s:e], k_pe)) * attn.scale
                mask = torch.arange(T, device=pos.device)[None, None, :] > pos[s:e, None, None]
                probs = scores.masked_fill(mask, float("-inf")).float().softmax(-1).to(v.dtype)
                out[s:e] = torch.einsum("thj,jhd->thd", probs, v)
            else:
                idx = sel[s:e].clamp(min=0)                                      # [tb, k]
                scores = (torch.einsum("thd,tjhd->thj", q_nope[s:e], k_nope[idx])
                          + torch.einsum("thd,tjd->thj", q_pe[s:e], k_pe[idx])) * attn.scale
                scores.masked_fill_((sel[s:e] < 0)[:, None, :], float("-inf"))
                probs = scores.float().softmax(-1).to(v.dtype)
                out[s:e] = torch.einsum("thj,tjhd->thd", probs, v[idx])
        return out

    @staticmethod
    def absorbed(attn: MLAttention, q_nope, q_pe, latent, pos, sel):
        """Decode form, in the latent space: same arguments and result as ``expanded``."""
        w_uk, w_uv = attn.w_kv_b()
        q_lat = torch.einsum("thn,hnl->thl", q_nope, w_uk)                      # [t, H, L]
        c, k_pe = latent[:, : attn.kv_lora], latent[:, attn.kv_lora:]
        T = latent.shape[0]
        if sel is None:
            scores = torch.einsum("thl,jl->thj", q_lat, c) + torch.einsum("thr,jr->thj", q_pe, k_pe)
            scores = scores.masked_fill(torch.arange(T, device=pos.device)[None, None, :] > pos[:, None, None],
                                        float("-inf"))
            probs = (scores * attn.scale).float().softmax(-1).to(c.dtype)
            out_lat = torch.einsum("thj,jl->thl", probs, c)                      # [t, H, L]
        else:
            idx = sel.clamp(min=0)
            scores = torch.einsum("thl,tjl->thj", q_lat, c[idx]) + torch.einsum("thr,tjr->thj", q_pe, k_pe[idx])
            scores = scores.masked_fill((sel < 0)[:, None, :], float("-inf"))
            probs = (scores * attn.scale).float().softmax(-1).to(c.dtype)
            out_lat = torch.einsum("thj,tjl->thl", probs, c[idx])
        return torch.einsum("thl,hvl->thv", out_lat, w_uv)


class TritonAttention:
    """The kernel path: all local tokens at once, one absorbed sparse MLA over the latent pool.

    ``prefill_kernel``: "auto" lets ``kernels.sparse_mla`` take the Gluon kernel for Hopper on prefill-sized
    calls; "triton" keeps the Triton kernel (``--sparse-mla-prefill triton``, an ablation). ``fused_projections``
    (``--mla-fused-projections on``), outside static decode batches, when o_proj is an fp8 layer: the value's W_UV
    product with o_proj's act_quant in its epilogue (``kernels.mla_value``) instead of torch's bmm and act_quant.
    The query side's kernel (``kernels.mla_query``) measured slower than its two passes and is not used."""

    name = "triton"
    supports_static_decode = True

    def __init__(self, prefill_kernel: str = "auto", fused_projections: bool = False):
        self.prefill_kernel = prefill_kernel
        self.fused_projections = fused_projections

    @staticmethod
    def _block(attn: MLAttention) -> int:
        """Tokens per sparse_mla call (bounds the absorbed-query buffer)."""
        return max(1, _ATTN_BLOCK_ELEMS // (attn.n_heads * (attn.kv_lora + attn.rope)))

    def query_rope_out(self, attn: MLAttention, q_pe: torch.Tensor) -> torch.Tensor | None:
        """Where MLA writes its roped q_pe [n, H, rope]: the rope columns of a fresh absorbed-query buffer
        [n, H, L + rope], which ``attend`` recognizes and fills with the latent part (saving a copy per layer),
        or None (more tokens than one sparse_mla call takes: MLA leaves q_pe un-roped and ``attend`` ropes each
        block's rows into the block's buffer; roping all n in place and copying each block cost ~2.7 ms of
        strided copies per 16K-token chunk on H200)."""
        n, L = q_pe.shape[0], attn.kv_lora
        if n > self._block(attn):
            return None
        return torch.empty(n, attn.n_heads, L + attn.rope, dtype=q_pe.dtype, device=q_pe.device)[..., L:]

    @staticmethod
    def _query_buffer_of(attn: MLAttention, q_pe: torch.Tensor) -> torch.Tensor | None:
        """The whole [n, H, L + rope] buffer when q_pe is the rope part of one (``query_rope_out``), else None."""
        n, H, L, r = q_pe.shape[0], attn.n_heads, attn.kv_lora, attn.rope
        if q_pe.shape != (n, H, r) or q_pe.stride() != (H * (L + r), L + r, 1) or q_pe.storage_offset() != L:
            return None
        return torch.as_strided(q_pe, (n, H, L + r), (H * (L + r), L + r, 1), 0)

    def attend(self, attn: MLAttention, q_nope, q_pe, index_q, index_w, batch: ForwardBatch,
               cache: LayerCache, q_rope: QueryRope | None = None,
               fp8_out: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        n = q_nope.shape[0]
        if attn.indexer is None:                                                 # GLM "shared" layer
            slots = _shared_topk(attn, batch.scratch, "topk_slots")
        elif batch.static:                                                       # decode, CUDA-graph safe
            slots = attn.indexer.decode_topk_slots(index_q, index_w, batch, cache)  # [n, index_topk] int32
            batch.scratch["topk_slots"] = slots
        else:
            slots = attn.indexer.topk_slots(index_q, index_w, batch, cache)      # [n, width] int32
            batch.scratch["topk_slots"] = slots
        w_uk, w_uv = attn.w_kv_b()                                               # [H, nope, L], [H, v, L]
        L, H = attn.kv_lora, attn.n_heads
        value_fp8 = fp8_out and self.fused_projections and not batch.static
        if value_fp8:                                    # o_proj's input, only as act_quant's output
            out_q = torch.empty(n, H * attn.v_dim, dtype=torch.float8_e4m3fn, device=q_nope.device)
            out_s = torch.empty(n, -(-H * attn.v_dim // VALUE_GROUP), dtype=torch.float32, device=q_nope.device)
        else:
            out = torch.empty(n, H, attn.v_dim, dtype=q_nope.dtype, device=q_nope.device)
        block = self._block(attn)
        # MLA roped q_pe into our buffer (query_rope_out), or left the rope to us (q_rope; q_pe un-roped)
        q_abs_buf = self._query_buffer_of(attn, q_pe) if q_rope is None else None
        has_pe = q_abs_buf is not None
        if not has_pe:
            q_abs_buf = torch.empty(min(n, block), H, L + attn.rope, dtype=q_nope.dtype, device=q_nope.device)
        for s in range(0, n, block):
            e = min(n, s + block)
            q_abs = q_abs_buf[: e - s]                                           # [t, H, L + rope]
            with phase("dense_gemm"):
                # head-batched GEMMs read and write the [t, H, *] layouts in place (strided batches):
                # no permuted copies of q, no cat of the 576-wide queries
                torch.bmm(q_nope[s:e].transpose(0, 1), w_uk, out=q_abs[..., :L].transpose(0, 1))  # [H, t, L]
                if q_rope is not None:                                           # roped once, into place
                    q_rope.rows(q_pe, s, e, out=q_abs[..., L:])
                elif not has_pe:                                                 # q_pe roped elsewhere
                    q_abs[..., L:] = q_pe[s:e]
            with phase("sparse_attn"):
                out_lat, _ = sparse_mla(q_abs, cache.latent, slots[s:e], attn.scale, d_v=L,
                                        prefill_kernel=self.prefill_kernel)  # [t, H, L]
            with phase("dense_gemm"):
                if value_fp8:                            # per head out_lat @ W_UV^T, act_quant in the epilogue
                    value_proj_fp8(out_lat, w_uv, out=(out_q[s:e], out_s[s:e]))
                else:
                    torch.bmm(out_lat.transpose(0, 1), w_uv.transpose(1, 2), out=out[s:e].transpose(0, 1))  # [H, t, v]
        return (out_q, out_s) if value_fp8 else out
