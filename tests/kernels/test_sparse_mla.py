import math

import pytest
import torch

from dsaserve import kernels as K
from dsaserve.kernels import reference as R

from ._util import triton  # noqa: F401

KERNEL = "sparse_attention.sparse_mla_triton"


def _assert_close_to_reference(out, lse, rout, rlse, dtype):
    """Kernel (interpreter) vs the float64 reference. fp32: the interpreter computes in fp32, ~1e-7 seen.
    bf16: also fp32 inside, then the interpreter's fp32 -> bf16 cast truncates (the GPU rounds), so each
    element is within one bf16 ulp (2^-7 relative) of the exact value."""
    assert out.dtype == dtype and not torch.isnan(out).any()
    if dtype == torch.bfloat16:
        assert torch.all((out.double() - rout).abs() <= 2**-7 * rout.abs() + 1e-6)
    else:
        assert (out.double() - rout).norm() <= 2e-6 * rout.norm()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)) and not torch.isnan(lse).any()
    fin = torch.isfinite(rlse)
    assert (lse[fin].double() - rlse[fin]).abs().max() <= 5e-6


def _inputs(t, h, dv, dr, slots, topk, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, dv + dr, generator=g).to(dtype)
    kv = torch.randn(slots, dv + dr, generator=g).to(dtype)
    idx = torch.randint(-1, slots, (t, topk), generator=g, dtype=torch.int32)  # some -1 (invalid)
    idx[0] = -1  # a row with nothing valid
    if t > 1:
        idx[1, 1:] = -1  # a row with exactly one valid key
        idx[1, 0] = 3
    return q, kv, idx


@pytest.mark.checks("reference.sparse_mla")
def test_reference_matches_dense_masked_softmax():
    q, kv, idx = _inputs(4, 3, 16, 8, 10, 6, torch.float64, 0)
    scale = 0.3
    out, lse = R.sparse_mla(q, kv, idx, scale, d_v=16)
    for i in range(4):
        sel = [int(j) for j in idx[i] if j >= 0]
        if not sel:
            assert torch.all(out[i] == 0) and torch.all(torch.isneginf(lse[i]))
            continue
        kk = kv[sel]  # duplicates count twice, like the kernel
        s = (q[i] @ kk.T) * scale  # [h, n]
        # the reference runs its softmax in fp32 whatever the input dtype: fp32 rounding only
        torch.testing.assert_close(lse[i].double(), torch.logsumexp(s, -1), rtol=0, atol=2e-6)
        torch.testing.assert_close(out[i], torch.softmax(s, -1) @ kk[:, :16], rtol=0, atol=1e-6)
    assert torch.equal(out[1], kv[3, :16].expand(3, 16))


@pytest.mark.checks(KERNEL, "reference.sparse_mla")
@pytest.mark.parametrize("t,h,dv,dr,slots,topk,dtype,splits", [
    (5, 16, 64, 16, 40, 24, torch.float32, None),  # tiny-model latent geometry (64 + 16), topk % BK != 0
    (3, 20, 32, 16, 50, 70, torch.float32, 1),  # heads not a multiple of the head block
    (4, 16, 64, 16, 33, 45, torch.bfloat16, None),
    (4, 16, 32, 16, 64, 100, torch.float32, 3),  # decode-style split over top-k + merge
])
def test_triton_matches_reference(t, h, dv, dr, slots, topk, dtype, splits):
    q, kv, idx = _inputs(t, h, dv, dr, slots, topk, dtype, t * 100 + h)
    scale = 1 / math.sqrt(dv + dr)
    out, lse = K.sparse_mla(q, kv, idx, scale, d_v=dv, backend="triton", num_splits=splits)
    rout, rlse = R.sparse_mla(q.double(), kv.double(), idx, scale, d_v=dv)
    assert out.shape == (t, h, dv) and lse.shape == (t, h)
    _assert_close_to_reference(out, lse, rout, rlse, dtype)
    assert torch.all(out[0] == 0)


@pytest.mark.checks(KERNEL, "reference.merge_attn_states")
def test_split_merge_equals_unsplit():
    q, kv, idx = _inputs(4, 16, 32, 16, 30, 64, torch.float32, 9)
    a = K.sparse_mla(q, kv, idx, 0.2, d_v=32, backend="triton", num_splits=1)
    b = K.sparse_mla(q, kv, idx, 0.2, d_v=32, backend="triton", num_splits=4)
    assert (a[0] - b[0]).abs().max() <= 1e-6 * a[0].abs().max()
    assert torch.equal(torch.isneginf(a[1]), torch.isneginf(b[1]))
    fin = torch.isfinite(a[1])
    assert (a[1][fin] - b[1][fin]).abs().max() <= 1e-6


