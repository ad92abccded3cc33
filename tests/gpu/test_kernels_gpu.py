"""Every Triton kernel against its PyTorch reference on the GPU, at realistic shapes (see conftest.py).

Tolerances are the device's, not the interpreter's: act_quant is bit-exact; the fp8 logits differ from the
fp32 reference by the fp8 MMA's accumulation (~1e-4 relative measured on H100/H200); sparse MLA computes
in bf16 MMAs with fp32 softmax (~2e-3 relative for bf16 outputs).
"""

import pytest
import torch


def _kernels():
    """dsaserve.kernels, imported inside the tests: importing it at collection imports triton, and in a
    whole-suite CPU run that happens before tests/kernels (collected later) switches Triton to its interpreter,
    which must be set before triton is first imported."""
    from dsaserve import kernels

    return kernels, kernels.reference

LOGITS_REL = 5e-4  # fp8 MMA accumulation vs the exact fp32 sum
MLA_REL = 5e-3  # bf16 output, bf16 P
MLA_LSE = 1e-4


def _logits_inputs(s, skv, h, d, gen, causal=False):
    q = torch.randn(s, h, d, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    k = torch.randn(skv, d, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    ksc = torch.rand(skv, device="cuda", generator=gen) * 0.02 + 0.01
    w = torch.randn(s, h, device="cuda", generator=gen) * 0.1
    if causal:
        ks = torch.zeros(s, dtype=torch.int32, device="cuda")
        ke = torch.arange(skv - s, skv, device="cuda", dtype=torch.int32) + 1
    else:
        ks = torch.randint(0, skv, (s,), device="cuda", generator=gen, dtype=torch.int32)
        ke = torch.randint(0, skv + 1, (s,), device="cuda", generator=gen, dtype=torch.int32)
        ks[0], ke[0] = 0, skv
        ks[1], ke[1] = 7, 7  # empty
        ks[2], ke[2] = 50, 60  # shorter than most k
    return q, k, ksc, w, ks, ke


def _assert_logits_close(out, ref):
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), inf) and torch.all(out[inf] < 0) and not torch.isnan(out).any()
    d = (out[~inf].double() - ref[~inf].double()).norm() / ref[~inf].double().norm()
    assert d < LOGITS_REL, f"rel err {d:.2e}"


@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant_bitwise(gen, ue8m0):
    K, R = _kernels()
    x = torch.randn(4096, 7168, device="cuda", generator=gen) * torch.rand(4096, 1, device="cuda", generator=gen) * 10
    x[0] = 0
    y, s = K.act_quant(x, ue8m0=ue8m0)
    ry, rs = R.act_quant(x, ue8m0=ue8m0)
    assert torch.equal(s, rs) and torch.equal(y.view(torch.uint8), ry.view(torch.uint8))
    yb, sb = K.act_quant(x.bfloat16(), block=64, ue8m0=ue8m0)
    ryb, rsb = R.act_quant(x.bfloat16(), block=64, ue8m0=ue8m0)
    assert torch.equal(sb, rsb) and torch.equal(yb.view(torch.uint8), ryb.view(torch.uint8))


@pytest.mark.parametrize("s,skv,h,causal,tiles", [
    (1024, 8192, 64, True, None), (777, 5000, 64, False, None), (1024, 8192, 32, True, None),
    (500, 3000, 32, False, (4, 64, 4, 3, 2)), (300, 2000, 64, True, (4, 128, 8, 3, 1)),
])
def test_mqa_logits(gen, s, skv, h, causal, tiles):
    K, R = _kernels()
    from dsaserve.kernels.indexer_logits import LogitsConfig

    cfg = LogitsConfig(*tiles) if tiles else None
    ins = _logits_inputs(s, skv, h, 128, gen, causal)
    _assert_logits_close(K.mqa_logits(*ins, config=cfg), R.mqa_logits(*ins))
    _assert_logits_close(K.mqa_logits(*ins, config=cfg, num_sms=13), R.mqa_logits(*ins))  # fewer SMs


