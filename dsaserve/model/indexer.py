"""The lightning indexer: scores every visible key for each query and keeps the top-k.

score[t, j] = sum_h w[t, h] * relu(q[t, h] . k[j])   for keys j <= pos(t) of the same request
with w = weights_proj(x) * H^-0.5 * D^-0.5. Two numerics backends (``ModelBackends.indexer``):
  * ``ExactIndexer``: q, k in the model dtype (transformers' math; the test oracle),
  * ``Fp8Indexer``:   q, k Hadamard-rotated and quantized to e4m3 (per token-head scale for q, folded into w;
                      per token scale for k, kept in the cache) like DeepSeek's production path.

Selection, one request at a time or for every local token of a step:
  * ``Indexer.select``: the PyTorch scores (``torch_index_logits``) and the one PyTorch top-k
    (``dsaserve.kernels``' reference ``topk_indices``) -> key positions; the reference attention uses it,
  * ``Indexer.topk_slots``: key cache SLOTS for every local token, through the kernels (fp8 prefill: the
    fused ``mqa_topk_indices``, or ``mqa_logits`` + ``topk_indices`` with ``--indexer-topk unfused``; decode:
    ``paged_mqa_logits`` + ``topk_indices``); requests with at most index_topk keys get all of them. The
    Triton attention uses it.
  * ``Indexer.decode_topk_slots``: the same for a *static* decode batch (``ForwardBatch.static``), without
    reading anything on the host, so a CUDA graph can capture it: fixed width index_topk, logits over the
    whole block-table width masked past each row's context.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dsaserve.cache.kv_cache import LayerCache
from dsaserve.config import ModelConfig
from dsaserve.kernels import (
    hadamard_act_quant,
    indexer_key,
    indexer_query,
    mqa_logits,
    mqa_topk_indices,
    paged_mqa_logits,
    slots_of_positions,
    topk_indices,
)
from dsaserve.kernels.f32_linear import bf16_parts_needed, linear_f32
from dsaserve.kernels.reference import PAGE_SIZE as PAGED_LOGITS_PAGE_SIZE
from dsaserve.model.batch import ForwardBatch, IndexerLaunches
from dsaserve.model.layers import DenseLinear, LayerNorm, LinearFactory, apply_rope_half, apply_rope_interleaved
from dsaserve.profiling import phase

# Memory bound for one block of [queries, heads, keys] fp32 scores on the PyTorch path.
_SCORE_BLOCK_ELEMS = 1 << 25
# Kernel path: bound on one block of [queries, keys] fp32 logits (mqa_logits output, topk input).
_LOGITS_BLOCK_BYTES = 1 << 30
# Static decode, gathered keys: bound on one block's [rows, heads or head dim, key positions] elements.
_DECODE_BLOCK_ELEMS = 1 << 25
# A static decode step's top-k: the radix select (one program per row, its cost grows with the row's context)
# up to this many keys of block-table width, torch.topk (many blocks per row, a cost that grows slowly with the
# width) above it. H200, k = 2048, batch 1 (session 5, benchmarks/decode_kernels.py): radix 14 / 99 / 219 us at
# 4K / 32K / 64K keys, torch.topk 44 / 68 / 71 us. The runner applies DSASERVE_DECODE_RADIX_MAX_KEYS (benchmarks).
DECODE_RADIX_MAX_KEYS = 32768


class ExactIndexer:
    """Indexer numerics in the model dtype: q and k are used as projected."""

    name = "exact"
    fp8 = False          # the cache keeps index keys in the model dtype, without scales
    fused_topk = False   # the fused top-k kernel reads e4m3 keys only: PyTorch logits + top-k
    fused_key = True     # the key path (k_norm, RoPE) through ``kernels.indexer_key``: one launch on CUDA

    def quantize(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, head_dim: int):
        return q, w, k, None

    def quantize_query(self, q: torch.Tensor, w: torch.Tensor):
        return q, w


class Fp8Indexer:
    """DeepSeek's production numerics: Hadamard rotation, then e4m3 with per-(token, head) scales for q (folded
    into the head weights) and a per-token scale for k (kept in the cache next to the e4m3 key)."""

    name = "fp8"
    fp8 = True
    fused_key = True     # k_norm, RoPE, Hadamard and e4m3 of the key through ``kernels.indexer_key``

    def __init__(self, fused_topk: bool = True, topk_kernel: str = "auto", select_kernel: str = "auto",
                 filter_config=None, query_kernel: str = "triton"):
        # Prefill top-k on the kernel path: fused (``mqa_topk_indices``, no [queries x keys] logits buffer; its
        # ``kernel``: auto = the threshold top-k where it runs, or "triton", ``--indexer-topk fused-triton``) or,
        # for the ablation (``--indexer-topk unfused``), ``mqa_logits`` + ``topk_indices``. ``select_kernel``: the
        # threshold top-k's row kernels (``--indexer-select``: auto, gluon or triton; same results).
        # ``filter_config``: the threshold top-k's filter kernel launch (``indexer_logits_hopper.LogitsHopperConfig``,
        # None = its default; ``--indexer-mma-order``, ``--indexer-filter-regs``: the same candidates).
        # ``query_kernel``: ``kernels.indexer_query``'s kernel (``--indexer-query-kernel``: triton or gluon; the same
        # bits).
        self.fused_topk = fused_topk
        self.query_kernel = query_kernel
        self.topk_kernel = topk_kernel
        self.select_kernel = select_kernel
        self.filter_config = filter_config

    def quantize(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, head_dim: int):
        q8, w = self.quantize_query(q, w)
        k8, k_scale = hadamard_act_quant(k)  # k_scale [n, 1]
        return q8, w, k8, k_scale[..., 0]

    def quantize_query(self, q: torch.Tensor, w: torch.Tensor):
        q8, q_scale = hadamard_act_quant(q)  # q_scale [n, H, 1]; == act_quant(hadamard_rotate(q.float()), D)
        return q8, w * q_scale[..., 0]


IndexerNumerics = ExactIndexer | Fp8Indexer


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] along dim 0; fp8 tensors are gathered as bytes (fp8 indexing support varies by torch version)."""
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)[idx].view(t.dtype)
    return t[idx]


