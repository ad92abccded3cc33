"""The one-pass glue kernels (Hadamard + act_quant, RMSNorm, RoPE) against their references on the GPU, at the
bench model's shapes: the Hadamard quantization and RoPE bit for bit, RMSNorm within one bf16 rounding."""

import pytest
import torch


def _kernels():
    from dsaserve import kernels  # imported in the test: see test_kernels_gpu._kernels

    return kernels, kernels.reference


def test_hadamard_act_quant_bitwise(gen):
    K, R = _kernels()
    q = (torch.randn(4096, 64, 128, device="cuda", generator=gen) * 3).bfloat16()
    q[0] = 0
    y, s = K.hadamard_act_quant(q)
    ry, rs = R.act_quant(R.hadamard_rotate(q.float()), block=128)
    assert torch.equal(s, rs) and torch.equal(y.view(torch.uint8), ry.view(torch.uint8))


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(gen, with_residual):
    K, R = _kernels()
    x = (torch.randn(4096, 7168, device="cuda", generator=gen) * 2).bfloat16()
    w = (1 + 0.3 * torch.randn(7168, device="cuda", generator=gen)).bfloat16()
    res = (torch.randn(4096, 7168, device="cuda", generator=gen) * 4).bfloat16() if with_residual else None
    y, r = K.rms_norm(x, w, 1e-6, res)
    ry, rr = R.rms_norm(x, w, 1e-6, res)
    if with_residual:
        assert torch.equal(r, rr)
    # the normalized value may round one ulp apart (fp32 mean in another order); the weight product rounds
    # again: at most 2 bf16 ulps, and nearly always equal
    diff = (y.float() - ry.float()).abs()
    mag = torch.maximum(y.float().abs(), ry.float().abs()).clamp_min(2.0**-126)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
    assert torch.all(diff <= 2 * ulp), (diff / ulp).max()
    assert (diff > 0).float().mean() < 0.02


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_bitwise(gen, interleaved):
    K, R = _kernels()
    q = torch.randn(4096, 128, 192, device="cuda", generator=gen).bfloat16()
    pos = torch.arange(4096, device="cuda").float()[:, None] * torch.rand(32, device="cuda", generator=gen)[None]
    cos, sin = pos.cos().bfloat16(), pos.sin().bfloat16()
    want = R.rope(q[..., 128:], cos, sin, interleaved)
    K.rope(q[..., 128:], cos, sin, interleaved, out=q[..., 128:])
    assert torch.equal(q[..., 128:], want)
