"""The CP token split (dsaserve.runtime.cp): every token lands on exactly one rank, padding is -1 and
never a real token, every rank holds the same number of rows, and zigzag gives rank r blocks r, 2C-1-r."""

from __future__ import annotations

import pytest
import torch

from dsaserve.runtime import cp

MODES = ("round-robin", "zigzag")
SIZES = (1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 37, 150)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("C", [1, 2, 3, 4, 8])
def test_every_token_exactly_once_and_equal_rows(mode, C):
    for n in SIZES:
        shards = [cp.shard_indices(n, C, r, mode) for r in range(C)]
        rows = cp.local_count(n, C, mode)
        for r, s in enumerate(shards):
            assert s.dtype == torch.int64 and s.dim() == 1
            assert s.numel() == rows, f"n={n} C={C} rank {r}: {s.numel()} rows, local_count says {rows}"
        real = torch.cat([s[s >= 0] for s in shards])
        assert sorted(real.tolist()) == list(range(n)), f"n={n} C={C}: tokens not covered exactly once"
        pad = torch.cat(shards)
        assert ((pad >= 0) | (pad == -1)).all()
        unit = 1 if C == 1 else (C if mode == "round-robin" else 2 * C)
        padded = -(-n // unit) * unit
        assert rows * C == padded, f"n={n} C={C}: padded to {rows * C}, expected the next multiple of {unit}"
        assert int((pad == -1).sum()) == padded - n


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("C", [2, 3, 4])
def test_gathered_indices_is_rank_major_concat(mode, C):
    for n in SIZES:
        g = cp.gathered_indices(n, C, mode)
        expect = torch.cat([cp.shard_indices(n, C, r, mode) for r in range(C)])
        assert torch.equal(g, expect)
        assert g.numel() == C * cp.local_count(n, C, mode)


def test_round_robin_assignment():
    # token i -> rank i % C; 5 tokens on 2 ranks: rank 0 = 0, 2, 4; rank 1 = 1, 3, pad
    assert cp.shard_indices(5, 2, 0).tolist() == [0, 2, 4]
    assert cp.shard_indices(5, 2, 1).tolist() == [1, 3, -1]
    assert cp.shard_indices(2, 4, 3).tolist() == [-1]                # fewer tokens than ranks
    for n in SIZES:
        for C in (2, 3, 4):
            for r in range(C):
                s = cp.shard_indices(n, C, r, "round-robin")
                assert all(i % C == r for i in s[s >= 0].tolist())


@pytest.mark.parametrize("C", [2, 3, 4])
def test_zigzag_blocks(C):
    """Rank r holds blocks r and 2C-1-r of the 2C equal blocks of the padded sequence, in that order."""
    for n in SIZES:
        blocks = 2 * C
        padded = -(-n // blocks) * blocks
        b = padded // blocks
        for r in range(C):
            s = cp.shard_indices(n, C, r, "zigzag")
            full = list(range(r * b, (r + 1) * b)) + list(range((blocks - 1 - r) * b, (blocks - r) * b))
            assert s.tolist() == [i if i < n else -1 for i in full], f"n={n} C={C} rank {r}"
    # spelled out: 8 tokens on 2 ranks -> blocks of 2: rank 0 = blocks 0, 3; rank 1 = blocks 1, 2
    assert cp.shard_indices(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert cp.shard_indices(8, 2, 1, "zigzag").tolist() == [2, 3, 4, 5]
    # 5 tokens on 2 ranks pad to 8: the padding is the tail (6, 7 -> -1, 5 -> -1)
    assert cp.shard_indices(5, 2, 0, "zigzag").tolist() == [0, 1, -1, -1]
    assert cp.shard_indices(5, 2, 1, "zigzag").tolist() == [2, 3, 4, -1]


def test_zigzag_balances_causal_work():
    """The point of zigzag: on a contiguous prompt, the ranks' summed causal lengths are equal."""
    n, C = 64, 4
    work = [sum(i + 1 for i in cp.shard_indices(n, C, r, "zigzag").tolist()) for r in range(C)]
    assert len(set(work)) == 1, work


def test_bad_mode_names_the_choices():
    with pytest.raises(ValueError, match="round-robin, zigzag"):
        cp.shard_indices(4, 2, 0, "striped")