def dequantized_keys(keys: torch.Tensor, key_scale: torch.Tensor | None) -> torch.Tensor:
    """Index keys [T, D] (e4m3 + scale [T], or the model dtype) as fp32 values [T, D]."""
    kf = keys.float()
    return kf * key_scale[:, None] if key_scale is not None else kf


def torch_index_logits(q: torch.Tensor, w: torch.Tensor, keys_f32: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """The indexer score in PyTorch: q [t, H, D] (fp8 or float), w [t, H] fp32, keys_f32 [T, D] fp32 in
    position order, q_pos [t] -> fp32 logits [t, T], -inf for keys after the query's position."""
    scores = torch.einsum("thd,jd->thj", q.float(), keys_f32).relu_()           # [t, H, T]
    logits = torch.einsum("th,thj->tj", w, scores)                              # [t, T]
    key_pos = torch.arange(keys_f32.shape[0], device=q.device)
    return logits.masked_fill_(key_pos[None, :] > q_pos[:, None], float("-inf"))


def dense_slots(batch: ForwardBatch, tok: torch.Tensor, width: int) -> torch.Tensor:
    """All keys 0..pos of each token's own request as cache slots: tok [m] -> int32 [m, width], -1 beyond pos."""
    ps = batch.page_size
    bt = batch.block_tables[batch.token_req[tok]]                                # [m, max_pages]
    j = torch.arange(width, device=bt.device)                                    # key positions
    pages = (j // ps).clamp(max=bt.shape[1] - 1)                                 # beyond the table: masked below
    slots = bt[:, pages] * ps + j % ps                                           # [m, width]
    valid = j[None, :] <= batch.positions[tok][:, None]
    return torch.where(valid, slots, -1).to(torch.int32)


class Indexer(nn.Module):
    """Per-layer DSA indexer (``self_attn.indexer.*`` in the checkpoint)."""

    def __init__(self, cfg: ModelConfig, numerics: IndexerNumerics, linear: LinearFactory, dtype: torch.dtype,
                 device=None):
        super().__init__()
        self.numerics = numerics
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.rope_interleave = cfg.indexer_rope_interleave
        self.wq_b = linear(cfg.q_lora_rank, self.n_heads * self.head_dim, dtype, device)
        self.wk = linear(cfg.hidden_size, self.head_dim, dtype, device)
        self.k_norm = LayerNorm(self.head_dim, 1e-6, dtype, device)
        # transformers keeps weights_proj in fp32; the per-head weights are always computed in fp32.
        self.weights_proj = DenseLinear()(cfg.hidden_size, self.n_heads, torch.float32, device)
        self.weight_scale = self.n_heads ** -0.5 * self.head_dim ** -0.5
        self.weights_proj_parts = 3          # bf16 parts of weights_proj the prefill GEMM multiplies (weights_loaded)

    def weights_loaded(self) -> None:
        """Count the bf16 parts weights_proj needs (``f32_linear.bf16_parts_needed``: 1 for DeepSeek's bf16-stored
        weights), so that prefill's fp32 GEMM skips the all-zero ones. A device sync: once, after loading."""
        self.weights_proj_parts = bf16_parts_needed(self.weights_proj.weight)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # The rope part comes FIRST in the indexer (unlike MLA's q, where it is last).
        # in place on x (a fresh projection output): no cat of the rotated and the plain parts
        rot = x[..., : self.rope_dim]
        if self.rope_interleave:
            apply_rope_interleaved(rot, cos, sin, out=rot)
        else:
            apply_rope_half(rot, cos, sin, out=rot)
        return x

    def project(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                q_proj: torch.Tensor | None = None, k_proj: torch.Tensor | None = None):
        """x [n, hidden], qr [n, q_lora] -> (q [n, H, D], w [n, H] fp32, k [n, D], k_scale [n] fp32 | None).

        ``q_proj`` [n, H*D] = wq_b(qr) and ``k_proj`` [n, D] = wk(x) when the caller computed them in its fused
        GEMMs (q_proj is roped in place). With fp8 numerics q and k come back as e4m3 and q's scale is already
        folded into w.
        """
        n = x.shape[0]
        q_proj = self.wq_b(qr) if q_proj is None else q_proj
        k_proj = self.wk(x) if k_proj is None else k_proj
        q = q_proj.view(n, self.n_heads, self.head_dim)                               # [n, H, D]
        w = linear_f32(x, self.weights_proj.weight, self.weight_scale, parts=self.weights_proj_parts)  # [n, H] fp32
        if not self.numerics.fused_key:                                              # op by op (fp8_gap's probes)
            q = self._rope(q, cos, sin)
            return self.numerics.quantize(q, w, self._rope(self.k_norm(k_proj), cos, sin), self.head_dim)
        # one launch each for the key (k_norm, RoPE[, Hadamard + e4m3]) and the fp8 query (RoPE, Hadamard +
        # e4m3, its scale folded into w); the same values as the op-by-op path
        k, k_scale = indexer_key(k_proj, self.k_norm.weight, self.k_norm.bias, self.k_norm.eps, cos, sin,
                                 self.rope_interleave, quantize=self.numerics.fp8)   # [n, D] (e4m3 + [n])
        if self.numerics.fp8:
            q, w = indexer_query(q, cos, sin, self.rope_interleave, w, kernel=self.numerics.query_kernel)
        else:
            q = self._rope(q, cos, sin)
        return q, w, k, k_scale

    # ---- one request, PyTorch ------------------------------------------------------------------------
    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, key_scale: torch.Tensor | None,
               q_pos: torch.Tensor) -> torch.Tensor:
        """Top-k visible keys of one request's queries.

        q [t, H, D] (fp8 or float), w [t, H] fp32, keys [T, D] (the request's cached index keys in position
        order), key_scale [T] or None, q_pos [t] -> indices [t, min(topk, T)] int32 key positions, -1 where
        fewer than topk keys are visible.
        """
        t, T = q.shape[0], keys.shape[0]
        k = min(self.topk, T)
        kf = dequantized_keys(keys, key_scale)
        out = torch.empty(t, k, dtype=torch.int32, device=q.device)
        block = max(1, _SCORE_BLOCK_ELEMS // max(1, self.n_heads * T))
        for s in range(0, t, block):
            e = min(t, s + block)
            with phase("indexer_logits"):
                logits = torch_index_logits(q[s:e], w[s:e], kf, q_pos[s:e])                  # [tb, T]
            with phase("topk"):
                out[s:e] = topk_indices(logits, lengths=q_pos[s:e] + 1, k=k, backend="reference")
        return out

    # ---- every local token of a step, through the kernels --------------------------------------------
    def topk_slots(self, index_q: torch.Tensor, index_w: torch.Tensor, batch: ForwardBatch,
                   cache: LayerCache) -> torch.Tensor:
        """Top-k key cache slots of every local token -> int32 [n, width] (-1 = none; padding rows all -1).

        width = index_topk when any request has more keys than that, else its longest key count. Requests
        with at most index_topk keys attend to all of them; the others ask the indexer kernels.
        """
        n, dev = batch.num_tokens, batch.positions.device
        width = min(self.topk, max(batch.req_seq_lens, default=1))
        dense_reqs = [r for r, length in enumerate(batch.req_seq_lens) if length <= self.topk]
        sparse_reqs = [r for r, length in enumerate(batch.req_seq_lens) if length > self.topk]
        dense_tok = self._local_tokens(batch, dense_reqs, dense=True)

        def none_yet() -> torch.Tensor:
            return torch.full((n, width), -1, dtype=torch.int32, device=dev)    # [n, width], -1 = none

        slots = None  # made on first need: a prefill chunk of one long request returns its own slot tensor
        if dense_tok.numel():                                                    # few keys: attend to all of them
            slots = none_yet()
            slots[dense_tok] = dense_slots(batch, dense_tok, width)
        if sparse_reqs:
            if batch.is_decode and self.numerics.fp8 and batch.page_size == PAGED_LOGITS_PAGE_SIZE:
                tok = self._local_tokens(batch, sparse_reqs, dense=False)
                slots = none_yet() if slots is None else slots
                slots[tok] = self._decode_select_paged(index_q, index_w, batch, cache, tok)
            else:
                host_index = batch.req_token_index_host()
                for r, tok in enumerate(batch.req_token_index()):
                    if tok.numel() == 0 or batch.req_seq_lens[r] <= self.topk:
                        continue
                    key_slots = batch.key_slots(r)                               # [T] int64, position order
                    keys = gather_rows(cache.index_k, key_slots)
                    kscale = cache.index_scale[key_slots] if cache.index_scale is not None else None
                    pos_host = None if host_index is None else batch.host_positions[host_index[r]]
                    # the request's rows in a row: views instead of gathers, and (all rows) no scatter (a 16K
                    # chunk: index_put 0.17 ms + the q gather 0.08 ms a layer on H200, 2026-12-04 profile)
                    span = batch.req_token_span(r)
                    rows = tok if span is None else slice(*span)
                    q_r = gather_rows(index_q, tok) if span is None else index_q[rows].contiguous()
                    sel = self.select_kernels(q_r, index_w[rows].contiguous(), keys, kscale, batch.positions[rows],
                                              num_sms=batch.indexer_num_sms, launches=batch.indexer_launches,
                                              q_pos_host=pos_host)
                    # key positions -> cache slots through the request's block table in one launch (the torch
                    # form, key_slots[sel] under a where, ran ~6 kernels over [tokens, top-k] int64 temporaries)
                    bt = batch.block_tables[r:r + 1].expand(sel.shape[0], -1)
                    got = slots_of_positions(sel, bt, batch.page_size)           # [t, width] int32
                    if slots is None and span == (0, n) and got.shape[1] == width:
                        slots = got                                              # every row is this request's
                    else:
                        slots = none_yet() if slots is None else slots
                        slots[rows] = got
        return none_yet() if slots is None else slots

    def _local_tokens(self, batch: ForwardBatch, reqs: list[int], dense: bool) -> torch.Tensor:
        """Local token indices of requests ``reqs`` (those with <= index_topk keys when ``dense``, else the
        others): from the runner's host copies (no device->host sync), else by a mask on the device."""
        tok = batch.host_tokens_of(reqs)
        if tok is not None:
            return tok
        seq_lens = batch.scratch.get("req_seq_lens_t")
        if seq_lens is None:
            seq_lens = torch.tensor(batch.req_seq_lens, dtype=torch.long, device=batch.positions.device)
            batch.scratch["req_seq_lens_t"] = seq_lens
        real = batch.token_req >= 0
        tok_len = torch.where(real, seq_lens[batch.token_req.clamp(min=0)], 0)  # [n] keys of the token's request
        return (real & ((tok_len <= self.topk) if dense else (tok_len > self.topk))).nonzero(as_tuple=True)[0]

    def select_kernels(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, key_scale: torch.Tensor | None,
                       q_pos: torch.Tensor, num_sms: int | None = None,
                       launches: IndexerLaunches | None = None,
                       q_pos_host: torch.Tensor | None = None) -> torch.Tensor:
        """Kernel-path top-k of one request's queries: same arguments as ``select`` -> int32 [t, topk] key
        positions, -1 padded.

        fp8 (``key_scale`` given) with ``numerics.fused_topk``: one ``mqa_topk_indices`` call over keys
        [0, pos + 1) of each query, no logits buffer (ties at the k-th value go to the later key). Otherwise
        ``mqa_logits`` (fp8; exact mode: the PyTorch logits) then ``topk_indices``, queries in blocks of at
        most _LOGITS_BLOCK_BYTES of logits, each block reading only the keys its last query can see. The
        persistent fp8 kernels use ``num_sms`` SMs; each of their launches is counted in ``launches``.
        ``q_pos_host`` (the positions on the host) sizes the key ranges without a device->host sync.
        """
        t, T = q.shape[0], keys.shape[0]
        out = torch.empty(t, self.topk, dtype=torch.int32, device=q.device)
        if t == 0:
            return out
        fp8 = key_scale is not None
        if fp8 and self.numerics.fused_topk:
            ke = (q_pos + 1).to(torch.int32)                                    # [t] keys 0..pos
            ks = torch.zeros_like(ke)
            top = q_pos_host if q_pos_host is not None else q_pos
            hi = min(T, int(top.max()) + 1)                                     # keys any query can see
            if launches is not None:
                launches.add(num_sms)
            with phase("indexer_topk"):
                return mqa_topk_indices(q, keys[:hi], key_scale[:hi].float(), w, ks, ke, k=self.topk,
                                        num_sms=num_sms, kernel=self.numerics.topk_kernel, mark=phase,
                                        redo_rows=None if launches is None else launches.redo_counter(q.device),
                                        select=self.numerics.select_kernel,
                                        filter_config=self.numerics.filter_config)
                # [t, topk] positions
        block = max(1, _LOGITS_BLOCK_BYTES // (4 * T))
        if not fp8:
            block = min(block, max(1, _SCORE_BLOCK_ELEMS // (self.n_heads * T)))
        for s in range(0, t, block):
            e = min(t, s + block)
            ke = (q_pos[s:e] + 1).to(torch.int32)                               # [tb] keys 0..pos
            top = q_pos_host[s:e] if q_pos_host is not None else q_pos[s:e]
            hi = min(T, int(top.max()) + 1)                                     # keys this block can see
            ks = torch.zeros_like(ke)
            if fp8 and launches is not None:
                launches.add(num_sms)
            with phase("indexer_logits"):
                if fp8:
                    logits = mqa_logits(q[s:e], keys[:hi], key_scale[:hi].float(), w[s:e], ks, ke,
                                        num_sms=num_sms)                       # [tb, hi], -inf outside
                else:
                    logits = torch_index_logits(q[s:e], w[s:e], keys[:hi].float(), q_pos[s:e])  # [tb, hi]
            with phase("topk"):
                out[s:e] = topk_indices(logits, ks, ke, k=self.topk, assume_masked=True)
        return out

    # ---- a static decode batch (CUDA-graph safe) ------------------------------------------------------
    def decode_topk_slots(self, index_q: torch.Tensor, index_w: torch.Tensor, batch: ForwardBatch,
                          cache: LayerCache) -> torch.Tensor:
        """Top-k key cache slots of every row of a static decode batch -> int32 [n, index_topk] (-1 = none).

        Row i sees keys 0..context_lens[i]-1 through its block table (padding rows: none). Nothing is read
        on the host: fp8 keys in 64-token pages go through the paged logits kernel straight from the cache,
        other keys are gathered through the block table in blocks of positions; top-k then reads each row's
        valid range (rows with at most index_topk keys get all of them).
        """
        ctx, ps = batch.context_lens, batch.page_size                            # [n] int32
        bt = batch.block_tables                                                  # [n, W] int32
        with phase("indexer_logits"):
            if self.numerics.fp8 and ps == PAGED_LOGITS_PAGE_SIZE:
                d = cache.index_k.shape[1]
                logits = paged_mqa_logits(index_q, cache.index_k.view(-1, ps, d), cache.index_scale.view(-1, ps),
                                          index_w, ctx, bt, num_sms=batch.indexer_num_sms)   # [n, W * ps]
            else:
                logits = self._gathered_decode_logits(index_q, index_w, batch, cache)
        with phase("topk"):
            if logits.shape[1] > DECODE_RADIX_MAX_KEYS:                          # rows are -inf past ctx
                # column order, as the radix select returns them: the same keys in the same order at any width
                # (graph width classes, eager steps), so the attention sums them in the same order
                pos = topk_indices(logits, lengths=ctx, k=self.topk, assume_masked=True).sort(dim=1).values
            else:
                pos = topk_indices(logits, lengths=ctx, k=self.topk)                 # [n, topk], -1 padded
        return slots_of_positions(pos, bt, ps)

    def _gathered_decode_logits(self, q: torch.Tensor, w: torch.Tensor, batch: ForwardBatch,
                                cache: LayerCache) -> torch.Tensor:
        """Indexer logits of a static decode batch from keys gathered through the block table (exact keys, or
        fp8 keys in pages the paged kernel does not read): q [n, H, D], w [n, H] -> fp32 [n, W * page_size],
        -inf at and past each row's context length."""
        bt, ps = batch.block_tables, batch.page_size
        n, width = bt.shape
        span = width * ps
        dev = q.device
        out = torch.empty(n, span, dtype=torch.float32, device=dev)
        block = max(ps, _DECODE_BLOCK_ELEMS // max(1, n * max(self.n_heads, self.head_dim)) // ps * ps)
        qf = q.float()
        for s in range(0, span, block):
            e = min(span, s + block)
            pos = torch.arange(s, e, device=dev)                                 # [b]
            slots = (bt[:, pos // ps].long() * ps + pos % ps).flatten()          # [n * b]
            keys = gather_rows(cache.index_k, slots)
            kscale = cache.index_scale[slots] if cache.index_scale is not None else None
            kf = dequantized_keys(keys, kscale).view(n, e - s, -1)               # [n, b, D]
            scores = torch.einsum("nhd,nbd->nhb", qf, kf).relu_()                # [n, H, b]
            out[:, s:e] = torch.einsum("nh,nhb->nb", w, scores)
        cols = torch.arange(span, device=dev)
        return out.masked_fill_(cols[None, :] >= batch.context_lens[:, None], float("-inf"))

    def _decode_select_paged(self, index_q, index_w, batch: ForwardBatch, cache: LayerCache,
                             tok: torch.Tensor) -> torch.Tensor:
        """Decode top-k straight from the paged fp8 key cache (no gather): tok [m] -> int32 slots [m, topk]."""
        ps = batch.page_size
        bt = batch.block_tables[batch.token_req[tok]]                            # [m, max_pages] int64
        ctx = (batch.positions[tok] + 1).to(torch.int32)                         # keys 0..pos
        d = cache.index_k.shape[1]
        with phase("indexer_logits"):
            logits = paged_mqa_logits(gather_rows(index_q, tok), cache.index_k.view(-1, ps, d),
                                      cache.index_scale.view(-1, ps), index_w[tok], ctx, bt.to(torch.int32),
                                      num_sms=batch.indexer_num_sms)
        with phase("topk"):
            pos = topk_indices(logits, lengths=ctx, k=self.topk, assume_masked=True)  # [m, topk] positions
        return slots_of_positions(pos, bt, ps)
