"""The Gluon sparse MLA prefill kernel (sm_90) against the fp32 PyTorch reference and the Triton kernel.

Skipped without an sm_90 GPU (Gluon has no CPU interpreter; the Triton kernel is the CPU-tested version of
the same math). Tolerances as for the Triton kernel (bf16 MMAs, bf16 P, fp32 softmax): tests/gpu/test_kernels_gpu.py.
"""

import pytest
import torch

MLA_REL = 5e-3
MLA_LSE = 1e-4


def _hopper():
    from dsaserve.kernels import sparse_mla_hopper as H

    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and H.HAVE_GLUON):
        pytest.skip("needs an sm_90 GPU and Gluon")
    return H


def _ragged_indices(t, topk, slots, gen):
    idx = torch.randint(-1, slots, (t, topk), device="cuda", generator=gen, dtype=torch.int32)
    idx[0] = -1  # no valid key
    idx[1, 1:] = -1  # exactly one
    idx[1, 0] = 3
    idx[2, 1000 % topk:] = -1  # -1 padding from the middle
    idx[3, ::2] = -1  # interleaved
    if t > 5:
        idx[5, : topk - 1] = -1  # only the last slot
        idx[5, topk - 1] = 11
    if t > 6 and topk > 70:
        idx[6] = -1  # only slot 70: a later block (the seesaw's block 2, owned by consumer 0; block 1 for BK 64)
        idx[6, 70] = 13
    return idx


VARIANTS = ["one_partition", "ws", "ws_bk32", "seesaw", "roles", "pair"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("h", [128, 64])
# 64-key kernels: 32 / 1 / 2 / 2 / 1 / 3 / 3 / 1 blocks; 32-key (seesaw, ws_bk32): 64 / 2 / 4 / 3 / 2 / 5 / 6 / 1
# (odd and even counts, the last block owned by either consumer, the four-buffer ring wrapping)
@pytest.mark.parametrize("topk", [2048, 64, 100, 96, 33, 160, 190, 1])
def test_hopper_prefill_matches_reference(gen, h, topk, variant):
    """Ragged lists (-1 anywhere, none, one, a top-k not a multiple of the key block, a single block),
    both head counts; exact rows: one valid key gives that key's value row bit for bit."""
    from dsaserve.kernels import reference as R

    H = _hopper()
    t, dv, dr, slots = 67, 512, 64, 16384
    q = torch.randn(t, h, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    kv = torch.randn(slots, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    idx = _ragged_indices(t, topk, slots, gen)
    scale = (dv + dr) ** -0.5
    assert H.hopper_prefill_supported(q, kv, idx, dv)
    out, lse = H.sparse_mla_prefill_hopper(q, kv, idx, scale, dv, variant=variant)
    rout, rlse = R.sparse_mla(q.float(), kv.float(), idx, scale, d_v=dv, chunk=8)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out.double() - rout.double()).norm() / rout.double().norm() < MLA_REL
    assert torch.all(out[0] == 0) and torch.isneginf(lse[0]).all()
    assert torch.equal(out[1], kv[3, :dv].expand(h, dv))
    if topk > 1:
        assert torch.equal(out[5], kv[11, :dv].expand(h, dv))
    if topk > 70:
        assert torch.equal(out[6], kv[13, :dv].expand(h, dv))
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin] - rlse[fin]).abs().max() < MLA_LSE


