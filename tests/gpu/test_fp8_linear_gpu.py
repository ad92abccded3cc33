"""The fp8 block GEMM at decode sizes on the GPU: every tile / split / quantization path the layers take,
against the reference contract, and the split-K paths against each other bit for bit (eager and replayed in a
CUDA graph, repeatedly: the in-kernel reduction's arrival counters must be back at zero after every launch)."""

import dataclasses

import pytest
import torch


def _fl():
    from dsaserve.kernels import fp8_linear as FL  # imported in the test: see test_kernels_gpu._kernels

    return FL


def _case(m, n, k, gen):
    FL = _fl()
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.05
    p = FL.prepare_fp8_weight(*FL.quantize_weight_fp8(w))
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    return p, x


# (M, N, K): the bench model's decode shapes (fused qkv_a, o_proj), ragged N / K, a K below one block
SHAPES = [(1, 2240, 7168), (1, 7168, 16384), (5, 576, 7168), (32, 4096, 7168), (3, 200, 1000), (1, 64, 96)]
CONFIGS = [dict(bm=16, bn=64, num_warps=4, num_stages=4), dict(bm=16, bn=32, num_warps=4, num_stages=4),
           dict(bm=64, bn=64, num_warps=4, num_stages=4)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=["bm16bn64", "bm16bn32", "bm64bn64"])
def test_decode_gemm_paths(gen, m, n, k, cfg):
    FL = _fl()
    p, x = _case(m, n, k, gen)
    ref = FL.fp8_linear_reference(x, *p.unpadded(), torch.float32)
    xq, xs = FL.act_quant(x, FL.BLOCK)
    c = FL.Fp8GemmConfig(**cfg)
    two = dataclasses.replace(c, reduce_in_kernel=False)
    base = FL.fp8_gemm_triton(xq, xs, p, torch.float32, two)
    # the reference's fp8 products summed in another order: in fp32 by the 16-row tiles (mma.sync on f16
    # operands); with Hopper's reduced-precision fp8 accumulator inside each 128-wide K block by the 64-row
    # (wgmma) tiles
    err = float((base - ref).norm() / ref.norm())
    assert err < (1e-5 if c.bm <= 16 else 5e-4), f"rel err {err:.2e}"
    one = FL.fp8_gemm_triton(xq, xs, p, torch.float32, c)
    assert torch.equal(one, base), f"max diff {(one - base).abs().max().item():.3g}"  # in-kernel reduction
    if c.bm <= 16:  # the in-GEMM quantization (QUANT_A), enabled or not by default
        assert torch.equal(FL.fp8_gemm_triton(x, None, p, torch.float32, c), base)  # in-GEMM act_quant
    bf = FL.fp8_gemm_triton(xq, xs, p, torch.bfloat16, c)
    assert torch.equal(bf, base.to(torch.bfloat16))   # the bf16 store rounds the same fp32 sum
    for _ in range(3):                                # counters reset: repeated launches agree
        assert torch.equal(FL.fp8_gemm_triton(xq, xs, p, torch.float32, c), base)


def test_decode_gemm_in_cuda_graph(gen):
    FL = _fl()
    p, x = _case(1, 7168, 16384, gen)
    xq, xs = FL.act_quant(x, FL.BLOCK)
    cfg = FL.default_gemm_config(1)
    want = FL.fp8_gemm_triton(xq, xs, p, torch.bfloat16, cfg)  # eager first: makes the counter buffer
    assert FL.choose_split_k(1, 7168, 16384, cfg, torch.cuda.get_device_properties(0).multi_processor_count) > 1
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [FL.fp8_gemm_triton(xq, xs, p, torch.bfloat16, cfg) for _ in range(4)]
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, want) for o in outs)


@pytest.mark.parametrize("m,n", [(1, 64), (1, 32), (32, 64)])
def test_linear_f32_decode_rows(gen, m, n):
    """The router / indexer-weights projection at decode rows: within fp32 reordering of torch's, eager and in a
    CUDA graph (split K reduced in the kernel: counters back at zero between replays)."""
    from dsaserve.kernels import f32_linear as F32  # imported in the test: see test_kernels_gpu._kernels

    x = torch.randn(m, 7168, device="cuda", generator=gen).to(torch.bfloat16)
    w = torch.randn(n, 7168, device="cuda", generator=gen) * 0.02
    want = (x.float() @ w.t()) * 0.0625
    got = F32.linear_f32(x, w, 0.0625)
    bound = 7168 * 2.0**-24 * ((x.float().abs() @ w.abs().t()) * 0.0625)
    assert torch.all((got - want).abs() <= bound)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [F32.linear_f32(x, w, 0.0625) for _ in range(3)]
    for _ in range(2):
        g.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, got) for o in outs)


