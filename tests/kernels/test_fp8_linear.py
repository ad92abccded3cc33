"""fp8 block-scaled linear: the Triton kernel (CPU interpreter) against the reference contract, the error
bound against the exact product, load-time preparation, quantization and input errors."""

import dataclasses

import pytest
import torch

from dsaserve.kernels.block_fp8 import dequantize_block_fp8, quantize_block_fp8
from dsaserve.kernels import KernelInputError
from dsaserve.kernels import f32_linear as F32
from dsaserve.kernels import splitk
from dsaserve.kernels import fp8_linear as FL
from dsaserve.kernels import reference as R

from ._util import triton  # noqa: F401  (skips without triton)
from .sync_check import host_sync_calls


def _weight(n, k, gen, scale=0.05):
    w = torch.randn(n, k, generator=gen) * scale
    w[: min(n, 3), : min(k, 5)] *= 40  # blocks of very different magnitude
    return FL.quantize_weight_fp8(w)


def _x(m, k, gen):
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))  # per-row spread
    if m > 1:
        x[1] = 0.0  # an all-zero row (amax floor)
    return x


# (M, K, N): ragged M, K < 128, K not a multiple of 128, N = 24 / 130 / 576 (kv_a) / 2112 (q_a + kv_a)
SHAPES = [(5, 256, 24), (3, 64, 130), (17, 200, 576), (1, 384, 2112), (70, 256, 136)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(m, k, n, out_dtype):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    wq, ws = _weight(n, k, g)
    x = _x(m, k, g)
    ref = FL.fp8_linear_reference(x, wq, ws, out_dtype)
    got = FL.fp8_linear(x, wq, ws, out_dtype, backend="triton")
    assert got.shape == (m, n) and got.dtype == out_dtype
    if out_dtype == torch.float32:
        # same products, fp32 sums in another order
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        # bf16: identical but for rare round-to-bf16 ties decided by the fp32 sum order (1 ulp)
        ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs()
        assert torch.all((got.float() - ref.float()).abs() <= ulp)
        assert (got != ref).float().mean() < 0.01


@pytest.mark.parametrize("m,k,n", [(5, 256, 24), (70, 384, 136)])
def test_quantized_input_gives_what_the_unquantized_one_does(m, k, n):
    """``fp8_linear_quantized`` on act_quant's (xq, xs) of x: the reference equals ``fp8_linear_reference(x)`` bit for
    bit (the same dequantized operands and matmul), the Triton GEMM equals the Triton path on x; a bad xs is refused."""
    g = torch.Generator().manual_seed(m + k + n)
    wq, ws = _weight(n, k, g)
    p = FL.prepare_fp8_weight(wq, ws)
    x = _x(m, k, g)
    xq, xs = R.act_quant(x, 128)
    assert torch.equal(FL.fp8_linear_quantized(xq, xs, p, torch.float32), FL.fp8_linear_reference(x, wq, ws))
    assert torch.equal(FL.fp8_linear_quantized(xq, xs, p, torch.bfloat16, backend="triton"),
                       FL.fp8_linear_prepared(x, p, torch.bfloat16, backend="triton", x_fp8=(xq, xs)))
    with pytest.raises(KernelInputError, match="xs must be fp32"):
        FL.fp8_linear_quantized(xq, xs[:, :1], p, torch.float32)
    with pytest.raises(KernelInputError, match="xq must be e4m3"):
        FL.fp8_linear_quantized(x, xs, p, torch.float32)


def test_prepared_layout_and_configs():
    g = torch.Generator().manual_seed(1)
    wq, ws = _weight(24, 200, g)
    p = FL.prepare_fp8_weight(wq, ws)
    assert p.weight.shape == (32, 208) and p.scale.shape == (1, 4)  # rows/cols to 16, scale cols to 4
    assert torch.equal(p.weight[24:].float(), torch.zeros(8, 208)) and torch.equal(p.scale[:, 2:], torch.zeros(1, 2))
    w2, s2 = p.unpadded()
    assert torch.equal(w2.float(), wq.float()) and torch.equal(s2, ws)
    x = _x(40, 200, g)
    ref = FL.fp8_linear_reference(x, wq, ws, torch.float32)
    for cfg in (FL.Fp8GemmConfig(bm=16, bn=64), FL.Fp8GemmConfig(bm=32, bn=32, group_m=2)):
        got = FL.fp8_linear_prepared(x, p, torch.float32, backend="triton", config=cfg)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # tensor-descriptor (TMA) operands: K a multiple of 16, ragged M and N
    wq, ws = _weight(40, 192, g)
    p = FL.prepare_fp8_weight(wq, ws)
    x = _x(21, 192, g)
    ref = FL.fp8_linear_reference(x, wq, ws, torch.float32)
    got = FL.fp8_linear_prepared(x, p, torch.float32, backend="triton", config=FL.Fp8GemmConfig(32, 64, tma=True))
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    with pytest.raises(KernelInputError, match="K % 16"):
        FL.fp8_linear_prepared(_x(3, 200, g), FL.prepare_fp8_weight(*_weight(8, 200, g)), backend="triton",
                               config=FL.Fp8GemmConfig(32, 64, tma=True))


@pytest.mark.parametrize("m,k,n,split", [(1, 200, 24, 1), (5, 256, 130, 1), (3, 1024, 40, 2), (33, 384, 64, None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_in_kernel_quantization_is_bit_identical(m, k, n, split, dtype, monkeypatch):
    """Decode-sized M: the GEMM that quantizes x itself == act_quant + the GEMM on the e4m3 copy, bit for bit
    (ragged M, K < 128 and K not a multiple of 128, split K)."""
    g = torch.Generator().manual_seed(m * 7 + k + n)
    wq, ws = _weight(n, k, g)
    p = FL.prepare_fp8_weight(wq, ws)
    x = _x(m, k, g).to(dtype)
    cfg = FL.Fp8GemmConfig(bm=16, bn=64, num_warps=4, split_k=split)
    xq, xs = FL.act_quant(x, FL.BLOCK)
    want = FL.fp8_gemm_triton(xq, xs, p, torch.float32, cfg)
    got = FL.fp8_gemm_triton(x, None, p, torch.float32, cfg)
    assert torch.equal(got, want)
    # and the layer's decode path (act_quant + GEMM by default, or this kernel when enabled) gives the same bits
    assert torch.equal(FL.fp8_linear_prepared(x, p, torch.float32, backend="triton", config=cfg), want)
    with monkeypatch.context() as mp:
        mp.setattr(FL, "QUANT_IN_GEMM_MAX_BM", 16)
        assert torch.equal(FL.fp8_linear_prepared(x, p, torch.float32, backend="triton", config=cfg), want)


@pytest.mark.parametrize("m,k,n,split,tma", [(3, 1024, 24, None, False), (2, 600, 40, 2, False),
                                              (9, 768, 64, 4, True)])
def test_split_k(m, k, n, split, tma):
    """Small-M (decode) GEMMs split K over programs: fp32 partials reduced in split order."""
    g = torch.Generator().manual_seed(m + k)
    wq, ws = _weight(n, k, g)
    p = FL.prepare_fp8_weight(wq, ws)
    cfg = FL.Fp8GemmConfig(bm=16, bn=32, num_warps=4, split_k=split, tma=tma)
    assert FL.choose_split_k(m, n, k, cfg, n_sms=8) == (split or 2)  # auto: capped by k_blocks // 4 = 2
    x = _x(m, k, g)
    for out_dtype in (torch.float32, torch.bfloat16):
        ref = FL.fp8_linear_reference(x, wq, ws, out_dtype)
        got = FL.fp8_linear_prepared(x, p, out_dtype, backend="triton", config=cfg)
        tol = 1e-5 if out_dtype == torch.float32 else torch.finfo(torch.bfloat16).eps
        assert torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())
        # the in-kernel reduction (the tile's last program) adds the same partials in the same order as the
        # second launch: same bits; and it leaves every arrival counter at zero for the next GEMM
        two_launch = dataclasses.replace(cfg, reduce_in_kernel=False)
        assert torch.equal(got, FL.fp8_linear_prepared(x, p, out_dtype, backend="triton", config=two_launch))
        assert not any(int(c.abs().sum()) for c in splitk._SPLIT_COUNTERS.values())


def test_error_bound_holds_and_is_informative():
    g = torch.Generator().manual_seed(2)
    for m, k, n in [(64, 512, 96), (9, 100, 40)]:
        wq, ws = _weight(n, k, g)
        x = _x(m, k, g)
        exact = x @ dequantize_block_fp8(wq, ws).t()  # fp32, the dequantized-bf16-weights path in fp32
        worst = FL.fp8_linear_error_bound(x, wq, ws, torch.bfloat16)
        stat = FL.fp8_linear_error_bound(x, wq, ws, torch.bfloat16, sigmas=6.0)
        for backend in ("reference", "triton"):
            y = FL.fp8_linear(x, wq, ws, torch.bfloat16, backend=backend).float()
            err = (y - exact).abs()
            assert torch.all(err <= worst) and torch.all(err <= stat), backend
        rel = ((y - exact).norm() / exact.norm()).item()
        assert 0.005 < rel < 0.04  # the typical fp8 activation error (~2.5%)
        assert torch.all(stat <= worst)
        assert (stat.norm() / exact.norm()).item() < 0.25  # the statistical bound is tight enough to use
        assert (err / stat).max() > 0.2  # ... and not vacuous: the largest error uses a good part of it


def test_quantize_weight_fp8_2d_3d():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 200, 136, generator=g)
    q, s = FL.quantize_weight_fp8(w)
    assert q.shape == w.shape and q.dtype == torch.float8_e4m3fn and s.shape == (3, 2, 2)
    q1, s1 = quantize_block_fp8(w[1])
    assert torch.equal(q[1].float(), q1.float()) and torch.equal(s[1], s1)
    deq = dequantize_block_fp8(q[2], s[2])
    assert torch.all((deq - w[2]).abs() <= 2**-4 * w[2].abs() + 2**-10 * s[2].max())
    qe, se = FL.quantize_weight_fp8(w[0], ue8m0=True)
    assert torch.all(torch.frexp(se)[0] == 0.5)  # power-of-two scales


def test_shapes_dtypes_and_backends():
    g = torch.Generator().manual_seed(4)
    wq, ws = _weight(48, 128, g)
    x = torch.randn(2, 3, 128, generator=g).to(torch.bfloat16)
    y = FL.fp8_linear(x, wq, ws)  # CPU 'auto' = reference, out dtype = x's
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    assert torch.equal(y, FL.fp8_linear_reference(x.reshape(6, 128), wq, ws).reshape(2, 3, 48))
    yt = FL.fp8_linear(x, wq, ws, backend="triton")
    assert yt.shape == (2, 3, 48) and yt.dtype == torch.bfloat16
    assert FL.fp8_linear(x[:0, 0], wq, ws, backend="triton").shape == (0, 48)


def test_bad_inputs():
    g = torch.Generator().manual_seed(5)
    wq, ws = _weight(40, 256, g)
    x = torch.randn(4, 256)
    with pytest.raises(KernelInputError, match=r"scale_inv must be \[ceil\(N/128\), ceil\(K/128\)\]"):
        FL.fp8_linear(x, wq, ws[:, :1])
    with pytest.raises(KernelInputError, match="float8_e4m3fn"):
        FL.fp8_linear(x, wq.float(), ws)
    with pytest.raises(KernelInputError, match="in_features 256"):
        FL.fp8_linear(torch.randn(4, 128), wq, ws)
    with pytest.raises(KernelInputError, match="backend must be"):
        FL.fp8_linear(x, wq, ws, backend="fast")
    with pytest.raises(KernelInputError, match="needs CUDA"):
        FL.fp8_linear(x, wq, ws, backend="cublas")
    with pytest.raises(KernelInputError, match="must divide 128"):
        FL.fp8_linear_prepared(x, FL.prepare_fp8_weight(wq, ws), backend="triton", config=FL.Fp8GemmConfig(bn=256))


def test_no_host_sync_in_device_paths():
    assert host_sync_calls(FL) == []


@pytest.mark.parametrize("n,k,split", [(200, 1000, None), (64, 384, 1), (130, 768, 3)])
def test_gemv_for_one_row(n, k, split):
    """M = 1 on the CUDA cores: the reference contract (fp32 sums of the same fp8 products), ragged N and K,
    split K reduced in the kernel or by a second launch with the same bits."""
    g = torch.Generator().manual_seed(n + k)
    wq, ws = _weight(n, k, g)
    p = FL.prepare_fp8_weight(wq, ws)
    x = _x(1, k, g)
    xq, xs = FL.act_quant(x, FL.BLOCK)
    cfg = FL.Fp8GemmConfig(bn=32, num_warps=4, gemv=True, split_k=split)
    ref = FL.fp8_linear_reference(x, wq, ws, torch.float32)
    got = FL.fp8_gemm_triton(xq, xs, p, torch.float32, cfg)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    two = FL.fp8_gemm_triton(xq, xs, p, torch.float32, dataclasses.replace(cfg, reduce_in_kernel=False))
    assert torch.equal(got, two)
    bf = FL.fp8_gemm_triton(xq, xs, p, torch.bfloat16, cfg)
    assert torch.equal(bf, got.to(torch.bfloat16))
    # and the layer's decode path takes it with this config
    assert torch.equal(FL.fp8_linear_prepared(x, p, torch.float32, backend="triton", config=cfg), got)


@pytest.mark.parametrize("m,n,k", [(1, 64, 7168), (3, 40, 1000), (1, 8, 100)])
def test_linear_f32_small_rows(m, n, k):
    """The fp32 decode projections (router, indexer head weights): bf16 rows x fp32 weight, times a scale, split K
    reduced in the kernel; fp32 sums in another order than torch's."""
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g) * 0.02
    want = (x.float() @ w.t()) * 0.125
    got = F32.linear_f32(x, w, 0.125, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # |error| of an fp32 dot of k terms in any order: <= k * 2^-24 * sum |x w| (a loose worst case, tight enough
    # to catch a dropped split or a wrong scale)
    bound = k * 2.0**-24 * ((x.float().abs() @ w.abs().t()) * 0.125)
    assert torch.all((got - want).abs() <= bound)
    assert torch.equal(F32.linear_f32(x, w, 0.125, backend="reference"), (x.float() @ w.t()) * 0.125)
    assert not any(int(c.abs().sum()) for c in splitk._SPLIT_COUNTERS.values())


def _split_cases():
    """fp32 weights at odd sizes plus the values the rounding must get right: bf16 ties (bits ...8000: even and odd
    upper halves), exact bf16 values, signed zeros, the largest magnitude that rounds to a finite bf16, a tiny one, 1 + 1 ulp."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 1001, generator=g) * 0.02
    special = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F800001, 0x3F7FFFFF, 0x00000000, 0x80000000,
                            0x7F7F7FFF, 0x0C000001, 0x3C23D70A], dtype=torch.int64).to(torch.int32).view(torch.float32)
    w.view(-1)[:special.numel()] = special
    return w


@pytest.mark.checks("f32_linear.bf16_split3_reference", "f32_linear.bf16_split3")
def test_bf16_split3_is_exact_and_rounds_to_nearest():
    """The three bf16 parts of an fp32 weight (the prefill router / head-weight GEMM's operand): their sum is the
    weight exactly, the first is torch's round-to-nearest-even bf16 cast, each next one the cast of what is left;
    the Triton kernel (interpreter here) equals the reference bit for bit."""
    w = _split_cases()
    ref = F32.bf16_split3_reference(w)
    assert ref.dtype == torch.bfloat16 and ref.shape == (3, 37, 1001)
    assert torch.equal(ref.double().sum(0), w.double())
    assert torch.equal(ref[0], w.to(torch.bfloat16))
    assert torch.equal(ref[1], (w - ref[0].float()).to(torch.bfloat16))
    # the parts shrink: |mid| <= half an ulp of hi, |lo| <= half an ulp of mid (2^-8 relative each)
    assert torch.all(ref[1].float().abs() <= ref[0].float().abs() * 2.0**-8)
    got = F32.bf16_split3(w, backend="triton")
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))  # bitwise: -0.0 and +0.0 told apart


@pytest.mark.checks("f32_linear.bf16_split3", "f32_linear.linear_f32_split")
@pytest.mark.parametrize("m,n,k", [(65, 33, 300), (130, 70, 1000), (200, 256, 129)])
def test_linear_f32_prefill_rows_split_gemm(m, n, k):
    """Prefill rows (m > 64, bf16 x): the split GEMM kernel. Rows with one nonzero power-of-two entry make every
    sum exact, so those rows must equal scale * v * w[:, j] bit for bit (a lost or doubled weight part, a wrong
    column or scale shows); random rows stay within the fp32 dot-product bound of the exact result."""
    g = torch.Generator().manual_seed(m + n + k)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    cols = torch.randint(0, k, (m // 2,), generator=g)
    vals = 2.0 ** torch.randint(-3, 4, (m // 2,), generator=g).float() * torch.where(torch.arange(m // 2) % 2 == 0,
                                                                                       1.0, -1.0)
    x[: m // 2] = 0
    x[torch.arange(m // 2), cols] = vals.to(torch.bfloat16)
    got = F32.linear_f32(x, w, 0.25, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.equal(got[: m // 2], w[:, cols].t() * vals[:, None] * 0.25)
    exact = (x.double() @ w.double().t()) * 0.25
    bound = k * 2.0**-24 * ((x.double().abs() @ w.double().abs().t()) * 0.25)
    assert torch.all((got.double() - exact).abs() <= bound)
    assert torch.equal(F32.linear_f32(x.view(1, m, k), w, 0.25, backend="triton"), got.view(1, m, n))
    # the benchmarked tiles and the grid order with the column tiles fastest: the same exact rows and bound
    for config in ((64, 32, 4, 3, True), (128, 128, 8, 3, True)):
        other = F32.linear_f32_split(x, w, 0.25, backend="triton", config=config)
        assert torch.equal(other[: m // 2], got[: m // 2]), config
        assert torch.all((other.double() - exact).abs() <= bound), config


def test_bf16_parts_needed_counts_the_last_nonzero_part():
    """1 for bf16 values widened to fp32 (the DeepSeek checkpoints' router and head weights), 2 when the values
    fit 16 significant bits, 3 for generic fp32; one entry is enough to need a part."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(33, 300, generator=g) * 0.02
    w16 = w.to(torch.bfloat16).float()
    assert F32.bf16_parts_needed(w16) == 1
    two = w16 + (w - w16).to(torch.bfloat16).float()                    # hi + mid: exactly two parts
    assert F32.bf16_parts_needed(two) == 2
    assert F32.bf16_parts_needed(w) == 3
    one_off = w16.clone()
    one_off[7, 123] = one_off[7, 123] * (1 + 2.0**-12)                  # one value needs a second part
    assert F32.bf16_parts_needed(one_off) == 2
    assert F32.bf16_parts_needed(torch.zeros(4, 8)) == 1
    assert F32.bf16_parts_needed(w16.to(torch.bfloat16)) == 3            # not fp32: never takes the split path


@pytest.mark.checks("f32_linear.bf16_split3", "f32_linear.linear_f32_split")
@pytest.mark.parametrize("m,n,k", [(65, 33, 300), (200, 256, 129)])
def test_split_gemm_with_fewer_parts_is_the_same_product(m, n, k):
    """A weight with one (two) nonzero bf16 parts: the split and the GEMM over only those give the 3-part
    result bit for bit (the left-out products are exact zeros), and rows with one power-of-two entry give
    scale * v * w[:, j] exactly; on a weight that needs more parts, fewer parts must give another result."""
    g = torch.Generator().manual_seed(m + k)
    w = torch.randn(n, k, generator=g) * 0.02
    w1 = w.to(torch.bfloat16).float()
    w2 = w1 + (w - w1).to(torch.bfloat16).float()
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    x[0] = 0
    x[0, k // 2] = -0.5
    for weight, parts in ((w1, 1), (w2, 2)):
        assert torch.equal(F32.bf16_split3(weight, backend="triton", parts=parts).view(torch.int16),
                           F32.bf16_split3(weight, backend="triton")[:parts].view(torch.int16))
        full = F32.linear_f32(x, weight, 0.25, backend="triton")
        got = F32.linear_f32(x, weight, 0.25, backend="triton", parts=parts)
        assert torch.equal(got, full), parts
        assert torch.equal(got[0], weight[:, k // 2] * -0.125), parts
    assert not torch.equal(F32.linear_f32(x, w, 0.25, backend="triton", parts=1),
                           F32.linear_f32(x, w, 0.25, backend="triton"))
    with pytest.raises(ValueError, match="parts must be 1, 2 or 3"):
        F32.bf16_split3(w, parts=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 7), (3, 4096), (2, 3, 1500)])
def test_to_f32_is_the_exact_cast(dtype, shape):
    """The vectorized cast that feeds the prefill fp32 projections: x.float() bit for bit, at sizes that end
    mid-block, across programs and for 3-D inputs; a non-contiguous input takes x.float()."""
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(*shape, generator=g) * 300).to(dtype)
    got = F32.to_f32(x)
    assert got.dtype == torch.float32 and got.shape == x.shape and torch.equal(got, x.float())
    xt = x.transpose(-1, -2)
    assert torch.equal(F32.to_f32(xt), xt.float())


@pytest.mark.parametrize("m,k", [(5, 256), (8, 384), (70, 1024)])
@pytest.mark.checks("norm_rope.rms_norm_triton", "reference.act_quant")
def test_cublas_operands_from_a_norms_fp8_copy(m, k):
    """The cuBLASLt path's activation operands (e4m3 [m_pad, K], outer-dim-major scales) built from the caller's
    act_quant copy (here the RMSNorm kernel's, on the interpreter) equal, bit for bit and pad rows included, the
    ones it quantizes itself from the M-padded input. (F.scaled_mm itself needs CUDA: tests/gpu.)"""
    from dsaserve import kernels as K

    g = torch.Generator().manual_seed(m + k)
    p = FL.prepare_fp8_weight(*_weight(40, k, g))
    x = _x(m, k, g).to(torch.bfloat16)
    w = (1 + 0.2 * torch.randn(k, generator=g)).to(torch.bfloat16)
    y, _, x_fp8 = K.rms_norm_quant(x, w, 1e-6, backend="triton")
    want_q, want_s = FL._cublas_operands(y, p)
    got_q, got_s = FL._cublas_operands(y, p, x_fp8)
    m_pad = -(-m // 4) * 4
    assert got_q.shape == want_q.shape == (m_pad, k)
    assert got_s.shape == want_s.shape == (m_pad, p.k_blocks) and got_s.stride() == want_s.stride() == (1, m_pad)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(got_s, want_s)
