"""Top-k over ragged logits rows.

Measured first with torch.topk (see docs/BENCHMARKS.md, "Kernels"): the GPU path is torch.topk on rows that
the logits kernel has already set to -inf outside [ks, ke), followed by a cheap validity fix-up; a custom
kernel replaces it only if the profile says so.
"""

from __future__ import annotations

import torch


def topk_indices_gpu(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int, offset=0,
                     assume_masked: bool = False) -> torch.Tensor:
    """torch.topk path for CUDA tensors; same contract as ``reference.topk_indices``.

    With ``assume_masked`` the caller promises logits are -inf outside each row's range (mqa_logits
    output), which skips one full pass over the [S, N] matrix.
    """
    s, n = logits.shape
    kk = min(k, n)
    if assume_masked:
        src = logits
    else:
        cols = torch.arange(n, device=logits.device)
        valid = (cols[None, :] >= ks[:, None]) & (cols[None, :] < ke[:, None])
        src = logits.masked_fill(~valid, float("-inf"))
    idx = torch.topk(src, kk, dim=1, sorted=False).indices  # [S, kk] int64
    # a picked column is valid iff it lies in the row's range (-inf ties may pick invalid columns)
    ok = (idx >= ks[:, None].long()) & (idx < ke[:, None].long())
    if isinstance(offset, torch.Tensor):
        idx = idx + offset.to(idx.device).long().reshape(-1, 1)
    elif offset:
        idx = idx + int(offset)
    out = torch.where(ok, idx, torch.full_like(idx, -1)).to(torch.int32)
    if kk < k:
        out = torch.cat([out, torch.full((s, k - kk), -1, dtype=torch.int32, device=out.device)], dim=1)
    return out
