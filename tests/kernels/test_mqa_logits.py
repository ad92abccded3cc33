import pytest
import torch

from dsaserve import kernels as K
from dsaserve.kernels import reference as R
from dsaserve.kernels.indexer_logits import LogitsConfig

from ._util import fp8_randn, ragged_ranges, triton  # noqa: F401


def _inputs(s, h, d, skv, seed):
    g = torch.Generator().manual_seed(seed)
    q = fp8_randn(s, h, d, gen=g)
    k = fp8_randn(skv, d, gen=g)
    ksc = torch.rand(skv, generator=g) + 0.5
    w = torch.randn(s, h, generator=g)
    ks, ke = ragged_ranges(s, skv, g)
    return q, k, ksc, w, ks, ke


KERNEL = "indexer_logits.mqa_logits_triton"
PAGED = "indexer_logits.paged_mqa_logits_triton"


def _assert_logits_equal(out, ref):
    """Same -inf pattern; finite values within a few fp32 ulps of the row scale (the interpreter's dot and
    the reference's einsum add the same exact products in different orders: ~1 ulp seen)."""
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), inf) and torch.all(out[inf] < 0)
    assert not torch.isnan(out).any()
    scale = ref[~inf].abs().max()
    assert (out[~inf] - ref[~inf]).abs().max() <= 1e-6 * scale


def _naive_logits(q, k, ksc, w, ks, ke):
    """The formula in float64 with explicit loops over rows (independent of the reference's einsums)."""
    out = torch.full((q.shape[0], k.shape[0]), float("-inf"), dtype=torch.float64)
    for i in range(q.shape[0]):
        for j in range(max(int(ks[i]), 0), min(int(ke[i]), k.shape[0])):
            dots = (q[i].double() @ k[j].double()).clamp_min(0)  # [H]
            out[i, j] = float((w[i].double() * dots).sum()) * float(ksc[j])
    return out


@pytest.mark.checks("reference.mqa_logits")
def test_reference_matches_naive_formula():
    q, k, ksc, w, ks, ke = _inputs(6, 4, 16, 23, 0)
    ref = R.mqa_logits(q, k, ksc, w, ks, ke, chunk=4)  # chunking must not matter
    naive = _naive_logits(q, k, ksc, w, ks, ke)
    _assert_logits_equal(ref.double(), naive)


@pytest.mark.checks(KERNEL, "reference.mqa_logits")
@pytest.mark.parametrize("s,h,d,skv,cfg,num_sms", [
    (13, 16, 64, 150, None, None),  # tiny-model geometry, sizes not multiples of the tiles
    (9, 16, 32, 77, LogitsConfig(bq=2, bk=16), 3),  # many key tiles: skipped tiles + persistent loop
    (5, 32, 16, 40, LogitsConfig(bq=1, bk=16), 1),  # one program does everything
    (4, 8, 16, 33, LogitsConfig(bq=1, bk=16), 2),  # H*BQ < 16: launcher widens BQ
])
def test_triton_matches_reference(s, h, d, skv, cfg, num_sms):
    q, k, ksc, w, ks, ke = _inputs(s, h, d, skv, s * 1000 + skv)
    out = K.mqa_logits(q, k, ksc, w, ks, ke, num_sms=num_sms, backend="triton", config=cfg)
    _assert_logits_equal(out, R.mqa_logits(q, k, ksc, w, ks, ke))


@pytest.mark.checks(KERNEL, "reference.mqa_logits")
def test_causal_chunk_layout():
    # queries at positions 40..55 of a 56-token prefix: ke = pos + 1 (the prefill use)
    s, skv = 16, 56
    q, k, ksc, w, _, _ = _inputs(s, 16, 32, skv, 7)
    ks = torch.zeros(s, dtype=torch.int32)
    ke = torch.arange(40, 56, dtype=torch.int32) + 1
    out = K.mqa_logits(q, k, ksc, w, ks, ke, backend="triton", config=LogitsConfig(bq=2, bk=16), num_sms=4)
    _assert_logits_equal(out, R.mqa_logits(q, k, ksc, w, ks, ke))


