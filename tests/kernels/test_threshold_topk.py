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


# --------------------------------------------------------------------------- the GPU path's Triton kernels
def _expected_select(vals, cols, live, k, off):
    """select_topk_ordered on a dense row holding each live candidate at its column: the set a row must get."""
    width = int(cols.max()) + 1
    out = []
    for i in range(vals.shape[0]):
        dense = torch.full((1, width), float("-inf"))
        valid = torch.zeros(1, width, dtype=torch.bool)
        dense[0, cols[i][live[i]]] = vals[i][live[i]]
        valid[0, cols[i][live[i]]] = True
        sel = select_topk_ordered(dense, valid, k)[0]
        out.append(torch.where(sel >= 0, sel + int(off[i]), sel))
    return torch.stack(out).to(torch.int32)


@pytest.mark.checks("threshold_topk.select_candidates_triton")
@pytest.mark.parametrize("s,n,k,kind,chunk", [
    (5, 300, 40, "random", None), (4, 200, 64, "ties", None), (3, 50, 80, "short", None), (2, 70, 1, "random", None),
    (3, 40, 100, "ties", None), (2, 90, 17, "equal", None), (5, 300, 40, "random", 64), (4, 200, 64, "ties", 64),
    (2, 90, 17, "equal", 32), (4, 200, 50, "pow2", None), (4, 200, 50, "zeros", 64)])
def test_select_kernel_takes_the_k_largest_by_logit_then_column(s, n, k, kind, chunk):
    """The Triton select on int64 candidates (raw fp32 bits, column): the k largest by (logit desc, column desc)
    among the live slots (-0.0 tying with +0.0, negative logits ordered), listed in candidate order, offset,
    -1 padded; rows with fewer than k live candidates list them all. Also output chunks smaller than the row
    (the column order and the count carried across chunks), a largest value with zero low bits (search keys
    above it need no count), and rows of +0.0 / -0.0 around the k-th value."""
    g = torch.Generator().manual_seed(n + k)
    vals = torch.randn(s, n, generator=g)
    if kind == "ties":  # few distinct values, and signed zeros that must tie
        vals = torch.round(vals * 2) / 2
        vals[0, :8] = -0.0
        vals[0, 8:16] = 0.0
    if kind == "equal":  # every candidate the same logit: the columns alone decide
        vals = torch.full((s, n), -0.75)
    if kind == "pow2":  # the largest values 4.0 and 2.0 (zero low bits), the rest in [1, 2)
        vals = torch.rand(s, n, generator=g) + 1.0
        vals[:, :7] = 4.0
        vals[:, 7:12] = 2.0
    if kind == "zeros":  # +0.0 and -0.0 at the k-th value, tied with each other
        vals[:, ::3] = 0.0
        vals[:, 1::5] = -0.0
    cols = torch.stack([torch.randperm(10 * n, generator=g)[:n] for _ in range(s)])
    live = torch.rand(s, n, generator=g) < (0.2 if kind == "short" else 0.8)
    keys = torch.where(live, T.candidate_keys(vals, cols), torch.full((s, n), T.EMPTY_KEY))
    off = torch.arange(s, dtype=torch.int32) * 100000 + 3
    got = T.select_candidates_triton(keys, k, off, chunk=chunk)
    want = _expected_select(vals, cols, live, k, off)
    assert torch.equal(torch.sort(got, 1).values, torch.sort(want, 1).values)
    for i in range(s):  # candidate order: the picked columns as they stand in the row
        picked = set(want[i][want[i] >= 0].tolist())
        in_order = [c + int(off[i]) for c in cols[i][live[i]].tolist() if c + int(off[i]) in picked]
        assert got[i][: len(in_order)].tolist() == in_order
    scalar = T.select_candidates_triton(keys, k, 7, chunk=chunk)
    want7 = _expected_select(vals, cols, live, k, [7] * s)
    assert torch.equal(torch.sort(scalar, 1).values, torch.sort(want7, 1).values)


@pytest.mark.checks("threshold_topk.select_candidates_triton")
@pytest.mark.parametrize("caps,k,kind,chunk", [
    (13, 40, "random", None), (8, 30, "ties", None), (20, 500, "short", None), (5, 7, "equal", None),
    (8, 30, "ties", 32)])
