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


@pytest.mark.checks(KERNEL, "sparse_attention.merge_splits_triton")
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
    with pytest.raises(K.KernelInputError, match="prefill_kernel must be 'auto' or 'triton', got 'gluon'"):
        K.sparse_mla(q, kv, idx, 0.1, d_v=32, prefill_kernel="gluon")
    from dsaserve.kernels.sparse_attention import SparseMLAConfig

    with pytest.raises(K.KernelInputError, match="kernel must be 'triton' or 'hopper', got 'cuda'"):
        K.sparse_mla(q, kv, idx, 0.1, d_v=32, backend="triton", config=SparseMLAConfig(kernel="cuda"))


def test_hopper_launcher_rejects_an_unknown_variant():
    """The Gluon launcher's variant names are checked before anything needs a GPU (CPU tensors here)."""
    from dsaserve.kernels.sparse_mla_hopper import DEFAULT_VARIANT, VARIANTS, sparse_mla_prefill_hopper

    assert VARIANTS == ("ws", "seesaw", "ws_bk32", "one_partition", "roles", "pair") and DEFAULT_VARIANT == "pair"
    q, kv, idx = _inputs(2, 64, 512, 64, 10, 8, torch.bfloat16, 1)
    with pytest.raises(K.KernelInputError, match="variant must be one of"):
        sparse_mla_prefill_hopper(q, kv, idx, 0.1, 512, variant="seasaw")
    with pytest.raises(K.KernelInputError, match="sm_90 GPU"):  # a known variant: the support check refuses CPU
        sparse_mla_prefill_hopper(q, kv, idx, 0.1, 512, variant="seesaw")


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


# ----------------------------------------------------------------------------------------------- decode splits
MERGE = "sparse_attention.merge_splits_triton"


