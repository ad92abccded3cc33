"""The indexer's fused key path (LayerNorm -> RoPE -> Hadamard + e4m3) against the model's composition."""

import pytest
import torch

from dsaserve import kernels as K
from dsaserve.kernels import reference as R

from ._util import triton  # noqa: F401  (skips without triton)


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at |v| (fp32 in; normal numbers)."""
    mant = 7 if dtype == torch.bfloat16 else 23
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0**-126))) - mant)


def _inputs(n, d, half, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    big = (torch.randn(n, d + 40, generator=g) * 3 + 0.7).to(dtype)
    x = big[:, 8:8 + d] if strided else big[:, :d].contiguous()  # the fused GEMM's column block: row stride d + 40
    w = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)
    b = (0.2 * torch.randn(d, generator=g)).to(dtype)
    ang = torch.randn(n, half, generator=g) * 3
    return x, w, b, ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,d,half", [(7, 128, 32), (20, 64, 8), (1, 128, 64)])
@pytest.mark.checks("key_path.indexer_key_triton", "reference.indexer_key")
def test_indexer_key_matches_the_composition(interleaved, dtype, n, d, half):
    x, w, b, cos, sin = _inputs(n, d, half, dtype, seed=n + d + half + interleaved, strided=n > 5)
    # the model's path, op by op: k_norm (fp32, cast back), RoPE of the first 2 * half dims in place, quantize
    ln = torch.nn.functional.layer_norm(x.float(), (d,), w.float(), b.float(), 1e-6).to(dtype)
    want = ln.clone()
    want[:, :2 * half] = R.rope(ln[:, :2 * half], cos, sin, interleaved)
    key, none = K.indexer_key(x, w, b, 1e-6, cos, sin, interleaved, quantize=False, backend="triton")
    assert none is None and key.dtype == dtype and key.shape == (n, d)
    ref, _ = R.indexer_key(x, w, b, 1e-6, cos, sin, interleaved, quantize=False)
    assert torch.equal(ref, want)
    # the LayerNorm sums in another order: a normed value may land one rounding of dtype away (fp32: a few
    # ulps, the mean and rstd themselves differ), and RoPE mixes each pair: bound every output column by the
    # ulp of the larger normed value it reads; nearly all are equal
    j = torch.arange(d)
    p = j % half
    if interleaved:
        ia, ib = torch.where(j < half, 2 * p, 2 * p + 1), torch.where(j < half, 2 * p + 1, 2 * p)
    else:
        ia, ib = torch.where(j < half, p, p + half), torch.where(j < half, p + half, p)
    ia, ib = torch.where(j < 2 * half, ia, j), torch.where(j < 2 * half, ib, j)
    # plus, absolutely, a few fp32 ulps of the row's largest normed value (a different mean / rstd moves every
    # value of the row by about that much)
    mag = torch.maximum(ln.float()[:, ia].abs(), ln.float()[:, ib].abs())
    row = _ulp(ln.float().abs().amax(1, keepdim=True), torch.float32)
    diff = (key.float() - want.float()).abs()
    assert torch.all(diff <= 2 * _ulp(mag, dtype) + 4 * row), (diff / (_ulp(mag, dtype) + row)).max()
    if dtype == torch.bfloat16:
        assert (diff > 0).float().mean() < 0.02
    # quantize: bit-identical to hadamard_act_quant of the key the kernel itself normed
    q8, scale = K.indexer_key(x, w, b, 1e-6, cos, sin, interleaved, quantize=True, backend="triton")
    hq, hs = K.hadamard_act_quant(key, backend="triton")
    assert q8.dtype == torch.float8_e4m3fn and scale.shape == (n,)
    assert torch.equal(q8.view(torch.uint8), hq.view(torch.uint8)) and torch.equal(scale, hs[:, 0])
    rq, rs = R.indexer_key(x, w, b, 1e-6, cos, sin, interleaved, quantize=True)
    # against the reference end to end: the scales within the normed key's rounding, values dequantized close
    torch.testing.assert_close(scale, rs, rtol=2 ** -6, atol=0)
    deq, rdeq = q8.float() * scale[:, None], rq.float() * rs[:, None]
    assert float((deq - rdeq).norm() / rdeq.norm()) < 2 ** -7


@pytest.mark.checks("reference.indexer_key")
def test_indexer_key_reference_is_the_model_composition():
    """The reference equals the layers it replaces: LayerNorm module, in-place RoPE of the rope dims,
    hadamard_act_quant."""
    from dsaserve.model.layers import LayerNorm

    x, w, b, cos, sin = _inputs(6, 64, 16, torch.float32, seed=3)
    norm = LayerNorm(64, 1e-6, torch.float32)
    norm.weight.data.copy_(w)
    norm.bias.data.copy_(b)
    k = norm(x)
    k[:, :32] = R.rope(k[:, :32].clone(), cos, sin, True)
    want_q, want_s = R.act_quant(R.hadamard_rotate(k), block=64)
    got_q, got_s = R.indexer_key(x, w, b, 1e-6, cos, sin, True, quantize=True)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(got_s, want_s[:, 0])
    got_k, _ = R.indexer_key(x, w, b, 1e-6, cos, sin, True, quantize=False)
    assert torch.equal(got_k, k)


def test_indexer_key_bad_inputs():
    x = torch.randn(3, 64)
    with pytest.raises(K.KernelInputError, match="weight / bias"):
        K.indexer_key(x, torch.ones(32), torch.zeros(32), 1e-6, torch.ones(3, 8), torch.ones(3, 8), True, True)
    with pytest.raises(K.KernelInputError, match="cos / sin"):
        K.indexer_key(x, torch.ones(64), torch.zeros(64), 1e-6, torch.ones(3, 40), torch.ones(3, 40), True, True)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.checks("key_path.indexer_query_triton", "reference.indexer_query")
def test_indexer_query_is_rope_then_hadamard_quant(interleaved, dtype):
    """Bit-identical to the model's composition: RoPE of the rope dims (q is a head view of the fused q_b | wq_b
    output: token stride larger than H * D), hadamard_act_quant per head, scale folded into the head weights."""
    g = torch.Generator().manual_seed(11 + interleaved)
    n, H, D, half = 5, 6, 64, 16
    fused = (torch.randn(n, 100 + H * D, generator=g) * 2).to(dtype)
    q = fused[:, 100:].view(n, H, D)
    ang = torch.randn(n, half, generator=g) * 3
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    w = torch.randn(n, H, generator=g)
    roped = q.clone()
    roped[..., :2 * half] = R.rope(q[..., :2 * half], cos, sin, interleaved)
    want_q, want_s = K.hadamard_act_quant(roped, backend="reference")
    want_w = w * want_s[..., 0]
    for backend in ("triton", "reference"):
        got_q, got_w = K.indexer_query(q, cos, sin, interleaved, w, backend=backend)
        assert got_q.shape == (n, H, D) and got_w.shape == (n, H)
        assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(got_w, want_w)
