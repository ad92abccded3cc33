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


def _bf16_ulp(v):
    return torch.exp2(torch.floor(torch.log2(v.float().abs().clamp_min(2.0**-126))) - 7)


@pytest.mark.parametrize("rows", [1, 37, 4096])
def test_rms_norm_quant_copy_is_act_quant(gen, rows):
    """The norm's fp8 copy (the decode GEMMs' input) == act_quant of the norm's own output, bit for bit."""
    K, R = _kernels()
    x = (torch.randn(rows, 7168, device="cuda", generator=gen) * 2).bfloat16()
    w = (1 + 0.3 * torch.randn(7168, device="cuda", generator=gen)).bfloat16()
    y, _, (q, s) = K.rms_norm_quant(x, w, 1e-6, x)
    rq, rs = R.act_quant(y, 128)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("interleaved", [True, False])
def test_indexer_key_and_query(gen, interleaved):
    """The fused key path (LayerNorm, RoPE, Hadamard, e4m3) and query path at the bench model's shapes: the key
    within the LayerNorm's rounding of the composition and bit-identical to hadamard_act_quant of its own bf16
    key; the query bit-identical to RoPE + hadamard_act_quant + the weight product."""
    K, R = _kernels()
    n = 300
    fused = (torch.randn(n, 2240, device="cuda", generator=gen) * 2).bfloat16()
    k = fused[:, 1536:1664]                                   # wk's block of the fused q_a | wk | kv_a output
    lw = (1 + 0.2 * torch.randn(128, device="cuda", generator=gen)).bfloat16()
    lb = (0.1 * torch.randn(128, device="cuda", generator=gen)).bfloat16()
    ang = torch.randn(n, 32, device="cuda", generator=gen) * 3
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    key, _ = K.indexer_key(k, lw, lb, 1e-6, cos, sin, interleaved, quantize=False)
    ref, _ = R.indexer_key(k, lw, lb, 1e-6, cos, sin, interleaved, quantize=False)
    diff = (key.float() - ref.float()).abs()
    assert (diff > 0).float().mean() < 0.02 and torch.all(diff <= 3 * _bf16_ulp(ref.float().abs().amax(1, keepdim=True)))
    q8, s8 = K.indexer_key(k, lw, lb, 1e-6, cos, sin, interleaved, quantize=True)
    hq, hs = R.act_quant(R.hadamard_rotate(key.float()), block=128)
    assert torch.equal(q8.view(torch.uint8), hq.view(torch.uint8)) and torch.equal(s8, hs[:, 0])
    qf = (torch.randn(n, 2 * 64 * 128, device="cuda", generator=gen) * 2).bfloat16()
    q = qf[:, 64 * 128:].view(n, 64, 128)                     # wq_b's block of the fused q_b | wq_b output
    w = torch.randn(n, 64, device="cuda", generator=gen)
    got_q, got_w = K.indexer_query(q, cos, sin, interleaved, w)
    want_q, want_w = R.indexer_query(q, cos, sin, interleaved, w)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(got_w, want_w)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("n", [4099, 1])
def test_indexer_query_gluon_equals_triton_bit_for_bit(gen, n, interleaved):
    """The Gluon query kernel (one row a thread) on the wq_b block of a fused projection output (token stride
    2 x 64 x 128), rows that do not fill a program, zero rows, both rope layouts: the e4m3 bytes and the weights
    times the scales equal the Triton kernel's and the reference's."""
    K, R = _kernels()
    from dsaserve.kernels.key_path_gluon import indexer_query_gluon_reason

    qf = (torch.randn(n, 2 * 64 * 128, device="cuda", generator=gen) * 2).bfloat16()
    q = qf[:, 64 * 128:].view(n, 64, 128)
    q[0, :3] = 0
    ang = torch.randn(n, 32, device="cuda", generator=gen) * 3
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    w = torch.randn(n, 64, device="cuda", generator=gen)
    assert indexer_query_gluon_reason(q, cos) is None
    got_q, got_w = K.indexer_query(q, cos, sin, interleaved, w, kernel="gluon")
    tri_q, tri_w = K.indexer_query(q, cos, sin, interleaved, w)
    want_q, want_w = R.indexer_query(q, cos, sin, interleaved, w)
    # bit for bit, except the sign of the zeros of all-zero rows, which differed from the Triton kernel's on H200
    # (2026-12-05) however the rope's subtraction was written: equal as values, equal bytes wherever not zero
    nonzero = got_q.float() != 0
    for other_q, other_w in ((tri_q, tri_w), (want_q, want_w)):
        assert torch.equal(got_q.float(), other_q.float()) and torch.equal(got_w, other_w)
        assert torch.equal(got_q.view(torch.uint8)[nonzero], other_q.view(torch.uint8)[nonzero])


def test_mla_latent_silu_mul_and_cache_rows(gen):
    K, R = _kernels()
    n = 300
    kv = (torch.randn(n, 2240, device="cuda", generator=gen) * 2).bfloat16()[:, 1664:]   # kv_a's 576 columns
    w = (1 + 0.2 * torch.randn(512, device="cuda", generator=gen)).bfloat16()
    ang = torch.randn(n, 32, device="cuda", generator=gen) * 3
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    lat = K.mla_latent(kv, w, 1e-6, cos, sin)
    assert torch.equal(lat[:, :512], K.rms_norm(kv[:, :512], w, 1e-6)[0])
    assert torch.equal(lat[:, 512:], R.rope(kv[:, 512:], cos, sin, True))
    gu = (torch.randn(n, 4096, device="cuda", generator=gen) * 3).bfloat16()
    y, (q, s) = K.silu_mul(gu, quant=True)
    ref = R.silu_mul(gu)
    diff = (y.float() - ref.float()).abs()
    assert torch.all(diff <= _bf16_ulp(torch.maximum(y.float().abs(), ref.float().abs()))) and (diff > 0).float().mean() < 0.02
    rq, rs = R.act_quant(y, 128)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    cache = torch.zeros(1000, 576, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(1000, device="cuda", generator=gen)[:n]
    slots[::7] = -1
    K.write_cache_rows(slots, [(cache, lat)])
    keep = slots >= 0
    assert torch.equal(cache[slots[keep]], lat[keep]) and int((cache.abs().sum(1) > 0).sum()) == int(keep.sum())
