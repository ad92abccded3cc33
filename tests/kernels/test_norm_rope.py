"""The one-pass RMSNorm (+ residual) and RoPE kernels against their PyTorch references."""

import pytest
import torch

from dsaserve import kernels as K
from dsaserve.kernels import reference as R

from ._util import triton  # noqa: F401  (skips without triton)


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 values at |v| (fp32), the smallest normal spacing for tiny values."""
    e = torch.floor(torch.log2(v.float().abs().clamp_min(2.0**-126)))
    return torch.exp2(e - 7)


@pytest.mark.parametrize("shape", [(5, 96), (3, 2, 64), (4, 7168)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.checks("norm_rope.rms_norm_triton", "reference.rms_norm")
def test_rms_norm_matches_reference(shape, dtype, with_residual):
    g = torch.Generator().manual_seed(hash((shape, str(dtype), with_residual)) % 2**31)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    res = (torch.randn(*shape, generator=g) * 5).to(dtype) if with_residual else None
    y, r = K.rms_norm(x, w, 1e-6, res, backend="triton")
    ry, rr = R.rms_norm(x, w, 1e-6, res)
    assert y.dtype == dtype and y.shape == x.shape
    if with_residual:
        assert torch.equal(r, rr)                      # the residual stream is exact
    else:
        assert r is None and rr is None
    if dtype == torch.float32:
        torch.testing.assert_close(y, ry, rtol=4e-7, atol=1e-30)
    else:
        # the fp32 mean sums in another order: at most one bf16 rounding apart, and nearly always equal
        # (the normalized value one ulp apart, rounded again by the weight product: at most 2 ulps)
        diff = (y.float() - ry.float()).abs()
        assert torch.all(diff <= 2 * _bf16_ulp(torch.maximum(y.float().abs(), ry.float().abs()))), diff.max()
        assert (diff > 0).float().mean() < 0.02


@pytest.mark.checks("norm_rope.rms_norm_triton", "reference.rms_norm")
def test_rms_norm_strided_rows():
    """A column slice (kv_a's latent part of [n, 576]) is normed in place of a contiguous copy."""
    big = torch.randn(6, 40).to(torch.bfloat16)
    x = big[:, :32]
    w = torch.randn(32).to(torch.bfloat16)
    y, _ = K.rms_norm(x, w, 1e-6, backend="triton")
    ry, _ = R.rms_norm(x.contiguous(), w, 1e-6)
    assert torch.all((y.float() - ry.float()).abs() <= 2 * _bf16_ulp(torch.maximum(y.float().abs(), ry.float().abs())))


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.checks("norm_rope.rope_triton", "reference.rope")
def test_rope_bitwise_on_model_layouts(interleaved, dtype):
    """Bit-identical to the reference on MLA's q_pe (a [n, H, 64] slice of [n, H, 192]), the shared k_pe
    (a [n, 64] slice of [n, 576]), in place, and from q_pe's rows into the rope columns of another buffer (the
    sparse attention's absorbed queries [t, H, 512 + 64])."""
    g = torch.Generator().manual_seed(int(interleaved) * 7 + (dtype == torch.float32))
    n, H = 5, 3
    q = (torch.randn(n, H, 24, generator=g) * 4).to(dtype)
    kv = (torch.randn(n, 20, generator=g) * 4).to(dtype)
    ang = torch.randn(n, 4, generator=g) * 3
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    q_pe, k_pe = q[..., 16:], kv[:, 12:]
    want_q, want_k = R.rope(q_pe, cos, sin, interleaved), R.rope(k_pe, cos, sin, interleaved)
    got_q = K.rope(q_pe, cos, sin, interleaved, backend="triton")
    assert torch.equal(got_q, want_q)
    q_nope_before = q[..., :16].clone()
    K.rope(q_pe, cos, sin, interleaved, out=q_pe, backend="triton")            # in place
    assert torch.equal(q[..., 16:], want_q) and torch.equal(q[..., :16], q_nope_before)
    got_k = K.rope(k_pe, cos, sin, interleaved, backend="triton")
    assert torch.equal(got_k, want_k)
    q = (torch.randn(n, H, 24, generator=g) * 4).to(dtype)                    # fresh, un-roped
    q_pe = q[..., 16:]
    want_q = R.rope(q_pe[1:4], cos[1:4], sin[1:4], interleaved)
    q_before = q.clone()
    buf = torch.full((3, H, 12), 7.0, dtype=dtype)                           # [t, H, 4 + 8]: rope columns last
    K.rope(q_pe[1:4], cos[1:4], sin[1:4], interleaved, out=buf[..., 4:], backend="triton")
    assert torch.equal(buf[..., 4:], want_q) and torch.equal(buf[..., :4], torch.full((3, H, 4), 7.0, dtype=dtype))
    assert torch.equal(q, q_before)                                           # the source is only read


@pytest.mark.checks("reference.rope")
def test_rope_reference_rotates_pairs():
    """The reference against the rotation written out: interleaved pairs (x0, x1) by angle a, output laid out as
    (rotated evens | rotated odds)."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    a = torch.tensor([[0.5, -1.25]])
    y = R.rope(x, a.cos(), a.sin(), True)
    c, s = a.cos()[0], a.sin()[0]
    want = torch.tensor([[1 * c[0] - 2 * s[0], 3 * c[1] - 4 * s[1], 2 * c[0] + 1 * s[0], 4 * c[1] + 3 * s[1]]])
    torch.testing.assert_close(y, want, rtol=0, atol=1e-6)
    yh = R.rope(x, a.cos(), a.sin(), False)
    wanth = torch.tensor([[1 * c[0] - 3 * s[0], 2 * c[1] - 4 * s[1], 3 * c[0] + 1 * s[0], 4 * c[1] + 2 * s[1]]])
    torch.testing.assert_close(yh, wanth, rtol=0, atol=1e-6)


@pytest.mark.checks("reference.rms_norm")
def test_rms_norm_reference_formula():
    x = torch.tensor([[3.0, -4.0]])
    w = torch.tensor([2.0, 0.5])
    y, r = R.rms_norm(x, w, 0.0, torch.tensor([[1.0, 1.0]]))
    assert torch.equal(r, torch.tensor([[4.0, -3.0]]))
    rms = (12.5) ** 0.5
    torch.testing.assert_close(y, torch.tensor([[2 * 4 / rms, 0.5 * -3 / rms]]), rtol=1e-6, atol=0)


def test_bad_inputs():
    with pytest.raises(K.KernelInputError, match="weight"):
        K.rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(K.KernelInputError, match="cos/sin"):
        K.rope(torch.zeros(2, 8), torch.zeros(2, 3), torch.zeros(2, 3), True)


@pytest.mark.parametrize("shape", [(3, 256), (2, 2, 384), (1, 7168)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.checks("norm_rope.rms_norm_triton")
def test_rms_norm_quant_is_act_quant_of_its_output(shape, dtype, with_residual):
    """The fused e4m3 copy equals act_quant(y, 128) of the y it returns, bit for bit (values over many
    magnitudes: groups with tiny and with large amax), and y / the residual equal the plain rms_norm's."""
    g = torch.Generator().manual_seed(sum(shape) + with_residual)
    x = (torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[-1])).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    res = (torch.randn(*shape, generator=g)).to(dtype) if with_residual else None
    y, r, q = K.rms_norm_quant(x, w, 1e-6, res, backend="triton")
    y0, r0 = K.rms_norm(x, w, 1e-6, res, backend="triton")
    assert torch.equal(y, y0) and (r is None if res is None else torch.equal(r, r0))
    xq, xs = K.act_quant(y, 128, backend="reference")
    assert q[0].shape == shape and q[1].shape == (*shape[:-1], shape[-1] // 128)
    assert torch.equal(q[0].view(torch.uint8), xq.view(torch.uint8)) and torch.equal(q[1], xs)


def test_rms_norm_quant_falls_back_without_whole_groups():
    """N not a multiple of 128, or the CPU reference path: no fused copy (the consumer quantizes y itself)."""
    x, w = torch.randn(2, 96), torch.ones(96)
    y, r, q = K.rms_norm_quant(x, w, 1e-6, backend="triton")
    assert q is None and r is None and torch.equal(y, K.rms_norm(x, w, 1e-6, backend="triton")[0])
    assert K.rms_norm_quant(torch.randn(2, 256), torch.ones(256), 1e-6, backend="reference")[2] is None


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.checks("norm_rope.mla_latent_triton", "reference.mla_latent")
def test_mla_latent_is_norm_and_rope_of_kv(interleaved, dtype):
    """[rms_norm(c) | rope(k_pe)] of a kv_a output (a column block of the fused q_a | wk | kv_a GEMM): bit-identical
    to the rms_norm and rope kernels on the same views, and to the reference within the norm's rounding."""
    g = torch.Generator().manual_seed(3 + interleaved)
    n, lat, r = 6, 96, 16
    fused = (torch.randn(n, 40 + lat + r, generator=g) * 3).to(dtype)
    kv = fused[:, 40:]
    w = (1 + 0.3 * torch.randn(lat, generator=g)).to(dtype)
    ang = torch.randn(n, r // 2, generator=g) * 3
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    got = K.mla_latent(kv, w, 1e-6, cos, sin, interleaved, backend="triton")
    assert got.shape == (n, lat + r) and got.dtype == dtype
    norm, _ = K.rms_norm(kv[:, :lat], w, 1e-6, backend="triton")
    assert torch.equal(got[:, :lat], norm)
    assert torch.equal(got[:, lat:], R.rope(kv[:, lat:], cos, sin, interleaved))
    ref = R.mla_latent(kv, w, 1e-6, cos, sin, interleaved)
    assert torch.equal(ref[:, lat:], got[:, lat:])
    diff = (got[:, :lat].float() - ref[:, :lat].float()).abs()
    assert torch.all(diff <= 2 * _bf16_ulp(torch.maximum(got[:, :lat].float().abs(), ref[:, :lat].float().abs())))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,inter", [(3, 256), (5, 96)])
@pytest.mark.checks("norm_rope.silu_mul_triton", "reference.silu_mul")
def test_silu_mul_and_its_fp8_copy(dtype, n, inter):
    """silu(gate) * up within one rounding of the reference (silu's exp differs in the last fp32 bits), nearly
    always equal; the fp8 copy (I % 128 == 0) bit-identical to act_quant of the returned values."""
    g = torch.Generator().manual_seed(n + inter)
    gu = (torch.randn(n, 2 * inter, generator=g) * 3).to(dtype)
    y, q = K.silu_mul(gu, quant=True, backend="triton")
    ref = R.silu_mul(gu)
    assert y.shape == (n, inter) and y.dtype == dtype
    if dtype == torch.bfloat16:
        diff = (y.float() - ref.float()).abs()
        assert torch.all(diff <= _bf16_ulp(torch.maximum(y.float().abs(), ref.float().abs()))), diff.max()
        assert (diff > 0).float().mean() < 0.02
    else:
        torch.testing.assert_close(y, ref, rtol=4e-6, atol=1e-7)
    if inter % 128:
        assert q is None
    else:
        xq, xs = K.act_quant(y, 128, backend="reference")
        assert torch.equal(q[0].view(torch.uint8), xq.view(torch.uint8)) and torch.equal(q[1], xs)
    assert K.silu_mul(gu, backend="reference")[1] is None and torch.equal(K.silu_mul(gu, backend="reference")[0], ref)
