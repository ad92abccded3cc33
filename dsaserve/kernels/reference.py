"""PyTorch references for every dsaserve kernel: the executable spec the Triton kernels are tested against.

These run on any device (the CPU path of the model uses them directly). They favour clarity over speed,
but stay memory-conscious where a reference is used on real sizes (``mqa_logits`` works in query chunks).
Semantics follow docs/DSA_MODEL.md (shared docs): e4m3 activations with one fp32 scale per 128 values,
ReLU-weighted MQA logits over per-row key ranges, top-k over ragged rows, sparse MLA in the absorbed
576/512 latent space with a log-sum-exp for merging.
"""

from __future__ import annotations


import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
AMAX_MIN = 1e-4  # amax floor: an all-zero group must not produce a zero scale
PAGE_SIZE = 64  # tokens per page of the paged indexer-key cache


def ue8m0_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to a power of two, exactly: 2^ceil(log2(scale)).

    ``torch.ceil(torch.log2(s))`` can miss by one for values a few ulps above a power of two (log2 rounds
    to the integer), so the exponent is taken from ``frexp`` instead: s = m * 2^e with m in [0.5, 1), and
    ceil(log2 s) = e - 1 exactly when m == 0.5.
    """
    mant, exp = torch.frexp(scale)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    return torch.ldexp(torch.ones_like(scale), exp)


def act_quant(x: torch.Tensor, block: int = 128, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last dim of ``x`` to e4m3 in groups of ``block`` values (the whole row when shorter).

    Returns (x_fp8 [..., N] float8_e4m3fn, scale fp32 [..., ceil(N / block)]) with x ~= x_fp8 * scale.
    """
    n = x.shape[-1]
    g = min(block, n)
    ngroups = (n + g - 1) // g
    pad = ngroups * g - n
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    xg = xf.reshape(*x.shape[:-1], ngroups, g)  # [..., groups, g]
    amax = xg.abs().amax(dim=-1).clamp_min(AMAX_MIN)  # [..., groups]
    # tensor / tensor: IEEE division on every device (CUDA turns division by a Python scalar into a
    # multiplication by its reciprocal, which differs in the last bit)
    scale = amax / torch.full_like(amax, FP8_MAX)
    if ue8m0:
        scale = ue8m0_scale(scale)
    q = (xg / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(*x.shape[:-1], ngroups * g)[..., :n]
    return q.contiguous(), scale


def act_dequant(x_fp8: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of :func:`act_quant` (fp32 out)."""
    n = x_fp8.shape[-1]
    g = min(block, n)
    s = scale.repeat_interleave(g, dim=-1)[..., :n]
    return x_fp8.float() * s


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard transform of the last dim (size a power of two), in x's dtype.

    Butterflies in fp32: after step h, pairs (a, b) at distance h become (a + b, a - b); the final scale
    D^-0.5 makes the transform orthonormal (so it changes nothing for unquantized dot products).
    """
    d = x.shape[-1]
    if d <= 0 or d & (d - 1):
        raise ValueError(f"hadamard_rotate: last dim {d} is not a power of two; pad the head dim to one")
    y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) * d**-0.5).to(x.dtype)


def mqa_logits(
    q_fp8: torch.Tensor,
    k_fp8: torch.Tensor,
    k_scale: torch.Tensor,
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    chunk: int = 256,
) -> torch.Tensor:
    """logits[i, j] = k_scale[j] * sum_h weights[i, h] * relu(q[i, h] . k[j]) for ks[i] <= j < ke[i], else -inf.

    q_fp8 [S, H, D], k_fp8 [Skv, D], k_scale [Skv], weights [S, H], ks/ke [S] -> fp32 [S, Skv].
    Computed in fp32 over query chunks so the [chunk, H, Skv] intermediate stays bounded.
    """
    s, h, d = q_fp8.shape
    skv = k_fp8.shape[0]
    kf = k_fp8.float()  # [Skv, D]
    out = torch.empty(s, skv, dtype=torch.float32, device=q_fp8.device)
    cols = torch.arange(skv, device=q_fp8.device)
    for i0 in range(0, s, chunk):
        qf = q_fp8[i0 : i0 + chunk].float()  # [c, H, D]
        dots = torch.einsum("chd,kd->chk", qf, kf).relu_()  # [c, H, Skv]
        row = torch.einsum("chk,ch->ck", dots, weights[i0 : i0 + chunk].float()) * k_scale.float()[None, :]
        valid = (cols[None, :] >= ks[i0 : i0 + chunk, None]) & (cols[None, :] < ke[i0 : i0 + chunk, None])
        out[i0 : i0 + chunk] = torch.where(valid, row, torch.full_like(row, float("-inf")))
    return out


