import pytest
import torch

from dsaserve import kernels as K
from dsaserve.kernels import reference as R
from dsaserve.kernels.topk import topk_indices_gpu


def _brute(logits, ks, ke, k, offset):
    rows = []
    for i in range(logits.shape[0]):
        cols = list(range(max(int(ks[i]), 0), min(int(ke[i]), logits.shape[1])))
        cols.sort(key=lambda j: -float(logits[i, j]))
        picked = [j + offset for j in cols[:k]]
        rows.append(set(picked) | ({-1} if len(picked) < k else set()))
    return rows


@pytest.mark.parametrize("s,n,k", [(7, 50, 8), (5, 20, 32), (4, 300, 64)])
@pytest.mark.parametrize("impl", [
    pytest.param("reference", marks=pytest.mark.checks("reference.topk_indices")),
    pytest.param("gpu_path", marks=pytest.mark.checks("topk.topk_indices_radix")),
    pytest.param("gpu_torch", marks=pytest.mark.checks("topk.topk_indices_torch")),
])
def test_topk_ragged(s, n, k, impl):
    g = torch.Generator().manual_seed(s * n + k)
    logits = torch.randn(s, n, generator=g)  # distinct values: the top-k set is unique
    ks = torch.randint(0, n, (s,), generator=g, dtype=torch.int32)
    ke = torch.randint(0, n + 1, (s,), generator=g, dtype=torch.int32)
    ks[0], ke[0] = 0, n
    ks[1], ke[1] = 3, 3  # empty row
    if impl == "reference":
        out = R.topk_indices(logits, ks, ke, k, 100)
    else:  # the CUDA code path run on CPU; default without assume_masked = the radix kernel (interpreter)
        out = topk_indices_gpu(logits, ks, ke, k, 100, backend=None if impl == "gpu_path" else "torch")
    assert out.shape == (s, k) and out.dtype == torch.int32
    want = _brute(logits, ks, ke, k, 100)
    for i in range(s):
        got = out[i].tolist()
        n_valid = max(0, min(int(ke[i]), n) - int(ks[i]))
        assert got.count(-1) == max(0, k - n_valid)
        assert set(got) == want[i]
    assert torch.all(out[1] == -1)


@pytest.mark.checks("reference.topk_indices", "topk.topk_indices_torch")
def test_lengths_offsets_and_masked_input():
    logits = torch.randn(3, 40)
    lengths = torch.tensor([40, 10, 0], dtype=torch.int32)
    off = torch.tensor([0, 1000, 5], dtype=torch.int32)
    out = K.topk_indices(logits, lengths=lengths, k=16, offset=off)
    assert out[0].min() >= 0 and out[0].max() < 40
    assert sorted(out[1][out[1] >= 0].tolist()) == list(range(1000, 1010))
    assert torch.all(out[2] == -1)
    # logits already -inf outside the range (mqa_logits output): assume_masked gives the same sets
    ks, ke = torch.zeros(3, dtype=torch.int32), lengths
    masked = logits.masked_fill(torch.arange(40)[None] >= lengths[:, None], float("-inf"))
    a = topk_indices_gpu(masked, ks, ke, 16, assume_masked=True)
    b = R.topk_indices(logits, ks, ke, 16)
    for i in range(3):
        assert sorted(a[i].tolist()) == sorted(b[i].tolist())
    assert sorted(a[0].tolist()) == sorted(torch.topk(logits[0], 16).indices.tolist())


def test_topk_errors():
    with pytest.raises(K.KernelInputError, match="lengths or ks/ke"):
        K.topk_indices(torch.randn(2, 4), torch.zeros(2, dtype=torch.int32), k=2,
                       lengths=torch.ones(2, dtype=torch.int32))
    with pytest.raises(K.KernelInputError, match="fp32"):
        K.topk_indices(torch.randn(2, 4).half(), lengths=torch.ones(2, dtype=torch.int32), k=2)


def _value_multiset(logits, row, picked, offset):
    return sorted(float(logits[row, j - offset]) for j in picked if j >= 0)


@pytest.mark.checks("topk.topk_indices_radix", "reference.topk_indices")
@pytest.mark.parametrize("s,n,k", [(7, 300, 20), (5, 100, 128), (4, 200, 64), (3, 64, 1)])
def test_radix_topk_matches_torch_sets(s, n, k):
    """Triton radix select (interpreter, 64-column chunks) vs the reference; ties compared by value."""
    from dsaserve.kernels.topk import topk_indices_radix

    g = torch.Generator().manual_seed(s * n + k)
    logits = torch.randn(s, n, generator=g)
    logits[1, 5:60] = 0.25  # a long run of ties straddling chunk boundaries
    logits[2, ::3] = float("-inf")  # -inf inside the valid range is still a valid column
    logits[2, 1::3] *= -1e-30  # tiny negatives / denormal-ish values and signed zero orderings
    ks = torch.randint(0, n, (s,), generator=g, dtype=torch.int32)
    ke = torch.randint(0, n + 1, (s,), generator=g, dtype=torch.int32)
    ks[0], ke[0] = 0, n
    ks[1], ke[1] = 0, n
    ks[2], ke[2] = 0, n
    out = topk_indices_radix(logits, ks, ke, k, 11)
    ref = R.topk_indices(logits, ks, ke, k, 11)
    assert out.shape == (s, k) and out.dtype == torch.int32
    for i in range(s):
        got = out[i].tolist()
        n_valid = max(0, min(int(ke[i]), n) - max(int(ks[i]), 0))
        assert got.count(-1) == max(0, k - n_valid)
        picked = [j for j in got if j >= 0]
        assert len(set(picked)) == len(picked)  # no column twice
        assert all(int(ks[i]) + 11 <= j < int(ke[i]) + 11 for j in picked)
        assert _value_multiset(logits, i, got, 11) == _value_multiset(logits, i, ref[i].tolist(), 11)


@pytest.mark.checks("topk.topk_indices_radix")
def test_radix_topk_ties_deterministic_and_offsets():
    """All-equal row: the first k columns of the range are taken (column order); per-row offsets."""
    from dsaserve.kernels.topk import topk_indices_radix

    logits = torch.zeros(3, 150)
    ks = torch.tensor([10, 0, 140], dtype=torch.int32)
    ke = torch.tensor([150, 0, 150], dtype=torch.int32)
    off = torch.tensor([1000, 0, -140], dtype=torch.int32)
    out = topk_indices_radix(logits, ks, ke, 16, off)
    assert sorted(out[0].tolist()) == list(range(1010, 1026))
    assert torch.all(out[1] == -1)
    assert sorted(out[2][out[2] >= 0].tolist()) == list(range(0, 10)) and (out[2] == -1).sum() == 6


@pytest.mark.checks("topk.topk_indices_radix")
def test_radix_topk_without_row_starts_equals_zero_starts():
    """``ks`` None (decode: rows start at column 0, no zeros tensor) selects what explicit zero starts select,
    on ragged lengths (an empty row, a row shorter than k, rows past one chunk)."""
    from dsaserve.kernels.topk import topk_indices_radix

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 300, generator=g)
    ke = torch.tensor([0, 9, 150, 300], dtype=torch.int32)
    want = topk_indices_radix(logits, torch.zeros_like(ke), ke, 16)
    got = topk_indices_radix(logits, None, ke, 16)
    assert torch.equal(got, want)
    ref = R.topk_indices(logits, torch.zeros_like(ke), ke, 16)
    for i in range(4):
        assert sorted(got[i].tolist()) == sorted(ref[i].tolist())
