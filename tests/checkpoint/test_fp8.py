"""Block fp8 (e4m3, 128x128 scales) quantize/dequantize, DeepSeek's convention.

Error bound used below: e4m3 keeps 3 mantissa bits, so rounding a scaled value x/s in the normal range
[2^-6, 448] to nearest is off by at most half an ulp = 2^-4 * |x/s|; below 2^-6 (subnormals, spacing 2^-9)
by at most 2^-10. Hence per element |deq - w| <= 2^-4 |w| + 2^-10 s, and since the block amax maps to
>= 224 (ue8m0 rounds s up by < 2x), per block max |deq - w| <= 2^-4 * amax(block).
"""

import math

import pytest
import torch

from dsaserve.kernels.block_fp8 import (FP8_E4M3_MAX, dequantize_block_fp8, expand_block_scales, quantize_block_fp8,
                                     round_scale_ue8m0)

SHAPES = [(128, 128), (256, 384), (200, 300), (80, 128), (1024, 64), (32, 128), (128, 32), (1, 1)]


def _block_amax(w, block=(128, 128)):
    out, inn = w.shape
    nbo, nbi = math.ceil(out / block[0]), math.ceil(inn / block[1])
    amax = torch.zeros(nbo, nbi)
    for i in range(nbo):
        for j in range(nbi):
            amax[i, j] = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].abs().max()
    return amax


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_round_trip_within_e4m3_rounding(shape, ue8m0):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    # Blocks with very different magnitudes, so per-block scaling matters.
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]
    q, s = quantize_block_fp8(w, ue8m0=ue8m0)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    deq = dequantize_block_fp8(q, s)
    assert deq.dtype == torch.float32
    err = (deq - w).abs()
    per_elem_scale = expand_block_scales(s, shape)
    assert torch.all(err <= 2.0 ** -4 * w.abs() + 2.0 ** -10 * per_elem_scale + 1e-12)
    blk_err = _block_amax(deq - w)
    assert torch.all(blk_err <= 2.0 ** -4 * _block_amax(w))


@pytest.mark.parametrize("shape", [(256, 384), (200, 300)])
def test_scales(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    amax = _block_amax(w)
    _, s = quantize_block_fp8(w, ue8m0=False)
    torch.testing.assert_close(s, amax / FP8_E4M3_MAX, rtol=0, atol=0)
    q8, s8 = quantize_block_fp8(w, ue8m0=True)
    # Powers of two, rounded up, and the smallest such: amax/448 <= s < 2 * amax/448.
    assert torch.all(torch.log2(s8) == torch.round(torch.log2(s8)))
    assert torch.all(s8 >= amax / FP8_E4M3_MAX) and torch.all(s8 < 2 * amax / FP8_E4M3_MAX)
    assert q8.float().abs().max() <= FP8_E4M3_MAX


def test_round_scale_ue8m0_exact_powers():
    s = torch.tensor([0.25, 0.3, 1.0, 1.0000001, 3.0, 2.0 ** -20, 2.0 ** -20 * 1.5])
    assert round_scale_ue8m0(s).tolist() == [0.25, 0.5, 1.0, 2.0, 4.0, 2.0 ** -20, 2.0 ** -19]


def test_dequantize_is_value_times_block_scale():
    q = (torch.randn(200, 300, generator=torch.Generator().manual_seed(2)) * 50).to(torch.float8_e4m3fn)
    s = torch.tensor([[1.0, 2.0, 0.5], [4.0, 0.25, 8.0]])
    deq = dequantize_block_fp8(q, s)
    for i, j in [(0, 0), (127, 128), (128, 0), (199, 299), (150, 256), (5, 255)]:
        assert deq[i, j].item() == q[i, j].float().item() * s[i // 128, j // 128].item()


def test_exactly_representable_round_trips_exactly():
    # e4m3 grid values times a power of two survive quantization with ue8m0 scales bit for bit.
    grid = torch.randn(256, 256, generator=torch.Generator().manual_seed(3)).mul(100).to(torch.float8_e4m3fn).float()
    grid[0, 0], grid[128, 128] = 448.0, -448.0  # pin amax of two blocks to 448
    w = grid * 2.0 ** -7
    q, s = quantize_block_fp8(w, ue8m0=True)
    assert torch.equal(dequantize_block_fp8(q, s), w)


def test_zero_block_and_edge_blocks():
    w = torch.zeros(130, 260)
    w[129, 259] = 1.0  # only the last (partial) block is nonzero
    q, s = quantize_block_fp8(w, ue8m0=True)
    assert s.shape == (2, 3)
    deq = dequantize_block_fp8(q, s)
    assert torch.isfinite(deq).all() and torch.equal(deq, w)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        quantize_block_fp8(torch.zeros(3, 4, 5))
    q, s = quantize_block_fp8(torch.randn(200, 300))
    with pytest.raises(ValueError, match=r"scale_inv has shape \(2, 2\), expected \(2, 3\)"):
        dequantize_block_fp8(q, s[:, :2])


def test_other_block_size():
    w = torch.randn(100, 70, generator=torch.Generator().manual_seed(4))
    q, s = quantize_block_fp8(w, block=(64, 32))
    assert s.shape == (2, 3)
    deq = dequantize_block_fp8(q, s, block=(64, 32))
    assert (deq - w).abs().max() <= 2.0 ** -4 * w.abs().max()