@pytest.mark.checks(KERNEL, "reference.mqa_logits")
@pytest.mark.parametrize("stride,skv", [(32, 1000), (7, 150), (4, 64)])
def test_key_stride_takes_every_stride_th_key(stride, skv):
    """``mqa_logits(key_stride=m)`` (the threshold top-k's sample): column j is key j m, valid where ks <= j m < ke.
    The Triton kernel reads those keys in place, the reference gathers them; both equal the formula on the keys
    taken one by one, with each row's columns found by testing every j (ranges past both ends, an empty one, one
    holding a single sampled key)."""
    s = 11
    q, k, ksc, w, ks, ke = _inputs(s, 16, 32, skv, stride)
    ks[0], ke[0] = -5, skv + 40
    ks[1], ke[1] = 3, 3
    ks[2], ke[2] = stride + 1, 2 * stride + 1
    n = -(-skv // stride)
    cols = torch.arange(n) * stride
    ks_s = torch.tensor([min([j for j in range(n) if ks[i] <= j * stride < ke[i]] or [0]) for i in range(s)])
    ke_s = torch.tensor([max([j + 1 for j in range(n) if ks[i] <= j * stride < ke[i]] or [0]) for i in range(s)])
    naive = _naive_logits(q, k[cols], ksc[cols], w, ks_s, ke_s)
    ref = K.mqa_logits(q, k, ksc, w, ks, ke, backend="reference", key_stride=stride)
    assert ref.shape == (s, n)
    _assert_logits_equal(ref.double(), naive)
    out = K.mqa_logits(q, k, ksc, w, ks, ke, backend="triton", key_stride=stride, config=LogitsConfig(bq=2, bk=16),
                       num_sms=3)
    _assert_logits_equal(out, ref)
    with pytest.raises(K.KernelInputError, match="key_stride"):
        K.mqa_logits(q, k, ksc, w, ks, ke, key_stride=0)


@pytest.mark.checks("reference.mqa_logits")
def test_input_errors_and_fallback():
    q, k, ksc, w, ks, ke = _inputs(4, 16, 32, 20, 1)
    with pytest.raises(K.KernelInputError, match="k_scale"):
        K.mqa_logits(q, k, ksc[:5], w, ks, ke)
    with pytest.raises(K.KernelInputError, match="ks"):
        K.mqa_logits(q, k, ksc, w, ks.long(), ke)
    with pytest.raises(K.KernelInputError, match="q_fp8"):
        K.mqa_logits(q.float(), k, ksc, w, ks, ke)
    # 12 heads: no Triton kernel; 'auto' falls back silently, 'triton' says why
    q12, w12 = q[:, :12].contiguous(), w[:, :12].contiguous()
    assert "powers of two" in K.fallback_reason("mqa_logits", h=12, d=32)
    with pytest.raises(K.KernelInputError, match="powers of two"):
        K.mqa_logits(q12, k, ksc, w12, ks, ke, backend="triton")
    _assert_logits_equal(K.mqa_logits(q12, k, ksc, w12, ks, ke).double(), _naive_logits(q12, k, ksc, w12, ks, ke))


def _paged_inputs(b, h, d, n_pages, max_pages, seed):
    g = torch.Generator().manual_seed(seed)
    q = fp8_randn(b, h, d, gen=g)
    kc = fp8_randn(n_pages, 64, d, gen=g)
    ksc = torch.rand(n_pages, 64, generator=g) + 0.5
    w = torch.randn(b, h, generator=g)
    lens = torch.randint(1, max_pages * 64 + 1, (b,), generator=g, dtype=torch.int32)
    lens[0] = 0  # an empty request
    lens[-1] = max_pages * 64  # a full one
    bt = torch.randperm(n_pages, generator=g)[: b * max_pages].view(b, max_pages).to(torch.int32)
    return q, kc, ksc, w, lens, bt


@pytest.mark.checks("reference.paged_mqa_logits", "reference.mqa_logits")
def test_paged_reference_matches_flat():
    """Each request's paged logits = the flat logits over its gathered pages, -inf beyond the context. The two
    references sum the heads differently (an elementwise sum vs an einsum, whose order is the CPU's BLAS's: equal
    bits on some CPUs, 1-2 ulp apart on others), so the values must agree within the fp32 summation bound of
    both paths, (D + H + 2) 2^-24 each times the sum of the terms' magnitudes (computed here in fp64, apart from
    either reference)."""
    h, d = 16, 32
    q, kc, ksc, w, lens, bt = _paged_inputs(3, h, d, 12, 3, 3)
    ref = R.paged_mqa_logits(q, kc, ksc, w, lens, bt)
    assert int(lens[1]) not in (0, 3 * 64)  # a partial request as well as the empty and the full one
    for b in range(3):
        n = int(lens[b])
        keys = kc[bt[b].long()].reshape(-1, d)
        sc = ksc[bt[b].long()].reshape(-1)
        flat = R.mqa_logits(q[b : b + 1], keys, sc, w[b : b + 1], torch.tensor([0], dtype=torch.int32),
                            torch.tensor([n], dtype=torch.int32))
        assert torch.equal(torch.isinf(ref[b]), torch.isinf(flat[0]))
        assert torch.isinf(ref[b, n:]).all() and torch.isfinite(ref[b, :n]).all()
        terms = q[b].double().abs() @ keys.double().abs().T                       # [H, keys] sum_d |q k|
        mag = (w[b].double().abs()[:, None] * terms).sum(0) * sc.double()        # [keys]
        bound = 2 * (d + h + 2) * 2.0**-24 * mag[:n]
        assert torch.all((ref[b, :n].double() - flat[0, :n].double()).abs() <= bound)


@pytest.mark.checks(PAGED, "reference.paged_mqa_logits")
@pytest.mark.parametrize("b,h,d,max_pages,num_sms", [(4, 16, 64, 3, None), (3, 32, 32, 2, 2), (2, 8, 16, 1, 1)])
def test_paged_triton_matches_reference(b, h, d, max_pages, num_sms):
    q, kc, ksc, w, lens, bt = _paged_inputs(b, h, d, b * max_pages + 2, max_pages, b * 10 + h)
    out = K.paged_mqa_logits(q, kc, ksc, w, lens, bt, num_sms=num_sms, backend="triton")
    assert out.shape == (b, max_pages * 64)
    _assert_logits_equal(out, R.paged_mqa_logits(q, kc, ksc, w, lens, bt))