@pytest.mark.checks("reference.merge_attn_states")
def test_merge_attn_states_matches_joint_softmax():
    """Merging the partial results of two disjoint key sets = attention over their union (an empty part
    with lse = -inf weighs nothing)."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 2, 10, generator=g, dtype=torch.float64)  # [t, h, keys] scores
    v = torch.randn(10, 4, generator=g, dtype=torch.float64)
    parts = [slice(0, 6), slice(6, 10), slice(10, 10)]
    outs, lses = [], []
    for p in parts:
        sp = s[..., p]
        lse = torch.logsumexp(sp, -1) if sp.shape[-1] else torch.full(s.shape[:2], float("-inf"), dtype=s.dtype)
        outs.append(torch.softmax(sp, -1) @ v[p] if sp.shape[-1] else torch.zeros(3, 2, 4, dtype=s.dtype))
        lses.append(lse)
    out, lse = R.merge_attn_states(torch.stack(outs), torch.stack(lses))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.checks("reference.sparse_mla")
def test_errors_and_fallback():
    q, kv, idx = _inputs(2, 4, 32, 16, 10, 8, torch.float32, 1)
    with pytest.raises(K.KernelInputError, match="indices"):
        K.sparse_mla(q, kv, idx.long(), 0.1, d_v=32)
    with pytest.raises(K.KernelInputError, match="kv"):
        K.sparse_mla(q, kv.double(), idx, 0.1, d_v=32)
    q2, kv2, idx2 = _inputs(2, 4, 24, 16, 10, 8, torch.float32, 1)  # d_v 24: not a power of two
    with pytest.raises(K.KernelInputError, match="powers of two"):
        K.sparse_mla(q2, kv2, idx2, 0.1, d_v=24, backend="triton")
    out, lse = K.sparse_mla(q2, kv2, idx2, 0.1, d_v=24)  # 'auto' on CPU: reference
    assert out.shape == (2, 4, 24)
    # the value the fallback returns: row 1 attends to slot 3 only; row 0 to nothing
    assert torch.equal(out[1], kv2[3, :24].expand(4, 24)) and torch.all(out[0] == 0)
    assert torch.isneginf(lse[0]).all()


@pytest.mark.checks(KERNEL, "reference.sparse_mla")
@pytest.mark.parametrize("prefetch", [True, False])
def test_both_index_load_schedules(prefetch):
    from dsaserve.kernels.sparse_attention import SparseMLAConfig

    q, kv, idx = _inputs(3, 16, 32, 16, 40, 50, torch.float32, 4)
    cfg = SparseMLAConfig(bh=16, bk=16, num_warps=4, num_stages=2, prefetch_idx=prefetch)
    out, lse = K.sparse_mla(q, kv, idx, 0.2, d_v=32, backend="triton", config=cfg)
    rout, rlse = R.sparse_mla(q.double(), kv.double(), idx, 0.2, d_v=32)
    _assert_close_to_reference(out, lse, rout, rlse, torch.float32)


@pytest.mark.checks(KERNEL, "reference.sparse_mla")
@pytest.mark.parametrize("t,h,bh,dv,dr,topk,dtype", [
    (4, 32, 32, 64, 16, 45, torch.float32),  # topk % BK != 0, rows with 0 / 1 valid keys
    (3, 20, 16, 64, 32, 70, torch.bfloat16),  # heads not a multiple of the head block
    (3, 16, 16, 32, 16, 16, torch.float32),  # smallest halves (16 value columns each)
])
def test_value_split_kernel_matches_reference(t, h, bh, dv, dr, topk, dtype):
    """v_split=2: two programs per (token, head block), each owning half the value columns."""
    from dsaserve.kernels.sparse_attention import SparseMLAConfig

    q, kv, idx = _inputs(t, h, dv, dr, 37, topk, dtype, 7 * t + h)
    cfg = SparseMLAConfig(bh=bh, bk=16, num_warps=8, num_stages=3, v_split=2)
    out, lse = K.sparse_mla(q, kv, idx, 0.15, d_v=dv, backend="triton", config=cfg)
    rout, rlse = R.sparse_mla(q.double(), kv.double(), idx, 0.15, d_v=dv)
    _assert_close_to_reference(out, lse, rout, rlse, dtype)  # elementwise for bf16: a swapped half fails
    assert torch.all(out[0] == 0)
    assert torch.equal(out[1], kv[3, :dv].expand(h, dv))