def paged_mqa_logits(
    q_fp8: torch.Tensor,
    k_cache_fp8: torch.Tensor,
    k_scale_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
) -> torch.Tensor:
    """Decode logits over a paged key cache: one query per request, keys 0..context_lens[b]-1.

    q_fp8 [B, H, D], k_cache_fp8 [num_pages, 64, D], k_scale_cache [num_pages, 64], weights [B, H],
    context_lens [B], block_table [B, max_pages] -> fp32 [B, max_pages * 64] (-inf beyond the context).
    """
    b, h, d = q_fp8.shape
    max_pages = block_table.shape[1]
    n = max_pages * PAGE_SIZE
    out = torch.full((b, n), float("-inf"), dtype=torch.float32, device=q_fp8.device)
    for r in range(b):
        length = int(context_lens[r])
        if length <= 0:
            continue
        npages = (length + PAGE_SIZE - 1) // PAGE_SIZE
        pages = block_table[r, :npages].long()
        k = k_cache_fp8[pages].reshape(-1, d)[:length].float()  # [len, D]
        sc = k_scale_cache[pages].reshape(-1)[:length].float()  # [len]
        dots = (q_fp8[r].float() @ k.T).relu_()  # [H, len]
        out[r, :length] = (weights[r].float()[:, None] * dots).sum(0) * sc
    return out


def topk_indices(
    logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int, offset: int | torch.Tensor = 0
) -> torch.Tensor:
    """Top-k column indices per row among the valid columns ks[i] <= j < ke[i], as int32 [S, k].

    Rows with fewer than k valid columns are padded with -1. ``offset`` (int or [S] tensor) is added to
    every returned (valid) index, so callers can ask for absolute positions. Order within a row: by
    descending logit (ties in torch.topk's order).
    """
    s, n = logits.shape
    cols = torch.arange(n, device=logits.device)
    valid = (cols[None, :] >= ks[:, None].long()) & (cols[None, :] < ke[:, None].long())  # [S, N]
    masked = torch.where(valid, logits.float(), torch.full_like(logits, float("-inf"), dtype=torch.float32))
    kk = min(k, n)
    idx = torch.topk(masked, kk, dim=1).indices  # [S, kk]
    picked_valid = torch.gather(valid, 1, idx)
    if isinstance(offset, torch.Tensor):
        idx = idx + offset.to(idx.device).long().reshape(-1, 1)
    else:
        idx = idx + int(offset)
    idx = torch.where(picked_valid, idx, torch.full_like(idx, -1)).to(torch.int32)
    if kk < k:
        idx = torch.cat([idx, torch.full((s, k - kk), -1, dtype=torch.int32, device=idx.device)], dim=1)
    return idx


