"""Context-parallel token split: which of a step's tokens each CP rank holds.

Every rank holds the same number of rows (the step is padded to a multiple of C, or 2C for zigzag) so
all-gathers have equal sizes; padding rows are marked -1 and are never cached, attended or sampled.
  * round-robin (default): token i -> rank i % C
  * zigzag: the padded sequence is cut into 2C equal blocks; rank r takes blocks r and 2C-1-r, which
    balances causal attention work when tokens are contiguous.
"""

from __future__ import annotations

import torch

SPLIT_MODES = ("round-robin", "zigzag")


def shard_indices(num_tokens: int, cp_size: int, cp_rank: int, mode: str = "round-robin") -> torch.Tensor:
    """Flat token indices held by ``cp_rank`` -> [n_local] int64, -1 for padding rows."""
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown CP split mode {mode!r}; use one of {', '.join(SPLIT_MODES)}")
    if cp_size == 1:
        return torch.arange(num_tokens)
    if mode == "round-robin":
        padded = -(-num_tokens // cp_size) * cp_size
        idx = torch.arange(cp_rank, padded, cp_size)
    else:
        blocks = 2 * cp_size
        padded = -(-num_tokens // blocks) * blocks
        b = padded // blocks
        first, second = cp_rank, blocks - 1 - cp_rank
        idx = torch.cat([torch.arange(first * b, (first + 1) * b), torch.arange(second * b, (second + 1) * b)])
    return idx.masked_fill(idx >= num_tokens, -1)


def gathered_indices(num_tokens: int, cp_size: int, mode: str = "round-robin") -> torch.Tensor:
    """Flat token index of every row of a rank-major all-gather -> [C * n_local], -1 for padding."""
    return torch.cat([shard_indices(num_tokens, cp_size, r, mode) for r in range(cp_size)])


def local_count(num_tokens: int, cp_size: int, mode: str = "round-robin") -> int:
    """Rows each rank holds for a step of ``num_tokens`` tokens (padding included)."""
    if cp_size == 1:
        return num_tokens
    unit = cp_size if mode == "round-robin" else 2 * cp_size
    return -(-num_tokens // unit) * unit // cp_size