def test_select_kernel_on_the_filter_layout_flags_redo_rows(caps, k, kind, chunk):
    """The filter's layout: [S, streams, caps] with a count a stream (beyond caps: overflowed, its first caps
    slots kept) and EMPTY_KEY in the slots it did not fill. The answer is the select over the live slots, in
    candidate order (stream by stream), and the redo flag is (total < min(k, keys in [ks, ke) within
    [0, n_keys))) | (a stream overflowed), written for every row."""
    ns = T.STREAMS
    s = 6
    g = torch.Generator().manual_seed(caps * k)
    vals = torch.randn(s, ns, caps, generator=g)
    if kind == "ties":
        vals = torch.round(vals * 2) / 2
        vals[0, 0, :4] = -0.0
        vals[0, 1, :4] = 0.0
    if kind == "equal":
        vals = torch.full((s, ns, caps), 0.25)
    cols = torch.stack([torch.randperm(4 * ns * caps, generator=g)[: ns * caps] for _ in range(s)]).view(s, ns, caps)
    counts = torch.randint(0, caps + 1, (s, ns), generator=g, dtype=torch.int32)
    if kind == "short":
        counts //= 3
    counts[1, 3] = caps + 4  # an overflowed stream: its caps slots are live, the row is flagged
    live = torch.arange(caps)[None, None, :] < counts.clamp(max=caps)[:, :, None]
    keys = torch.where(live, T.candidate_keys(vals, cols), torch.full_like(cols, T.EMPTY_KEY))
    ks = torch.tensor([0, 0, 5, -3, 0, 100], dtype=torch.int32)
    ke = torch.tensor([4 * ns * caps, 10, 30, 2000, 0, 50], dtype=torch.int32)
    n_keys = 600
    off = torch.arange(s, dtype=torch.int32) * 1000
    redo = torch.full((s,), 7, dtype=torch.int32)
    redo_any = torch.zeros(1, dtype=torch.int32)
    got = T.select_candidates_triton(keys, k, off, counts=counts, ks=ks, ke=ke, redo=redo, n_keys=n_keys, chunk=chunk,
                                     redo_any=redo_any)
    want = _expected_select(vals.view(s, -1), cols.view(s, -1), live.view(s, -1), k, off)
    assert torch.equal(torch.sort(got, 1).values, torch.sort(want, 1).values)
    for i in range(s):  # candidate order: stream by stream, slot by slot
        picked = set(want[i][want[i] >= 0].tolist())
        flat = cols[i].view(-1)[live[i].view(-1)].tolist()
        in_order = [c + int(off[i]) for c in flat if c + int(off[i]) in picked]
        assert got[i][: len(in_order)].tolist() == in_order
    n_valid = (ke.clamp(0, n_keys) - ks.clamp(0, n_keys)).clamp_min(0)
    want_redo = (counts.sum(1) < n_valid.clamp(max=k)) | (counts > caps).any(1)
    assert torch.equal(redo, want_redo.to(torch.int32))
    assert redo[1] == 1 and not torch.equal(redo, torch.ones_like(redo))
    assert redo_any.item() == int(want_redo.sum())  # the number of flagged rows (the engine's redo count)
    # no row flagged (every stream within caps, enough candidates): redo_any stays 0
    none_any = torch.zeros(1, dtype=torch.int32)
    T.select_candidates_triton(keys, k, off, counts=counts.clamp(max=caps), ks=ks, ke=ks, redo=redo, n_keys=n_keys,
                               redo_any=none_any)
    assert torch.equal(redo, torch.zeros_like(redo)) and none_any.item() == 0


@pytest.mark.checks("threshold_topk.row_thresholds_triton")
@pytest.mark.parametrize("n,r", [(333, 20), (64, 64), (1000, 1), (60, 51)])
def test_row_threshold_kernel_is_the_rth_largest_finite_value(n, r):
    g = torch.Generator().manual_seed(n * r)
    x = torch.randn(8, n, generator=g)
    x[1] = torch.round(x[1])  # ties at the r-th value
    x[2, n // 2:] = float("-inf")  # half the row outside
    x[3] = float("-inf")  # an empty row
    x[4, :] = -torch.rand(n, generator=g)  # negative values only
    x[5, :] = 0.5  # all equal
    x[6, : n // 3] = -0.0  # signed zeros tie with +0.0
    x[6, n // 3:] = 0.0
    # exactly r finite values of both signs, the rest outside: the r-th largest is the smallest of them (it was
    # NaN: the search's start took the outside slots too; every first 16K chunk had 32 such rows a layer)
    x[7, :r] = torch.linspace(-2.0, 3.0, r)
    x[7, r:] = float("-inf")
    got = T.row_thresholds_triton(x, r)
    want = []
    for row in x:
        fin = torch.sort(row[torch.isfinite(row)], descending=True).values
        want.append(fin[r - 1] if fin.numel() >= r else torch.tensor(float("-inf")))
    assert torch.equal(got, torch.stack(want))


def test_sample_thresholds_are_the_rth_largest_sampled_logit():
    """Step 1 of the GPU path on the CPU (reference logits, the threshold kernel under the interpreter): T is the
    r-th largest logit among the row's keys 0, stride, 2 stride, ... inside [ks, ke), -inf with fewer than r."""
    from dsaserve.kernels.reference import mqa_logits

    from ._util import fp8_randn, ragged_ranges

    g = torch.Generator().manual_seed(3)
    s, h, d, skv, k = 9, 16, 32, 700, 40
    q, kk = fp8_randn(s, h, d, gen=g), fp8_randn(skv, d, gen=g)
    ksc, w = torch.rand(skv, generator=g) + 0.5, torch.randn(s, h, generator=g)
    ks, ke = ragged_ranges(s, skv, g)
    cfg = T.ThresholdTopkConfig(stride=8, margin=1.5, rows=4)  # r = 8; blocks of 4 rows
    got = T.sample_thresholds(q, kk, ksc, w, ks, ke, k, cfg)
    logits = mqa_logits(q, kk, ksc, w, ks, ke)
    r = T.sample_ranks(k, cfg)
    for i in range(s):
        picked = logits[i, 0::cfg.stride]
        fin = torch.sort(picked[torch.isfinite(picked)], descending=True).values
        want = fin[r - 1] if fin.numel() >= r else torch.tensor(float("-inf"))
        assert torch.equal(got[i], want), i
    assert torch.isinf(got[1]) and torch.isfinite(got[0])  # the empty row; the full row
    # (not a mutation target: the kernel writes T in place, so the 7x+3 wrapper of its return value changes nothing)
