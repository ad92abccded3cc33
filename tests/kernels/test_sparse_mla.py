import math

import pytest
import torch

from dsaserve import kernels as K
from dsaserve.kernels import reference as R

from ._util import triton  # noqa: F401


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
        assert torch.allclose(lse[i], torch.logsumexp(s, -1).float())
        assert torch.allclose(out[i], torch.softmax(s, -1) @ kk[:, :16])
    assert torch.allclose(out[1], kv[3, :16].expand(3, 16))


@pytest.mark.parametrize("t,h,dv,dr,slots,topk,dtype,splits", [
    (5, 16, 64, 16, 40, 24, torch.float32, None),  # tiny-model latent geometry (64 + 16), topk % BK != 0
    (3, 20, 32, 16, 50, 70, torch.float32, 1),  # heads not a multiple of the head block
    (4, 16, 64, 16, 33, 45, torch.bfloat16, None),
    (2, 16, 32, 16, 64, 100, torch.float32, 3),  # decode-style split over top-k + merge
])
def test_triton_matches_reference(t, h, dv, dr, slots, topk, dtype, splits):
    q, kv, idx = _inputs(t, h, dv, dr, slots, topk, dtype, t * 100 + h)
    scale = 1 / math.sqrt(dv + dr)
    out, lse = K.sparse_mla(q, kv, idx, scale, d_v=dv, backend="triton", num_splits=splits)
    rout, rlse = R.sparse_mla(q.double(), kv.double(), idx, scale, d_v=dv)
    assert out.dtype == dtype and out.shape == (t, h, dv) and lse.shape == (t, h)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3  # the interpreter's dot is exact fp32; GPU uses tf32/bf16
    assert (out.double() - rout).norm() / rout.norm() < tol
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    fin = torch.isfinite(rlse)
    assert torch.allclose(lse[fin].double(), rlse[fin].double(), atol=2e-3)
    assert torch.all(out[0] == 0)


def test_split_merge_equals_unsplit():
    q, kv, idx = _inputs(2, 16, 32, 16, 30, 64, torch.float32, 9)
    a = K.sparse_mla(q, kv, idx, 0.2, d_v=32, backend="triton", num_splits=1)
    b = K.sparse_mla(q, kv, idx, 0.2, d_v=32, backend="triton", num_splits=4)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


def test_errors_and_fallback():
    q, kv, idx = _inputs(2, 4, 32, 16, 10, 8, torch.float32, 1)
    with pytest.raises(K.KernelInputError, match="indices"):
        K.sparse_mla(q, kv, idx.long(), 0.1, d_v=32)
    with pytest.raises(K.KernelInputError, match="kv"):
        K.sparse_mla(q, kv.double(), idx, 0.1, d_v=32)
    q2, kv2, idx2 = _inputs(2, 4, 24, 16, 10, 8, torch.float32, 1)  # d_v 24: not a power of two
    with pytest.raises(K.KernelInputError, match="powers of two"):
        K.sparse_mla(q2, kv2, idx2, 0.1, d_v=24, backend="triton")
    out, _ = K.sparse_mla(q2, kv2, idx2, 0.1, d_v=24)  # 'auto' on CPU: reference
    assert out.shape == (2, 4, 24)


@pytest.mark.parametrize("prefetch", [True, False])
def test_both_index_load_schedules(prefetch):
    from dsaserve.kernels.sparse_attention import SparseMLAConfig

    q, kv, idx = _inputs(3, 16, 32, 16, 40, 50, torch.float32, 4)
    cfg = SparseMLAConfig(bh=16, bk=16, num_warps=4, num_stages=2, prefetch_idx=prefetch)
    out, lse = K.sparse_mla(q, kv, idx, 0.2, d_v=32, backend="triton", config=cfg)
    rout, rlse = R.sparse_mla(q, kv, idx, 0.2, d_v=32)
    assert torch.allclose(out, rout, atol=1e-4) and torch.equal(torch.isneginf(lse), torch.isneginf(rlse))


@pytest.mark.parametrize("t,h,bh,dv,dr,topk,dtype", [
    (4, 32, 32, 64, 16, 45, torch.float32),  # topk % BK != 0, rows with 0 / 1 valid keys
    (3, 20, 16, 64, 32, 70, torch.bfloat16),  # heads not a multiple of the head block
    (2, 16, 16, 32, 16, 16, torch.float32),  # smallest halves (16 value columns each)
])
def test_value_split_kernel_matches_reference(t, h, bh, dv, dr, topk, dtype):
    """v_split=2: two programs per (token, head block), each owning half the value columns."""
    from dsaserve.kernels.sparse_attention import SparseMLAConfig

    q, kv, idx = _inputs(t, h, dv, dr, 37, topk, dtype, 7 * t + h)
    cfg = SparseMLAConfig(bh=bh, bk=16, num_warps=8, num_stages=3, v_split=2)
    out, lse = K.sparse_mla(q, kv, idx, 0.15, d_v=dv, backend="triton", config=cfg)
    rout, rlse = R.sparse_mla(q.double(), kv.double(), idx, 0.15, d_v=dv)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert (out.double() - rout).norm() / rout.norm() < tol
    # each half must land in its own columns (a swapped half fails this even when the norm is close)
    for half in (slice(0, dv // 2), slice(dv // 2, dv)):
        assert (out[..., half].double() - rout[..., half]).norm() / rout[..., half].norm() < tol
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    fin = torch.isfinite(rlse)
    assert torch.allclose(lse[fin].double(), rlse[fin].double(), atol=2e-3)
    assert torch.all(out[0] == 0)
    assert torch.allclose(out[1].double(), kv[3, :dv].double().expand(h, dv), atol=1e-2)