def test_paged_mqa_logits(gen):
    K, R = _kernels()
    b, h, d, maxp = 48, 64, 128, 64
    q = torch.randn(b, h, d, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    kc = torch.randn(b * maxp + 5, 64, d, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    ksc = torch.rand(b * maxp + 5, 64, device="cuda", generator=gen) + 0.5
    w = torch.randn(b, h, device="cuda", generator=gen)
    lens = torch.randint(0, maxp * 64 + 1, (b,), device="cuda", generator=gen, dtype=torch.int32)
    lens[0], lens[1] = 0, maxp * 64
    bt = torch.randperm(b * maxp + 5, device="cuda", generator=gen)[: b * maxp].view(b, maxp).int()
    _assert_logits_close(K.paged_mqa_logits(q, kc, ksc, w, lens, bt), R.paged_mqa_logits(q, kc, ksc, w, lens, bt))


def _value_multisets_equal(a, b, logits):
    """Same -1 count and the same multiset of selected logit values per row (ties may pick other columns)."""
    for i in range(a.shape[0]):
        x, y = a[i][a[i] >= 0].long(), b[i][b[i] >= 0].long()
        assert x.numel() == y.numel(), f"row {i}: {x.numel()} vs {y.numel()} picks"
        assert x.unique().numel() == x.numel(), f"row {i}: a column picked twice"
        assert torch.equal(torch.sort(logits[i, x]).values, torch.sort(logits[i, y]).values), f"row {i}"


@pytest.mark.parametrize("impl", ["radix", "torch"])
def test_topk_indices(gen, impl):
    K, R = _kernels()
    from dsaserve.kernels.topk import topk_indices_radix, topk_indices_torch

    s, n, k = 512, 20000, 2048
    logits = torch.randn(s, n, device="cuda", generator=gen)
    logits[3, 100:3000] = 0.5  # a long run of ties
    ks = torch.randint(0, n, (s,), device="cuda", generator=gen, dtype=torch.int32)
    ke = (ks + torch.randint(-50, 6000, (s,), device="cuda", generator=gen, dtype=torch.int32)).clamp(0, n)
    ks[3], ke[3] = 0, n
    fn = topk_indices_radix if impl == "radix" else topk_indices_torch
    got = fn(logits, ks, ke, k)
    want = R.topk_indices(logits, ks, ke, k)
    masked = torch.where((torch.arange(n, device="cuda")[None] >= ks[:, None])
                         & (torch.arange(n, device="cuda")[None] < ke[:, None]), logits, float("-inf"))
    _value_multisets_equal(got, want, masked)


@pytest.mark.parametrize("s,skv,h,k,causal,tiles", [
    (1024, 16384, 64, 2048, True, None),  # every row has more than k keys, lists are cut several times
    (700, 6000, 64, 2048, False, None),  # ragged: empty rows, rows shorter than k
    (512, 9000, 32, 2048, True, None),  # GLM-5's 32 indexer heads (BQ = 8)
    (300, 4000, 64, 512, False, (4, 64, 4, 3, 2, 32)),
    (256, 65536, 64, 2048, True, (4, 64, 4, 3, 2, 16, 2, 4)),  # a short chunk at 64K: 4 key splits + merge
    (100, 20000, 64, 2048, False, (4, 64, 4, 3, 2, 16, 2, 8)),  # ragged, 8 splits (some empty)
    # the list cut (the cases above use radix16, the default): the old bisection (the ablation path, also
    # with splits + merge), radix16 at capacity 4 (C = 16384, chunks of 2048), k = 512 (C = 4096, chunks of
    # 512 after cut_chunk's C / 15 floor), slack 0 (every intermediate cut searched down to K)
    (1024, 16384, 64, 2048, True, (4, 64, 4, 3, 2, 16, 2, None, "bisect")),
    (256, 65536, 64, 2048, True, (4, 64, 4, 3, 2, 16, 2, 4, "bisect")),
    (1024, 16384, 64, 2048, True, (4, 64, 4, 3, 2, 16, 4)),
    (700, 6000, 64, 512, False, (4, 64, 4, 3, 2, 16, 2, None, "radix16", 256)),
    (512, 9000, 32, 2048, True, (8, 64, 4, 3, 2, 16, 2, None, "radix16", 1024, 0)),
])
def test_fused_topk_exact_on_kernel_logits(gen, s, skv, h, k, causal, tiles):
    """The fused kernel selects exactly what the tie rule selects on the logits kernel's own (bit-identical,
    same tiles) logits: the set, the -1 padding and the offsets."""
    K, R = _kernels()
    from dsaserve.kernels.indexer_logits import LogitsConfig, default_config
    from dsaserve.kernels.indexer_topk import TopkConfig

    cfg = TopkConfig(*tiles) if tiles else None
    ins = _logits_inputs(s, skv, h, 128, gen, causal)
    off = torch.arange(s, device="cuda", dtype=torch.int32) * 3
    got = K.mqa_topk_indices(*ins, k=k, offset=off, config=cfg)
    lcfg = LogitsConfig(cfg.bq, cfg.bk, cfg.num_warps) if cfg else default_config(h)
    logits = K.mqa_logits(*ins, config=lcfg)
    cols = torch.arange(skv, device="cuda")
    valid = (cols[None, :] >= ins[4][:, None]) & (cols[None, :] < ins[5][:, None])
    want = R.select_topk_ordered(logits, valid, k)
    want = torch.where(want >= 0, want + off[:, None], -1).to(torch.int32)
    assert torch.equal(torch.sort(got, 1).values, torch.sort(want, 1).values)


def test_fused_topk_vs_reference_path(gen):
    """Against the all-PyTorch reference (fp32 logits): the same sets except where two logits lie within the
    fp8 MMA's rounding of the k-th value."""
    K, R = _kernels()
    s, skv, k = 256, 12000, 2048
    ins = _logits_inputs(s, skv, 64, 128, gen, True)
    got = K.mqa_topk_indices(*ins, k=k)
    want = R.mqa_topk_indices(*ins, k=k)
    ref_logits = R.mqa_logits(*ins)
    for i in range(s):
        a, b = set(got[i].tolist()), set(want[i].tolist())
        if a == b:
            continue
        kth = ref_logits[i, [j for j in b if j >= 0]].min()
        for j in a ^ b:  # only near-ties at the boundary may differ
            assert abs(float(ref_logits[i, j] - kth)) <= 1e-3 * float(ref_logits[i].abs().max()), f"row {i} col {j}"


@pytest.mark.parametrize("h", [128, 64])
@pytest.mark.parametrize("tiles", [None, (64, 32, 8, 3), (128, 32, 8, 3, False, 2)], ids=["default", "bk32", "v_split"])
def test_sparse_mla_prefill(gen, h, tiles):
    K, R = _kernels()
    from dsaserve.kernels.sparse_attention import SparseMLAConfig

    cfg = SparseMLAConfig(*tiles) if tiles else None
    t, dv, dr, slots, topk = 192, 512, 64, 16384, 2048
    q = torch.randn(t, h, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    kv = torch.randn(slots, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    idx = torch.randint(-1, slots, (t, topk), device="cuda", generator=gen, dtype=torch.int32)
    idx[0] = -1  # no valid key
    idx[1, 1:] = -1  # exactly one
    idx[1, 0] = 3
    idx[2, 1000:] = -1  # -1 padding from the middle
    idx[3, ::2] = -1  # interleaved
    scale = (dv + dr) ** -0.5
    out, lse = K.sparse_mla(q, kv, idx, scale, d_v=dv, config=cfg)
    rout, rlse = R.sparse_mla(q.float(), kv.float(), idx, scale, d_v=dv, chunk=8)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
    assert (out.double() - rout.double()).norm() / rout.double().norm() < MLA_REL
    assert torch.all(out[0] == 0) and torch.isneginf(lse[0]).all()
    assert torch.equal(out[1], kv[3, :dv].expand(h, dv))
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin] - rlse[fin]).abs().max() < MLA_LSE


@pytest.mark.parametrize("splits", [1, 4])
def test_sparse_mla_decode(gen, splits):
    K, R = _kernels()
    t, h, dv, dr, slots, topk = 6, 128, 512, 64, 30000, 2048
    q = torch.randn(t, h, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    kv = torch.randn(slots, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    idx = torch.randint(0, slots, (t, topk), device="cuda", generator=gen, dtype=torch.int32)
    idx[1, 300:] = -1
    out, lse = K.sparse_mla(q, kv, idx, 0.04, d_v=dv, num_splits=splits)
    rout, rlse = R.sparse_mla(q.float(), kv.float(), idx, 0.04, d_v=dv, chunk=2)
    assert (out.double() - rout.double()).norm() / rout.double().norm() < MLA_REL
    assert (lse - rlse).abs().max() < MLA_LSE


@pytest.mark.parametrize("t", [1, 7, 32])
def test_sparse_mla_decode_auto_splits(gen, t):
    """The decode step's shape (128 heads, 576/512, top-k 2048 over a 64K-slot pool) with the default
    num_splits (auto: 32 / 8 / 2 splits at t = 1 / 7 / 32 on 132 SMs), vs the fp32 reference and vs the
    unsplit kernel. Ragged rows: 300 valid keys then -1 (most splits empty), none, one, every other."""
    K, R = _kernels()
    from dsaserve.kernels._common import device_sm_count
    from dsaserve.kernels.sparse_attention import default_config, pick_num_splits

    h, dv, dr, slots, topk = 128, 512, 64, 65536, 2048
    q = torch.randn(t, h, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    kv = torch.randn(slots, dv + dr, device="cuda", generator=gen, dtype=torch.bfloat16)
    idx = torch.randint(0, slots, (t, topk), device="cuda", generator=gen, dtype=torch.int32)
    if t > 4:
        idx[1, 300:] = -1
        idx[2] = -1
        idx[3, 1:] = -1
        idx[3, 0] = 3
        idx[4, ::2] = -1
    cfg = default_config(h, dv, q.dtype)
    assert pick_num_splits(t, -(-h // cfg.bh), topk, cfg.bk, device_sm_count(q.device)) > 1  # the split path
    scale = 192**-0.5
    out, lse = K.sparse_mla(q, kv, idx, scale, d_v=dv)
    rout, rlse = R.sparse_mla(q.float(), kv.float(), idx, scale, d_v=dv, chunk=2)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out.double() - rout.double()).norm() / rout.double().norm() < MLA_REL
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin] - rlse[fin]).abs().max() < MLA_LSE
    if t > 4:
        assert torch.all(out[2] == 0) and torch.isneginf(lse[2]).all()  # as the unsplit kernel
        assert torch.equal(out[3], kv[3, :dv].expand(h, dv))
    one, one_lse = K.sparse_mla(q, kv, idx, scale, d_v=dv, num_splits=1)
    assert (out.double() - one.double()).norm() / one.double().norm() < MLA_REL
    assert torch.equal(torch.isfinite(one_lse), fin) and (lse[fin] - one_lse[fin]).abs().max() < MLA_LSE
