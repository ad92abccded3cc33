import pytest
import torch

from dsaserve import kernels as K
from dsaserve.kernels import reference as R

from ._util import triton  # noqa: F401  (skips without triton)


@pytest.mark.parametrize("shape,block", [((5, 300), 128), ((3, 2, 128), 128), ((4, 64), 128), ((7, 1), 128),
                                         ((6, 100), 32)])
@pytest.mark.parametrize("ue8m0", [
    pytest.param(False, marks=pytest.mark.checks("quant.act_quant_triton", "reference.act_quant")),
    pytest.param(True, marks=pytest.mark.checks("quant.act_quant_triton", "reference.act_quant",
                                                "reference.ue8m0_scale")),
])
def test_triton_matches_reference_bitwise(shape, block, ue8m0):
    g = torch.Generator().manual_seed(hash((shape, block, ue8m0)) % 2**31)
    x = torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g) * 3)
    x.view(-1)[:3] = 0.0  # zeros and a spread of magnitudes
    y, s = K.act_quant(x, block, ue8m0, backend="triton")
    ry, rs = R.act_quant(x, block, ue8m0)
    g_ = min(block, shape[-1])
    assert s.shape == (*shape[:-1], -(-shape[-1] // g_)) and s.dtype == torch.float32
    assert y.shape == x.shape and y.dtype == torch.float8_e4m3fn
    assert torch.equal(s, rs)
    # same e4m3 values (the interpreter may write +0 for -0; the GPU run compares bits)
    assert torch.equal(y.float(), ry.float())


@pytest.mark.checks("quant.act_quant_triton", "reference.act_quant")
def test_bf16_input_and_zero_row():
    x = torch.randn(3, 256).to(torch.bfloat16)
    x[1] = 0
    y, s = K.act_quant(x, backend="triton")
    ry, rs = R.act_quant(x)
    assert torch.equal(s, rs) and torch.equal(y.float(), ry.float())
    assert torch.all(s[1] == 1e-4 / 448) and torch.all(y[1].float() == 0)


@pytest.mark.checks("reference.act_quant", "reference.act_dequant")
def test_reference_semantics():
    x = torch.randn(4, 256) * 5
    y, s = R.act_quant(x)
    amax = x.view(4, 2, 128).abs().amax(-1)
    assert torch.equal(s, amax / torch.full_like(amax, 448.0))
    # the group max maps to +-448 exactly; the round trip is within e4m3's half-ulp (2^-4 relative)
    assert torch.allclose(y.float().view(4, 2, 128).abs().amax(-1), torch.full((4, 2), 448.0))
    err = (R.act_dequant(y, s) - x).abs() / x.abs().clamp_min(1e-3)
    assert err.max() < 2**-4 + 1e-6


@pytest.mark.checks("reference.ue8m0_scale", "quant.act_quant_triton")
def test_ue8m0_scale_exact_near_powers_of_two():
    v = torch.tensor([2.0**-10, 2.0**-10 * (1 + 2**-23), 0.75, 1.0, 3.0, 2.0**-20 * (1 + 2**-22)])
    want = torch.tensor([2.0**-10, 2.0**-9, 1.0, 1.0, 4.0, 2.0**-19])
    assert torch.equal(R.ue8m0_scale(v), want)
    # power-of-two scales from act_quant, always >= the plain scale
    x = torch.randn(8, 128) * 3
    s = K.act_quant(x, ue8m0=True, backend="triton")[1]
    m, _ = torch.frexp(s)
    plain = R.act_quant(x)[1]
    assert torch.all(m == 0.5) and torch.all(s >= plain) and torch.all(s < 2 * plain)


@pytest.mark.parametrize("shape,dtype", [((5, 3, 128), torch.bfloat16), ((7, 64), torch.float32), ((1, 16), torch.float32),
                                         ((33, 2), torch.bfloat16)])
@pytest.mark.checks("quant.hadamard_act_quant_triton", "reference.act_quant", "reference.hadamard_rotate")
def test_hadamard_act_quant_matches_composition_bitwise(shape, dtype):
    """The fused kernel == act_quant(hadamard_rotate(x.float()), D): same e4m3 values, same scales, bit for bit
    (spread magnitudes, an all-zero row that hits the amax clamp)."""
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    x = (torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g) * 2)).to(dtype)
    x.view(-1, shape[-1])[0] = 0.0
    y, s = K.hadamard_act_quant(x, backend="triton")
    ry, rs = R.act_quant(R.hadamard_rotate(x.float()), block=shape[-1])
    assert y.shape == x.shape and y.dtype == torch.float8_e4m3fn
    assert s.shape == (*shape[:-1], 1) and s.dtype == torch.float32
    assert torch.equal(s, rs)
    assert torch.equal(y.float(), ry.float())


def test_hadamard_act_quant_no_rows():
    y, s = K.hadamard_act_quant(torch.zeros(0, 128, dtype=torch.bfloat16), backend="triton")
    assert y.shape == (0, 128) and s.shape == (0, 1)


def test_hadamard_act_quant_bad_dims():
    with pytest.raises(K.KernelInputError, match="power of two"):
        K.hadamard_act_quant(torch.zeros(4, 96))
    with pytest.raises(K.KernelInputError, match="fp32/bf16"):
        K.hadamard_act_quant(torch.zeros(4, 64, dtype=torch.int32))


def test_bad_input_errors():
    with pytest.raises(K.KernelInputError, match="fp32/bf16"):
        K.act_quant(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(K.KernelInputError, match="last dim"):
        K.act_quant(torch.zeros(4, 0))


@pytest.mark.checks("reference.hadamard_rotate")
def test_hadamard_is_orthonormal_sylvester():
    d = 16
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(3, 5, d, dtype=torch.float64)
    y = K.hadamard_rotate(x)
    torch.testing.assert_close(y, x @ h.double().T * d**-0.5, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(K.hadamard_rotate(y), x, rtol=1e-14, atol=1e-14)  # H/sqrt(d) is its own inverse
    with pytest.raises(ValueError, match="power of two"):
        K.hadamard_rotate(torch.randn(2, 12))
