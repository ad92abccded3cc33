"""The lightning indexer: scores every visible key for each query and keeps the top-k.

score[t, j] = sum_h w[t, h] * relu(q[t, h] . k[j])   for keys j <= pos(t) of the same request
with w = weights_proj(x) * H^-0.5 * D^-0.5. Two numerics modes:
  * exact: q, k in the model dtype (transformers' math; the test oracle),
  * fp8:   q, k Hadamard-rotated and quantized to e4m3 (per token-head scale for q, folded into w;
           per token scale for k, kept in the cache) like DeepSeek's production path.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dsaserve.config import ModelConfig
from dsaserve.model.layers import LayerNorm, apply_rope_half, apply_rope_interleaved, linear
from dsaserve.profiling import phase

# Memory bound for one block of [queries, heads, keys] fp32 scores on the reference path.
_SCORE_BLOCK_ELEMS = 1 << 25
# Kernel path: bound on one block of [queries, keys] fp32 logits (mqa_logits output, topk input).
_LOGITS_BLOCK_BYTES = 1 << 30


class Indexer(nn.Module):
    """Per-layer DSA indexer (``self_attn.indexer.*`` in the checkpoint)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.rope_interleave = cfg.indexer_rope_interleave
        self.wq_b = linear(cfg.q_lora_rank, self.n_heads * self.head_dim, dtype, device)
        self.wk = linear(cfg.hidden_size, self.head_dim, dtype, device)
        self.k_norm = LayerNorm(self.head_dim, 1e-6, dtype, device)
        # transformers keeps weights_proj in fp32; the per-head weights are always computed in fp32.
        self.weights_proj = linear(cfg.hidden_size, self.n_heads, torch.float32, device)
        self.weight_scale = self.n_heads ** -0.5 * self.head_dim ** -0.5

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # The rope part comes FIRST in the indexer (unlike MLA's q, where it is last).
        rot, rest = x[..., : self.rope_dim], x[..., self.rope_dim:]
        rot = apply_rope_interleaved(rot, cos, sin) if self.rope_interleave else apply_rope_half(rot, cos, sin)
        return torch.cat([rot, rest], dim=-1)

    def project(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp8: bool):
        """x [n, hidden], qr [n, q_lora] -> (q [n, H, D], w [n, H] fp32, k [n, D], k_scale [n] fp32 | None).

        In fp8 mode q and k come back as e4m3 and q's scale is already folded into w.
        """
        n = x.shape[0]
        q = self._rope(self.wq_b(qr).view(n, self.n_heads, self.head_dim), cos, sin)  # [n, H, D]
        k = self._rope(self.k_norm(self.wk(x)), cos, sin)                              # [n, D]
        w = self.weights_proj(x.float()) * self.weight_scale                          # [n, H]
        if not fp8:
            return q, w, k, None
        from dsaserve.kernels import act_quant, hadamard_rotate

        q8, q_scale = act_quant(hadamard_rotate(q.float()), block=self.head_dim)  # q_scale [n, H, 1]
        k8, k_scale = act_quant(hadamard_rotate(k.float()), block=self.head_dim)  # k_scale [n, 1]
        return q8, w * q_scale[..., 0], k8, k_scale[..., 0]

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, key_scale: torch.Tensor | None,
               q_pos: torch.Tensor) -> torch.Tensor:
        """Top-k visible keys of one request's queries.

        q [t, H, D] (fp8 or float), w [t, H] fp32, keys [T, D] (the request's cached index keys in position
        order), key_scale [T] or None, q_pos [t] -> indices [t, min(topk, T)] int64 key positions, -1 where
        fewer than topk keys are visible.
        """
        t, T = q.shape[0], keys.shape[0]
        k = min(self.topk, T)
        kf = keys.float()
        if key_scale is not None:
            kf = kf * key_scale[:, None]
        qf = q.float()
        out = torch.empty(t, k, dtype=torch.int64, device=q.device)
        block = max(1, _SCORE_BLOCK_ELEMS // max(1, self.n_heads * T))
        key_pos = torch.arange(T, device=q.device)
        for s in range(0, t, block):
            e = min(t, s + block)
            with phase("indexer_logits"):
                scores = torch.einsum("thd,jd->thj", qf[s:e], kf).relu_()      # [tb, H, T]
                logits = torch.einsum("th,thj->tj", w[s:e], scores)            # [tb, T]
                logits.masked_fill_(key_pos[None, :] > q_pos[s:e, None], float("-inf"))
            with phase("topk"):
                vals, idx = logits.topk(k, dim=-1)
                out[s:e] = idx.masked_fill_(vals == float("-inf"), -1)
        return out

    def select_kernels(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, key_scale: torch.Tensor | None,
                       q_pos: torch.Tensor, num_sms: int | None = None) -> torch.Tensor:
        """Kernel-path top-k of one request's queries: same arguments as ``select`` -> int32 [t, topk] key
        positions, -1 padded.

        fp8 (``key_scale`` given): ``mqa_logits`` with per-query key range [0, pos + 1) on the persistent
        kernel (``num_sms`` SMs), then ``topk_indices``. Exact mode keeps the torch logits (fp8 kernels
        only). Queries go in blocks of at most _LOGITS_BLOCK_BYTES of logits, each block reading only the
        keys its last query can see.
        """
        from dsaserve.kernels import mqa_logits, topk_indices

        t, T = q.shape[0], keys.shape[0]
        out = torch.empty(t, self.topk, dtype=torch.int32, device=q.device)
        if t == 0:
            return out
        fp8 = key_scale is not None
        block = max(1, _LOGITS_BLOCK_BYTES // (4 * T))
        if not fp8:
            block = min(block, max(1, _SCORE_BLOCK_ELEMS // (self.n_heads * T)))
        for s in range(0, t, block):
            e = min(t, s + block)
            ke = (q_pos[s:e] + 1).to(torch.int32)                               # [tb] keys 0..pos
            hi = min(T, int(ke.max()))                                          # keys this block can see
            ks = torch.zeros_like(ke)
            with phase("indexer_logits"):
                if fp8:
                    logits = mqa_logits(q[s:e], keys[:hi], key_scale[:hi].float(), w[s:e], ks, ke,
                                        num_sms=num_sms)                       # [tb, hi], -inf outside
                else:
                    scores = torch.einsum("thd,jd->thj", q[s:e].float(), keys[:hi].float()).relu_()
                    logits = torch.einsum("th,thj->tj", w[s:e], scores)        # [tb, hi]
                    cols = torch.arange(hi, device=q.device)
                    logits.masked_fill_(cols[None, :] >= ke[:, None], float("-inf"))
            with phase("topk"):
                out[s:e] = topk_indices(logits, ks, ke, k=self.topk, assume_masked=True)
        return out
