"""The planned threshold top-k (dsaserve/kernels/threshold_topk.py) gives exactly the reference top-k:
the same sets in the same (logit desc, position desc) order, on random, causal and heavily tied logits, with
rows shorter than k, and with the rows whose candidates miss (threshold too high) or overflow (too low)
redone."""

import pytest
import torch

from dsaserve.kernels import threshold_topk as T
from dsaserve.kernels.reference import select_topk_ordered


def _case(kind: str, s: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, n, generator=g)
    if kind == "ties":  # a handful of values: many keys tie at the k-th value
        logits = torch.round(logits * 2) / 2
    if kind == "causal":
        ks = torch.zeros(s, dtype=torch.int32)
        ke = torch.arange(n - s, n, dtype=torch.int32) + 1
    else:
        ks = torch.randint(0, n, (s,), generator=g, dtype=torch.int32)
        ke = torch.randint(0, n + 1, (s,), generator=g, dtype=torch.int32)
        ks[0], ke[0] = 0, n
        ks[1], ke[1] = 5, 5  # empty
        ks[2], ke[2] = 10, 40  # shorter than k
    return logits, ks, ke


def _expected(logits, ks, ke, k):
    cols = torch.arange(logits.shape[1])
    return select_topk_ordered(logits, T.row_valid(ks, ke, cols), k)


@pytest.mark.parametrize("kind", ["random", "causal", "ties"])
@pytest.mark.parametrize("s,n,k", [(64, 3000, 64), (37, 1111, 100), (16, 700, 256)])
def test_threshold_topk_equals_the_reference(kind, s, n, k):
    logits, ks, ke = _case(kind, s, n, seed=s + n)
    got, redone = T.threshold_topk_reference(logits, ks, ke, k)
    assert torch.equal(got, _expected(logits, ks, ke, k))
    assert redone <= max(2, s // 8), redone  # the threshold's margin keeps redone rows rare


def test_rows_outside_the_window_are_redone_and_exact():
    """A margin below 1 leaves some rows with fewer than k candidates; a tiny buffer overflows others:
    both are flagged and redone, and the result is still exact."""
    logits, ks, ke = _case("random", 48, 2000, seed=3)
    k = 64
    want = _expected(logits, ks, ke, k)
    got, redone = T.threshold_topk_reference(logits, ks, ke, k, margin=0.5)
    assert redone > 0 and torch.equal(got, want)
    got, redone = T.threshold_topk_reference(logits, ks, ke, k, cap=k + 1, margin=4.0)
    assert redone > 0 and torch.equal(got, want)


def test_select_flags_exactly_the_rows_it_cannot_answer():
    logits, ks, ke = _case("random", 32, 900, seed=5)
    k = 50
    cols = torch.arange(900)
    valid = T.row_valid(ks, ke, cols)
    n_valid = valid.sum(1)
    t = torch.full((32,), 1.0)  # a fixed threshold: some rows reach k candidates, some do not
    pos, val, count = T.filter_candidates(logits, valid, t, cap=200)
    out, redo = T.select_candidates(pos, val, count, n_valid, k)
    assert torch.equal(redo, (count < n_valid.clamp(max=k)) | (count > 200))
    want = select_topk_ordered(logits, valid, k)
    assert not torch.equal(redo, torch.zeros_like(redo)) and not redo.all()
    assert torch.equal(out[~redo], want[~redo])


def test_sample_stride_bounds_the_sample():
    for n, k in [(65536, 2048), (131072, 2048), (4096, 2048), (100, 64)]:
        m = T.sample_stride(n, k)
        cols = T.sampled_columns(n, m)
        assert m >= 1 and cols.numel() <= max(4 * k, T.TILE) + T.TILE and cols.max() < n
        assert torch.equal(cols % (m * T.TILE) < T.TILE, torch.ones_like(cols, dtype=torch.bool))