@pytest.mark.parametrize("variant", VARIANTS)
def test_hopper_prefill_matches_triton_kernel(gen, variant):
    """Bench shape class (128 heads, top-k 2048, 64K-slot pool, causal-like lists with repeated rows): the
    Gluon and Triton kernels agree to bf16 rounding, and per row (each row is its own softmax)."""
    from dsaserve.kernels.sparse_attention import SparseMLAConfig, sparse_mla_triton

    H = _hopper()
    t, h, dv, dr, slots, topk = 512, 128, 512, 64, 65536, 2048
    q = torch.randn(t, h, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16) * 2
    kv = torch.randn(slots, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    base = torch.randint(0, slots, (topk,), device="cuda", generator=gen, dtype=torch.int32)
    idx = base.expand(t, topk).clone()  # neighbouring queries share most of their keys (as in prefill)
    swap = torch.rand(t, topk, device="cuda", generator=gen) < 0.25
    idx[swap] = torch.randint(0, slots, (int(swap.sum()),), device="cuda", generator=gen, dtype=torch.int32)
    out, lse = H.sparse_mla_prefill_hopper(q, kv, idx, 0.07, dv, variant=variant)
    ref, rlse = sparse_mla_triton(q, kv, idx, 0.07, dv, config=SparseMLAConfig(), num_splits=1)
    rel = (out.double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1)
    assert rel.max() < 1e-2, f"worst row rel err {rel.max():.2e}"
    assert (lse - rlse).abs().max() < MLA_LSE


def test_hopper_prefill_refuses_what_it_cannot_take(gen):
    from dsaserve.kernels._common import KernelInputError

    H = _hopper()
    q = torch.randn(4, 96, 576, device="cuda", generator=gen, dtype=torch.bfloat16)  # 96 heads: not 64k
    kv = torch.randn(100, 576, device="cuda", generator=gen, dtype=torch.bfloat16)
    idx = torch.zeros(4, 64, device="cuda", dtype=torch.int32)
    assert not H.hopper_prefill_supported(q, kv, idx, 512)
    with pytest.raises(KernelInputError, match="h % 64"):
        H.sparse_mla_prefill_hopper(q, kv, idx, 0.1, 512)


@pytest.mark.parametrize("ws", [False, True])
def test_hopper_prefill_old_flag_picks_the_same_kernels(gen, ws):
    """``warp_specialized=`` (before ``variant=``) still selects the default (warp-specialized) / one-partition
    kernel."""
    H = _hopper()
    q = torch.randn(5, 64, 576, device="cuda", generator=gen, dtype=torch.bfloat16)
    kv = torch.randn(300, 576, device="cuda", generator=gen, dtype=torch.bfloat16)
    idx = _ragged_indices(5, 100, 300, gen)
    out, lse = H.sparse_mla_prefill_hopper(q, kv, idx, 0.05, 512, warp_specialized=ws)
    ref, rlse = H.sparse_mla_prefill_hopper(q, kv, idx, 0.05, 512, variant=H.DEFAULT_VARIANT if ws else "one_partition")
    assert torch.equal(out, ref) and torch.equal(lse, rlse)


@pytest.mark.parametrize("topk", [2048, 190, 33, 1])
def test_hopper_prefill_pair_schedules_agree(gen, topk):
    """The pair kernel with and without warpgroup 0's rotated loop (``early_s``) runs the same MMAs and the same
    fp32 operations in the same order, only issued at other times: equal outputs bit for bit (odd and even block
    counts, ragged rows)."""
    H = _hopper()
    t, h, dv, dr, slots = 67, 128, 512, 64, 16384
    q = torch.randn(t, h, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    kv = torch.randn(slots, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    idx = _ragged_indices(t, topk, slots, gen)
    out, lse = H.sparse_mla_prefill_hopper(q, kv, idx, 0.05, dv, variant="pair", early_s=True)
    ref, rlse = H.sparse_mla_prefill_hopper(q, kv, idx, 0.05, dv, variant="pair", early_s=False)
    assert torch.equal(out, ref) and torch.equal(lse, rlse)


@pytest.mark.parametrize("variant", ["roles", "pair"])
def test_hopper_prefill_wide_offsets(gen, variant):
    """A pool past 2^31 elements (3.73M latent rows, 4.3 GB): the "roles" and "pair" producers' 32-bit row offsets
    would wrap, so the launcher switches them to 64-bit ones; rows beyond the 2^31-element mark are gathered
    correctly."""
    from dsaserve.kernels import reference as R

    H = _hopper()
    t, h, dv, dr, topk = 5, 64, 512, 64, 130
    slots = 2**31 // (dv + dr) + 4096
    kv = torch.empty(slots, dv + dr, device="cuda", dtype=torch.bfloat16)
    kv[:8192].normal_(generator=gen)
    kv[-8192:].normal_(generator=gen)
    q = torch.randn(t, h, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    hi = torch.randint(slots - 8192, slots, (t, topk), device="cuda", generator=gen, dtype=torch.int32)
    lo = torch.randint(0, 8192, (t, topk), device="cuda", generator=gen, dtype=torch.int32)
    idx = torch.where(torch.rand(t, topk, device="cuda", generator=gen) < 0.5, hi, lo)
    idx[0, 7:] = -1
    out, lse = H.sparse_mla_prefill_hopper(q, kv, idx, 0.05, dv, variant=variant)
    # the reference on the gathered rows only (the whole pool in fp32 would be 8.6 GB)
    small = kv[idx.clamp(min=0).reshape(-1).long()].float()
    sidx = torch.arange(t * topk, device="cuda", dtype=torch.int32).view(t, topk).masked_fill(idx < 0, -1)
    rout, rlse = R.sparse_mla(q.float(), small, sidx, 0.05, d_v=dv, chunk=8)
    assert (out.double() - rout.double()).norm() / rout.double().norm() < MLA_REL
    assert (lse - rlse).abs().max() < MLA_LSE
