"""Indexer top-k by a per-query threshold: the PyTorch reference of the planned fused path.

Design (benchmarks/KERNELS_NOTES.md, "Next: a fused top-k that costs one compare per logit"): the logits of
every m-th 64-key tile give each query a threshold T that about ``margin * k`` of its keys reach; the logits
kernel's epilogue then appends only the keys with logit >= T to a per-query candidate buffer of ``cap`` slots;
the top-k of the candidates is the exact top-k of the row whenever k_eff <= count <= cap (every key above the
k-th largest, and every key tied with it, is >= T, so the tie rule sees the same ties). Rows outside that
window are redone exactly. Memory: the sample and the candidates, O(S x k); no [S x Skv] buffer.

This module holds the host-side steps and a reference of the kernel's filter, so the algorithm and its tie
rule are tested on the CPU (tests/kernels/test_threshold_topk.py) before the Gluon epilogue exists. Nothing
in the engine calls it yet.
"""

from __future__ import annotations

import math

import torch

from .reference import select_topk_ordered

TILE = 64  # keys per logits tile: the unit the sample takes or skips


def sample_stride(n_keys: int, k: int, per_row: int = 4) -> int:
    """m: every m-th tile is sampled, so a row of ``n_keys`` keys gets about ``per_row * k`` samples at most."""
    tiles = max(1, math.ceil(n_keys / TILE))
    return max(1, tiles * TILE // (per_row * k))


def sampled_columns(n_keys: int, m: int, device=None) -> torch.Tensor:
    """Columns of tiles 0, m, 2m, ... (int64 [n_s]), cut at n_keys."""
    starts = torch.arange(0, n_keys, m * TILE, device=device)
    cols = (starts[:, None] + torch.arange(TILE, device=device)[None, :]).reshape(-1)
    return cols[cols < n_keys]


def row_valid(ks: torch.Tensor, ke: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[S, len(cols)] bool: column inside the row's [ks, ke)."""
    return (cols[None, :] >= ks[:, None].long()) & (cols[None, :] < ke[:, None].long())


def thresholds(sample: torch.Tensor, sample_valid: torch.Tensor, n_valid: torch.Tensor, k: int,
               margin: float = 2.0) -> torch.Tensor:
    """T [S] fp32 from the sampled logits [S, n_s] (``sample_valid`` marks the row's own keys): the r-th largest
    valid sample, with r chosen so that about ``margin * k`` of the row's ``n_valid`` keys reach it. Rows with
    at most k keys, or no valid sample, get -inf (every key is a candidate)."""
    n_s = sample_valid.sum(1)  # [S]
    masked = torch.where(sample_valid, sample.float(), torch.full_like(sample, float("-inf"), dtype=torch.float32))
    r = torch.ceil(margin * k * n_s.double() / n_valid.clamp_min(1).double()).long()
    r = torch.minimum(r.clamp_min(1), n_s.clamp_min(1))  # 1 <= r <= the row's valid samples
    ordered = torch.sort(masked, dim=1, descending=True).values  # [S, n_s]
    t = torch.gather(ordered, 1, (r - 1).clamp_min(0)[:, None]).squeeze(1)
    take_all = (n_valid <= k) | (n_s == 0)
    return torch.where(take_all, torch.full_like(t, float("-inf")), t)


def filter_candidates(logits: torch.Tensor, valid: torch.Tensor, t: torch.Tensor, cap: int):
    """Reference of the kernel's epilogue filter: the valid columns with logit >= T[row], at most ``cap`` a row
    (the kernel counts past cap but stores no more). -> (positions int64 [S, cap] -1 padded, values fp32
    [S, cap], count int64 [S] = every key that passed, stored or not)."""
    keep = valid & (logits.float() >= t[:, None])  # [S, N]
    count = keep.sum(1)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :cap]  # passing columns first
    stored = torch.gather(keep, 1, order)
    pos = torch.where(stored, order, torch.full_like(order, -1))
    val = torch.where(stored, torch.gather(logits.float(), 1, order), torch.full_like(order, 0, dtype=torch.float32))
    return pos, val, count


def select_candidates(pos: torch.Tensor, val: torch.Tensor, count: torch.Tensor, n_valid: torch.Tensor, k: int):
    """Top-k of each row's candidates by (logit descending, position descending), -1 padded to k: int64 [S, k];
    and ``redo`` [S] bool, the rows whose candidates do not hold their exact top-k (fewer than min(k, n_valid)
    passed, or more than the buffer holds)."""
    cap = pos.shape[1]
    redo = (count < torch.clamp(n_valid, max=k)) | (count > cap)
    ok = pos >= 0
    # (value desc, position desc): sort by position descending, then stably by value descending
    by_pos = torch.sort(torch.where(ok, pos, torch.full_like(pos, -1)), dim=1, descending=True)
    v = torch.gather(torch.where(ok, val, torch.full_like(val, float("-inf"))), 1, by_pos.indices)
    by_val = torch.sort(v, dim=1, descending=True, stable=True).indices
    picked = torch.gather(by_pos.values, 1, by_val)[:, :k]  # [S, min(k, cap)]
    if picked.shape[1] < k:
        picked = torch.cat([picked, picked.new_full((picked.shape[0], k - picked.shape[1]), -1)], dim=1)
    return picked, redo


def threshold_topk_reference(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int,
                             cap: int | None = None, per_row: int = 4, margin: float = 2.0):
    """The whole planned path on dense logits [S, N] (the kernel never has them): sample every m-th tile,
    thresholds, filter into ``cap`` slots (default 4k), select, redo the rows outside the window exactly.
    -> (int64 [S, k] as ``select_topk_ordered(logits, valid, k)``, number of redone rows)."""
    s, n = logits.shape
    cap = cap or 4 * k
    cols = torch.arange(n, device=logits.device)
    valid = row_valid(ks, ke, cols)
    n_valid = valid.sum(1)
    scols = sampled_columns(n, sample_stride(n, k, per_row), logits.device)
    t = thresholds(logits[:, scols], valid[:, scols], n_valid, k, margin)
    pos, val, count = filter_candidates(logits, valid, t, cap)
    out, redo = select_candidates(pos, val, count, n_valid, k)
    if redo.any():
        out[redo] = select_topk_ordered(logits[redo], valid[redo], k)
    return out, int(redo.sum())