@pytest.mark.parametrize("m,n", [(3000, 64), (4099, 256), (65, 32)])
def test_linear_f32_prefill_rows_are_fp32_accurate(gen, m, n):
    """Prefill rows: the weight's exact bf16 split and the Triton split GEMM (fp32 sums a 64-column step). Rows with
    one power-of-two entry are exact sums, so they equal scale * v * w[:, j] bit for bit; random rows are within 2x
    cuBLAS fp32's error against the exact (fp64) result. (One bf16 GEMM over all of K with fp32 output made
    7-16x cuBLAS's error here on 2026-12-03: the tensor core's accumulation is not round-to-nearest.)"""
    from dsaserve.kernels import f32_linear as F32

    x = torch.randn(m, 7168, device="cuda", generator=gen).to(torch.bfloat16)
    w = torch.randn(n, 7168, device="cuda", generator=gen) * 0.02
    half = m // 2
    cols = torch.randint(0, 7168, (half,), device="cuda", generator=gen)
    vals = 2.0 ** torch.randint(-3, 4, (half,), device="cuda", generator=gen).float()
    x[:half] = 0
    x[torch.arange(half, device="cuda"), cols] = vals.to(torch.bfloat16)
    got = F32.linear_f32(x, w, 0.5)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.equal(got[:half], w[:, cols].t() * vals[:, None] * 0.5)
    exact = (x[half:].double() @ w.double().t()) * 0.5
    cublas = torch.nn.functional.linear(x[half:].float(), w) * 0.5
    err, ref_err = (got[half:].double() - exact).abs().max(), (cublas.double() - exact).abs().max()
    assert err <= 2 * ref_err, f"{err:.3e} vs cuBLAS fp32 {ref_err:.3e}"
    parts = F32.bf16_split3(w)
    assert torch.equal(parts.view(torch.int16), F32.bf16_split3_reference(w).view(torch.int16))
    assert torch.equal(F32.to_f32(x), x.float())
    assert torch.equal(F32.linear_f32(x.view(1, m, 7168), w, 0.5), got.view(1, m, n))  # leading dims kept


@pytest.mark.parametrize("m,n", [(16384, 256), (4099, 64), (65, 32)])
def test_linear_f32_prefill_fewer_parts_same_bits(gen, m, n):
    """A weight stored as bf16 (DeepSeek's router and head weights): the split GEMM over its one nonzero part equals
    the three-part GEMM bit for bit at the engine's shapes (a folded accumulator would not), two parts likewise for
    a weight of 16 significant bits; on a generic fp32 weight one part would differ."""
    from dsaserve.kernels import f32_linear as F32  # imported in the test: see test_kernels_gpu._kernels

    x = torch.randn(m, 7168, device="cuda", generator=gen).to(torch.bfloat16)
    w = torch.randn(n, 7168, device="cuda", generator=gen) * 0.02
    w1 = w.bfloat16().float()
    w2 = w1 + (w - w1).bfloat16().float()
    assert (F32.bf16_parts_needed(w1), F32.bf16_parts_needed(w2), F32.bf16_parts_needed(w)) == (1, 2, 3)
    for weight, parts in ((w1, 1), (w2, 2)):
        assert torch.equal(F32.linear_f32(x, weight, 0.5, parts=parts), F32.linear_f32(x, weight, 0.5)), parts
    assert not torch.equal(F32.linear_f32(x, w, 0.5, parts=1), F32.linear_f32(x, w, 0.5))


@pytest.mark.parametrize("m", [4096, 4099])
def test_prefill_gemm_takes_the_norms_fp8_copy(gen, m):
    """cuBLASLt at prefill sizes (x_proj's shape: 7168 -> 2240) on the RMSNorm kernel's fp8 copy of its output
    (what MoE layers' post-attention norm hands the shared expert) == quantizing the output itself, bit for bit;
    m = 4099 pads 1 row for cuBLASLt."""
    from dsaserve import kernels as K

    FL = _fl()
    p, x = _case(m, 2240, 7168, gen)
    w = (1 + 0.3 * torch.randn(7168, device="cuda", generator=gen)).bfloat16()
    y, _, x_fp8 = K.rms_norm_quant(x, w, 1e-6)
    assert x_fp8 is not None
    want = FL.fp8_linear_prepared(y, p, torch.bfloat16, backend="cublas")
    assert torch.equal(FL.fp8_linear_prepared(y, p, torch.bfloat16, backend="cublas", x_fp8=x_fp8), want)
    assert torch.equal(FL.fp8_linear_prepared(y, p, torch.bfloat16, x_fp8=x_fp8), want)   # auto: cuBLASLt here