def select_topk_ordered(logits: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k columns per row by (logit descending, column descending) among ``valid`` columns.

    The tie rule of the fused indexer top-k: of columns with equal logits the later (higher) column wins,
    i.e. the more recent key. logits fp32 [S, N], valid bool [S, N] -> int64 [S, k], -1 padded; a row lists
    its picks in that order. Two stable sorts give it: by logit over the column-reversed row (ties keep
    the reversed, i.e. descending-column, order), then valid columns before invalid ones.
    """
    s, n = logits.shape
    kk = min(k, n)
    rev = logits.float().flip(1)  # [S, N]: position p holds column n - 1 - p
    order = torch.sort(rev, dim=1, descending=True, stable=True).indices  # [S, N]
    ok = torch.gather(valid.flip(1), 1, order)
    order = torch.gather(order, 1, torch.sort((~ok).to(torch.uint8), dim=1, stable=True).indices)
    ok = torch.gather(valid.flip(1), 1, order)[:, :kk]
    idx = torch.where(ok, (n - 1) - order[:, :kk], torch.full_like(order[:, :kk], -1))
    if kk < k:
        idx = torch.cat([idx, torch.full((s, k - kk), -1, dtype=idx.dtype, device=idx.device)], dim=1)
    return idx


def mqa_topk_indices(
    q_fp8: torch.Tensor,
    k_fp8: torch.Tensor,
    k_scale: torch.Tensor,
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    k: int,
    offset: int | torch.Tensor = 0,
    chunk: int = 256,
) -> torch.Tensor:
    """Top-k keys of the indexer logits (``mqa_logits``) per query, by ``select_topk_ordered``'s rule.

    Same inputs as ``mqa_logits`` plus k and ``offset`` (int or [S], added to valid indices) -> int32 [S, k],
    -1 padded, each row in (logit desc, column desc) order. Works in query chunks, so the [chunk, Skv]
    logits block is the only large intermediate.
    """
    s = q_fp8.shape[0]
    skv = k_fp8.shape[0]
    out = torch.empty(s, k, dtype=torch.int32, device=q_fp8.device)
    cols = torch.arange(skv, device=q_fp8.device)
    offs = offset.to(q_fp8.device).long().reshape(-1) if isinstance(offset, torch.Tensor) else None
    for i0 in range(0, s, chunk):
        i1 = min(s, i0 + chunk)
        logits = mqa_logits(q_fp8[i0:i1], k_fp8, k_scale, weights[i0:i1], ks[i0:i1], ke[i0:i1], chunk=chunk)
        valid = (cols[None, :] >= ks[i0:i1, None].long()) & (cols[None, :] < ke[i0:i1, None].long())
        idx = select_topk_ordered(logits, valid, k)  # [c, k] int64
        add = offs[i0:i1, None] if offs is not None else int(offset)
        out[i0:i1] = torch.where(idx >= 0, idx + add, torch.full_like(idx, -1)).to(torch.int32)
    return out


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention in the absorbed latent space (all heads share one latent key/value per slot).

    q [t, h, d_qk], kv [slots, d_qk], indices int32 [t, topk] (-1 = invalid) ->
    out [t, h, d_v] (q's dtype) = softmax(sm_scale * q . kv[idx]) @ kv[idx, :d_v], lse fp32 [t, h]
    (natural log). Rows with no valid index: out = 0, lse = -inf. Softmax in fp32.
    """
    t, h, dqk = q.shape
    out = torch.empty(t, h, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(t, h, dtype=torch.float32, device=q.device)
    for i0 in range(0, t, chunk):
        idx = indices[i0 : i0 + chunk].long()  # [c, topk]
        valid = idx >= 0
        kvs = kv[idx.clamp_min(0)].float()  # [c, topk, dqk]
        s = torch.einsum("chd,ckd->chk", q[i0 : i0 + chunk].float(), kvs) * sm_scale  # [c, h, topk]
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
        m = s.amax(dim=-1, keepdim=True)  # [c, h, 1]
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m_safe)
        l = p.sum(-1, keepdim=True)  # [c, h, 1]
        o = torch.einsum("chk,ckd->chd", p, kvs[..., :d_v]) / l.clamp_min(1e-30)
        lse_c = (m_safe + torch.log(l)).squeeze(-1)  # log(0) = -inf for empty rows
        out[i0 : i0 + chunk] = torch.where(l > 0, o, torch.zeros_like(o)).to(q.dtype)
        lse[i0 : i0 + chunk] = lse_c
    return out, lse


def merge_attn_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention results over disjoint key sets: outs [n, t, h, d] fp32, lses [n, t, h]."""
    lse = torch.logsumexp(lses, dim=0)  # [t, h]
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.exp(lses - lse_safe[None])  # [n, t, h]; exp(-inf) = 0 for empty parts
    out = (w[..., None] * outs).sum(0)
    return out, lse


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm in fp32 as transformers computes it, with the residual add first when given:
    r = residual + x (x's dtype); y = weight * (r * rsqrt(mean(r^2) + eps)).to(x's dtype) -> (y, r or None)."""
    if residual is not None:
        x = residual = residual + x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE of x [n, ..., D] with cos / sin [n, D/2] (one angle per rotated pair), in x's dtype.

    interleaved: pairs (x[2i], x[2i+1]), output laid out as (rotated evens | rotated odds) like transformers'
    DeepSeek code; else "rotate half": pairs (x[i], x[i + D/2])."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def moe_route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
              norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's noaux_tc expert selection from router logits [n, E] fp32 -> (ids [n, k] int64, weights [n, k]
    fp32): sigmoid scores, + correction bias for the choice only, group-limited (top-2 sum per group, keep
    topk_group groups), top_k experts, weights = their scores (normalized when norm_topk_prob) x scaling."""
    scores = logits.sigmoid()                                                   # [n, E]
    biased = scores + bias
    n, e = biased.shape
    if n_group > 1:
        groups = biased.view(n, n_group, e // n_group)
        group_scores = groups.topk(2, dim=-1).values.sum(-1)                    # [n, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        biased = biased.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = biased.topk(top_k, dim=-1).indices                                    # [n, k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


def slots_of_positions(pos: torch.Tensor, block_tables: torch.Tensor, page_size: int) -> torch.Tensor:
    """Key positions pos [m, k] (-1 = none) -> int32 cache slots [m, k] (-1 kept) through each row's block
    table [m, W]: slot = block_tables[row, pos // page_size] * page_size + pos % page_size."""
    p = pos.clamp(min=0).long()
    slot = block_tables.long().gather(1, p // page_size) * page_size + p % page_size
    return torch.where(pos >= 0, slot, -1).to(torch.int32)


def indexer_key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, cos: torch.Tensor,
                sin: torch.Tensor, interleaved: bool, quantize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The indexer's key from its projection x [n, D]: LayerNorm in fp32 (weight, bias) rounded to x's dtype,
    RoPE of the first 2 * cos.shape[1] dims (cos / sin [n, rope/2]), then with ``quantize`` the Hadamard
    rotation and one e4m3 scale per key -> (key [n, D] in x's dtype or e4m3, scale [n] fp32 or None)."""
    d, rope_dim = x.shape[-1], 2 * cos.shape[-1]
    y = torch.nn.functional.layer_norm(x.float(), (d,), weight.float(), bias.float(), eps).to(x.dtype)
    y = torch.cat([rope(y[:, :rope_dim], cos, sin, interleaved), y[:, rope_dim:]], dim=-1)
    if not quantize:
        return y, None
    q, scale = act_quant(hadamard_rotate(y.float()), block=d)
    return q, scale[:, 0]


def indexer_query(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                  weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 indexer's query from its projection q [n, H, D]: RoPE of the first 2 * cos.shape[1] dims (in q's
    dtype), then the Hadamard rotation and one e4m3 scale per (token, head), the scale folded into the head
    weights [n, H] fp32 -> (q e4m3 [n, H, D], weights * scale [n, H])."""
    rope_dim = 2 * cos.shape[-1]
    y = torch.cat([rope(q[..., :rope_dim], cos, sin, interleaved), q[..., rope_dim:]], dim=-1)
    q8, scale = act_quant(hadamard_rotate(y.float()), block=q.shape[-1])
    return q8, weights * scale[..., 0]


def mla_latent(kv: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool) -> torch.Tensor:
    """MLA's cache row from the kv_a projection kv [n, L + R]: [rms_norm(kv[:, :L]) | rope(kv[:, L:])]."""
    lat = weight.shape[0]
    return torch.cat([rms_norm(kv[:, :lat], weight, eps)[0], rope(kv[:, lat:], cos, sin, interleaved)], dim=-1)


def write_cache_rows(slots: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """dest[slots[i]] = values[i] for each (dest, values) pair and every slot >= 0 (fp8 as bytes)."""
    keep = slots >= 0
    for dest, values in pairs:
        if dest.dtype == torch.float8_e4m3fn:
            dest, values = dest.view(torch.uint8), values.view(torch.uint8)
        dest[slots[keep]] = values[keep]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: silu(gate) * up of gate_up [n, 2I] = gate | up, in its dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def tile_split(ks: torch.Tensor, ke: torch.Tensor, skv: int, bq: int, bkv: int, programs: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``kernels.tile_split.tile_split``: the live key tiles of all query blocks, numbered in block
    order, split evenly over ``programs``.

    ks / ke int32 [S]: each row's key range, clamped to [0, skv); blocks of ``bq`` rows; a block's live tiles
    are [kb_lo, kb_hi): the ``bkv``-key tiles holding a key some row of the block sees (none: kb_hi = kb_lo =
    min live start // bkv, or skv // bkv). -> (blk int32 [2 n_qb + 1]: the prefix sums of the blocks' tile counts
    (n_qb + 1) then each block's kb_lo; prog int32 [programs, 4]: each program's first block b0, end block b1 and
    share [t0, t1) = [T p / P, T (p + 1) / P) of the T tile numbers). b0 is the block holding tile t0, or an
    earlier empty block starting at t0; b1 the first block starting at or after t1 (the last program: n_qb)."""
    s = ks.shape[0]
    n_qb = -(-s // bq)
    dev = ks.device
    ks_c = ks.to(torch.int64).clamp(min=0)
    ke_c = ke.to(torch.int64).clamp(max=skv)
    live = ke_c > ks_c
    pad = n_qb * bq - s  # rows past S: not live
    lo = torch.nn.functional.pad(torch.where(live, ks_c, skv), (0, pad), value=skv).view(n_qb, bq).amin(1)
    hi = torch.nn.functional.pad(torch.where(live, ke_c, 0), (0, pad), value=0).view(n_qb, bq).amax(1)
    kb_lo = lo // bkv
    kb_hi = torch.where(hi > lo, (hi + bkv - 1) // bkv, kb_lo)
    prefix = torch.zeros(n_qb + 1, dtype=torch.int64, device=dev)
    prefix[1:] = torch.cumsum(kb_hi - kb_lo, 0)
    cuts = prefix[-1] * torch.arange(programs + 1, device=dev) // programs  # [P + 1]
    t0, t1 = cuts[:-1], cuts[1:]
    b0 = torch.minimum(torch.searchsorted(prefix[1:], t0, right=True), torch.searchsorted(prefix[:-1], t0))
    b1 = torch.searchsorted(prefix[:-1], t1)
    b1[-1] = n_qb
    return torch.cat([prefix, kb_lo]).to(torch.int32), torch.stack([b0, b1, t0, t1], 1).to(torch.int32).contiguous()