def test_pick_num_splits_fills_one_wave():
    """The split heuristic is a pure function of the shapes: a table for H200 decode (132 SMs, 128 heads =
    2 head blocks, top-k 2048, BK 64), then its contract over a grid of shapes: at most one wave of
    programs, whole BK tiles, no empty split, and no larger count that would still fit."""
    from dsaserve.kernels.sparse_attention import pick_num_splits, split_layout

    table = {t: pick_num_splits(t, 2, 2048, 64, 132) for t in (1, 2, 4, 8, 16, 32, 33, 34, 64, 128, 4096)}
    assert table == {1: 32, 2: 32, 4: 16, 8: 8, 16: 4, 32: 2, 33: 2, 34: 1, 64: 1, 128: 1, 4096: 1}
    assert pick_num_splits(0, 2, 2048, 64, 132) == 1 and pick_num_splits(1, 2, 64, 64, 132) == 1
    for sms in (8, 132):
        for n_hb in (1, 2, 3):
            for topk in (1, 63, 64, 65, 200, 2048):
                for bk in (32, 64):
                    for t in range(1, 80):
                        n = pick_num_splits(t, n_hb, topk, bk, sms)
                        n2, split_len = split_layout(topk, n, bk)
                        assert n2 == n >= 1 and split_len % bk == 0 and (n - 1) * split_len < topk <= n * split_len
                        if 2 * t * n_hb > sms:
                            assert n == 1  # prefill-sized: unchanged
                        if n > 1:
                            assert t * n_hb * n <= sms
                        if split_len > bk:  # the next finer layout would overfill the SMs
                            assert t * n_hb * split_layout(topk, -(-topk // (split_len - bk)), bk)[0] > sms \
                                or 2 * t * n_hb > sms


def _merge_inputs(n, t, h, dv, seed):
    """Partials with lses spread over +-20 (weights span e^40), a row with every split empty, a row with one
    live split, and a row whose live splits have equal lses."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(n, t, h, dv, generator=g)
    lse = torch.randn(n, t, h, generator=g) * 8
    lse = lse.clamp(-20, 20)
    lse[torch.rand(n, t, h, generator=g) < 0.3] = float("-inf")  # empty splits
    lse[:, 0, 0] = float("-inf")
    lse[:, 1, 1] = float("-inf")
    lse[n // 2, 1, 1] = 3.0
    lse[:, 1, 0] = 0.5
    o[torch.isneginf(lse)] = 0.0  # what the split kernel writes for an empty split
    return o, lse


@pytest.mark.checks(MERGE, "reference.merge_attn_states")
@pytest.mark.parametrize("n", [1, 2, 5, 40])  # 40 > MERGE_MAX_SB: the kernel loops over split tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_kernel_matches_reference(n, dtype):
    """The fused merge vs ``reference.merge_attn_states`` in float64, elementwise.

    fp32: the weights w_s / W have a few ulp of error and the sums over n splits n ulp (standard bound), so
    |out - ref| <= (n + 4) 2^-24 sum_s (w_s / W) |o_s|, |lse - ref| <= (n + 4) 2^-24 (1 + |ref|).
    bf16: the kernel rounds the fp32 result to nearest (the interpreter too, via _round_to_bf16_grid), so
    half a bf16 ulp (2^-8 relative) plus that fp32 error. A merge that weighs splits equally, in base 2, or
    by a wrong max fails by orders of magnitude."""
    from dsaserve.kernels.sparse_attention import merge_splits_triton

    t, h, dv = 3, 5, 64
    o, lse = _merge_inputs(n, t, h, dv, seed=n)
    out, tot = merge_splits_triton(o, lse, dtype)
    rout, rtot = R.merge_attn_states(o.double(), lse.double())
    assert out.dtype == dtype and out.shape == (t, h, dv) and tot.shape == (t, h)
    w = torch.exp(lse.double() - torch.where(torch.isfinite(rtot), rtot, 0)[None])  # [n, t, h], sums to 1
    scale = (w[..., None] * o.double().abs()).sum(0)  # [t, h, dv]
    fp32_tol = (n + 4) * 2.0**-24
    if dtype == torch.float32:
        assert torch.all((out.double() - rout).abs() <= fp32_tol * scale)
    else:
        assert torch.all((out.double() - rout).abs() <= 2.0**-8 * rout.abs() + fp32_tol * scale)
    assert torch.equal(torch.isneginf(tot), torch.isneginf(rtot)) and not torch.isnan(tot).any()
    fin = torch.isfinite(rtot)
    assert torch.all((tot.double() - rtot)[fin].abs() <= fp32_tol * (1 + rtot[fin].abs()))
    # every split empty: the unsplit kernel's answer for a row without a valid key
    assert torch.all(out[0, 0] == 0) and torch.isneginf(tot[0, 0])
    if n > 1:  # one live split: its partial passes through (weight exactly 1), its lse too
        assert torch.equal(out[1, 1].float(), o[n // 2, 1, 1].to(dtype).float()) and tot[1, 1] == 3.0


@pytest.mark.checks(MERGE, "reference.merge_attn_states")
def test_merge_kernel_never_reads_empty_splits():
    """An empty split (lse = -inf) weighs 0 and its partial is not loaded: NaN there changes nothing."""
    from dsaserve.kernels.sparse_attention import merge_splits_triton

    o, lse = _merge_inputs(6, 3, 4, 32, seed=3)
    rout, rtot = R.merge_attn_states(o.double(), lse.double())  # zeros in the empty splits
    o[torch.isneginf(lse)] = float("nan")
    out, tot = merge_splits_triton(o, lse, torch.float32)
    assert not torch.isnan(out).any() and (out.double() - rout).abs().max() <= 1e-6 * rout.abs().max()
    fin = torch.isfinite(rtot)
    assert torch.equal(torch.isneginf(tot), torch.isneginf(rtot)) and (tot.double() - rtot)[fin].abs().max() <= 1e-6


def _ragged_inputs(t, h, dv, dr, slots, topk, dtype, seed):
    """Top-k lists as the indexer gives them: row 0 without a valid key, row 1 with one, row 2 with the
    first few valid then -1 padding (fewer valid keys than splits), the rest random with -1 scattered."""
    q, kv, idx = _inputs(t, h, dv, dr, slots, topk, dtype, seed)
    if t > 2:
        idx[2, 5:] = -1
    return q, kv, idx


@pytest.mark.checks(KERNEL, MERGE, "reference.sparse_mla")
@pytest.mark.parametrize("t,h,dv,dr,topk,bh,bk,splits,dtype", [
    (4, 64, 32, 16, 100, 64, 16, 2, torch.float32),
    (4, 64, 32, 16, 100, 64, 16, 3, torch.float32),  # 100 keys in splits of 48: the last one short
    (4, 64, 32, 16, 100, 64, 16, 1000, torch.float32),  # more splits asked than tiles: one per tile (7)
    (3, 128, 32, 16, 70, 64, 16, 5, torch.bfloat16),  # 128 heads = 2 head blocks
    (2, 128, 512, 64, 192, 64, 64, 3, torch.bfloat16),  # the real latent geometry, one 64-key tile a split
])
def test_split_kernel_matches_reference(t, h, dv, dr, topk, bh, bk, splits, dtype):
    """Split top-k + fused merge vs the float64 reference, at ragged -1-padded lists (rows with 0, 1 and 5
    valid keys: most of their splits are empty), and vs the same kernel unsplit.

    fp32: the interpreter computes in fp32; split and unsplit differ only in fp32 summation order (~1e-7
    relative). bf16: the merge rounds its fp32 result to nearest, so half a bf16 ulp plus fp32 error
    (the unsplit kernel's bf16 store truncates under the interpreter: one ulp, see _assert_close_to_reference)."""
    from dsaserve.kernels.sparse_attention import SparseMLAConfig

    q, kv, idx = _ragged_inputs(t, h, dv, dr, 50, topk, dtype, seed=t + h + splits)
    scale = 1 / math.sqrt(dv + dr)
    cfg = SparseMLAConfig(bh=bh, bk=bk, num_warps=4, num_stages=2)
    out, lse = K.sparse_mla(q, kv, idx, scale, d_v=dv, backend="triton", num_splits=splits, config=cfg)
    rout, rlse = R.sparse_mla(q.double(), kv.double(), idx, scale, d_v=dv)
    assert out.dtype == dtype and out.shape == (t, h, dv) and not torch.isnan(out).any()
    if dtype == torch.float32:
        assert (out.double() - rout).norm() <= 2e-6 * rout.norm()
    else:
        assert torch.all((out.double() - rout).abs() <= 2.0**-8 * rout.abs() + 2.0**-20 * rout.abs().max())
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)) and not torch.isnan(lse).any()
    fin = torch.isfinite(rlse)
    assert (lse[fin].double() - rlse[fin]).abs().max() <= 5e-6
    assert torch.all(out[0] == 0) and torch.isneginf(lse[0]).all()  # no valid key: as the unsplit kernel
    assert torch.equal(out[1], kv[3, :dv].expand(h, dv))  # one valid key: its value row, exactly
    one = K.sparse_mla(q, kv, idx, scale, d_v=dv, backend="triton", num_splits=1, config=cfg)
    assert torch.equal(torch.isneginf(one[1]), torch.isneginf(lse))
    assert (one[1][fin] - lse[fin]).abs().max() <= 2e-6
    if dtype == torch.float32:
        assert (one[0] - out).abs().max() <= 2e-6 * rout.abs().max()


@pytest.mark.checks(KERNEL, MERGE, "reference.sparse_mla")
def test_auto_splits_small_batches_only(monkeypatch):
    """num_splits=None: a decode-sized batch is split and merged (the interpreter reports 8 SMs, so t = 1
    at 2 head blocks gets 4 splits), a prefill-sized one runs unsplit; AUTO_SPLITS=False turns it off."""
    from dsaserve.kernels import sparse_attention as SA

    calls = []
    merge = SA.merge_splits_triton

    def counting_merge(o_buf, l_buf, out_dtype):
        calls.append(o_buf.shape[0])
        return merge(o_buf, l_buf, out_dtype)

    monkeypatch.setattr(SA, "merge_splits_triton", counting_merge)
    cfg = SA.SparseMLAConfig(bh=16, bk=16, num_warps=4, num_stages=2)
    for t, want in ((1, [4]), (5, [])):
        calls.clear()
        q, kv, idx = _ragged_inputs(t, 32, 32, 16, 40, 64, torch.float32, seed=t)
        idx[-1] = torch.arange(64, dtype=torch.int32) % 41 - 1  # a last row with valid keys (t = 1: the only)
        out, lse = K.sparse_mla(q, kv, idx, 0.2, d_v=32, backend="triton", config=cfg)
        assert calls == want
        rout, rlse = R.sparse_mla(q.double(), kv.double(), idx, 0.2, d_v=32)
        _assert_close_to_reference(out, lse, rout, rlse, torch.float32)
    monkeypatch.setattr(SA, "AUTO_SPLITS", False)
    calls.clear()
    K.sparse_mla(q[:1], kv, idx[:1], 0.2, d_v=32, backend="triton", config=cfg)
    assert calls == []


def test_sparse_attention_has_no_host_sync():
    """The launcher runs inside captured decode graphs: no .item() / .tolist() / ... anywhere in the module."""
    from dsaserve.kernels import sparse_attention
    from tests.kernels.sync_check import host_sync_calls

    assert host_sync_calls(sparse_attention) == []
