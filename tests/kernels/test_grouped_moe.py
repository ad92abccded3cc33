"""Grouped MoE: the device path (Triton under the CPU interpreter, F.grouped_mm's CPU loop) against the
per-expert reference, expert-parallel subsets (uneven, empty experts, a token's experts all on one rank),
the routing plan's invariants, the reference against a per-token formula, and the no-host-sync check."""

import pytest
import torch
import torch.nn.functional as F

from dsaserve.kernels.block_fp8 import dequantize_block_fp8
from dsaserve.kernels import KernelInputError
from dsaserve.kernels import fp8_linear as FL
from dsaserve.kernels import grouped_moe as GM

from ._util import triton  # noqa: F401  (skips without triton)
from .sync_check import host_sync_calls

# tiny dims: bf16 weights need rows of 16 bytes (F.grouped_mm); fp8 pads I to 128 and allows any H
BF16_DIMS = (32, 16)  # hidden, inter
FP8_DIMS = (64, 40)


def _full_weights(n_experts, hidden, inter, gen):
    wgu = torch.randn(n_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    wd = torch.randn(n_experts, hidden, inter, generator=gen) * inter**-0.5
    return wgu, wd


def _experts(kind, wgu, wd, ids, n_experts):
    ids = list(ids)
    if kind in ("fp32", "bf16"):
        dt = torch.float32 if kind == "fp32" else torch.bfloat16
        return GM.prepare_local_experts(wgu[ids].to(dt), wd[ids].to(dt), ids, n_experts)
    inter = wd.shape[2]
    g, sg = FL.quantize_weight_fp8(wgu[ids, :inter])
    u, su = FL.quantize_weight_fp8(wgu[ids, inter:])
    d, sd = FL.quantize_weight_fp8(wd[ids])
    return GM.prepare_local_experts_fp8(g, sg, u, su, d, sd, ids, n_experts)


def _routing(t, k, n_experts, gen, pool=None):
    """Distinct experts per token (from ``pool`` if given), random positive weights."""
    pool = torch.arange(n_experts) if pool is None else torch.tensor(pool)
    ids = pool[torch.rand(t, len(pool), generator=gen).topk(k, dim=1).indices]
    return ids, torch.rand(t, k, generator=gen) + 0.1


def _case(kind, n_experts, t, k, seed, pool=None, dims=None):
    g = torch.Generator().manual_seed(seed)
    hidden, inter = dims or (FP8_DIMS if kind == "fp8" else BF16_DIMS)
    wgu, wd = _full_weights(n_experts, hidden, inter, g)
    x = torch.randn(t, hidden, generator=g) * 2
    ids, w = _routing(t, k, n_experts, g, pool)
    xdt = torch.float32 if kind == "fp32" else torch.bfloat16
    return x.to(xdt), ids, w, wgu, wd


def _assert_matches(got, ref, kind):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if kind == "bf16":  # same bf16 GEMMs, same fp32 combine: identical
        assert torch.equal(got, ref)
    elif kind == "fp32":
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        # fp8: the fp32 sums of gate/up run in another order, so an intermediate value near an e4m3
        # rounding boundary may land on the neighbouring value (one e4m3 ulp = 1/8 of it) in a few places
        d = (got.float() - ref.float()).abs()
        assert (d.norm() / ref.float().norm()).item() < 2e-3
        assert (d > 0.02 * ref.float().abs().max()).float().mean() < 0.01


def _assert_triton_float_matches(got, ref):
    """The Triton path for float weights against the reference: the same rounding points (h and the SiLU
    product in x's dtype, y in x's dtype, fp32 combine), the fp32 sums in another order. fp32: 1e-5. bf16: an
    fp32 sum that lands across a bf16 rounding boundary may move h by one ulp (1/256 of it) and from there
    the output by about one ulp, so almost every element is identical and none differs by more than 2 ulps
    of the largest; a skipped or extra rounding step changes a large share of elements, wrong math all."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = ref.float().abs().max().item()
    if got.dtype == torch.float32:
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * scale)
        return
    d = (got.float() - ref.float()).abs()
    assert (d > 0).float().mean().item() <= 0.01, f"{(d > 0).float().mean().item():.3f} of elements differ"
    assert d.max().item() <= 2**-7 * scale


LAYOUTS = {  # name -> list of (rank experts) covering all experts
    "all": lambda e: [list(range(e))],
    "3ranks": lambda e: [GM.expert_range(e, r, 3) for r in range(3)],
    "strided": lambda e: [list(range(r, e, 2)) for r in range(2)],
}


@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("n_experts,t,k", [(8, 13, 2), (12, 9, 3), (32, 12, 4), (256, 4, 8)])
def test_device_path_matches_reference(kind, n_experts, t, k):
    layout = "3ranks" if n_experts in (8, 256) else ("strided" if n_experts == 12 else "all")
    x, ids, w, wgu, wd = _case(kind, n_experts, t, k, seed=n_experts * 7 + t)
    full = GM.grouped_moe_reference(x, ids, w, _experts(kind, wgu, wd, range(n_experts), n_experts))
    total = torch.zeros(x.shape, dtype=torch.float32)
    for local in LAYOUTS[layout](n_experts):
        ex = _experts(kind, wgu, wd, local, n_experts)
        ref = GM.grouped_moe(x, ids, w, ex, backend="reference")
        if kind == "bf16":  # the Triton path (the default at these T) and F.grouped_mm
            _assert_triton_float_matches(GM.grouped_moe(x, ids, w, ex, backend="grouped"), ref)
        # fp32: F.grouped_mm only (the Triton path's fp32 math: test_float_triton_path_matches_reference)
        cfg = GM.GROUPED_MM if kind != "fp8" else None
        _assert_matches(GM.grouped_moe(x, ids, w, ex, backend="grouped", config=cfg), ref, kind)
        total += ref.float()
    # the ranks' shares add up to the single-rank result (rounded once per rank)
    tol = 1e-5 if kind == "fp32" else 2**-7
    assert torch.allclose(total, full.float(), rtol=tol, atol=tol * full.float().abs().max().item())


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_experts_without_tokens_and_a_token_on_one_rank(kind):
    n_experts = 8
    # every token picks from experts {0, 1, 2, 5}: experts 3, 4, 6, 7 receive nothing
    x, ids, w, wgu, wd = _case(kind, n_experts, 10, 3, seed=11, pool=[0, 1, 2, 5])
    ids[0] = torch.tensor([4, 2, 3])  # token 0: all its experts on rank 1 of the 3-rank split
    shares = []
    for local in LAYOUTS["3ranks"](n_experts):  # [0, 1], [2, 3, 4], [5, 6, 7]: 6 and 7 get no token
        ex = _experts(kind, wgu, wd, local, n_experts)
        got = GM.grouped_moe(x, ids, w, ex, backend="grouped")
        ref = GM.grouped_moe(x, ids, w, ex, backend="reference")
        _assert_matches(got, ref, kind) if kind == "fp8" else _assert_triton_float_matches(got, ref)
        shares.append(got.float())
    assert torch.all(shares[0][0] == 0) and torch.all(shares[2][0] == 0)
    full = GM.grouped_moe(x, ids, w, _experts(kind, wgu, wd, range(n_experts), n_experts), backend="grouped")
    assert torch.equal(shares[1][0], full[0].float())  # the whole token computed on one rank
    # a rank whose experts get no token at all
    ex = _experts(kind, wgu, wd, [6, 7], n_experts)
    assert torch.all(GM.grouped_moe(x, ids, w, ex, backend="grouped") == 0)
    # no local expert at all, and no token
    ex_none = _experts(kind, wgu, wd, [], n_experts) if kind == "bf16" else None
    if ex_none is not None:
        assert torch.all(GM.grouped_moe(x, ids, w, ex_none, backend="grouped") == 0)
    ex = _experts(kind, wgu, wd, range(n_experts), n_experts)
    assert GM.grouped_moe(x[:0], ids[:0], w[:0], ex, backend="grouped").shape == (0, x.shape[1])


def test_pre_quantized_input_equals_quantizing_inside():
    """grouped_moe_quantized(act_quant(x)) == grouped_moe(x) for fp8 experts: bit for bit on the device path
    (the same kernels) and in the reference (act_quant is per token, so quantizing all rows first and
    picking an expert's rows equals quantizing that expert's rows)."""
    from dsaserve.kernels import act_quant

    x, ids, w, wgu, wd = _case("fp8", 12, 9, 3, seed=21)
    for local in ([0, 1, 2, 3], list(range(12))):
        ex = _experts("fp8", wgu, wd, local, 12)
        xq, xs = act_quant(x, 128)
        for backend in ("reference", "grouped"):
            want = GM.grouped_moe(x, ids, w, ex, backend=backend)
            got = GM.grouped_moe_quantized(xq, xs, ids, w, ex, x.dtype, backend=backend)
            assert torch.equal(got, want), backend
    with pytest.raises(KernelInputError, match="fp8 weights"):
        GM.grouped_moe_quantized(xq, xs, ids, w, _experts("bf16", wgu, wd, range(12), 12), x.dtype)
    with pytest.raises(KernelInputError, match="xs must be float32"):
        GM.grouped_moe_quantized(xq, xs[:, :0], ids, w, ex, x.dtype)


@pytest.mark.parametrize("kind,config", [("fp8", None), ("bf16", None), ("bf16", GM.GROUPED_MM), ("fp32", None)])
def test_add_fused_into_the_combine_equals_adding_after(kind, config):
    """``add=``: the combine kernel's result + add rounds like ``routed + add`` in x's dtype (the routed sum
    rounded first, then the sum), so the engine's shared-expert output can be added there bit for bit. A
    combine that ignored add, skipped the first rounding or added twice differs."""
    x, ids, w, wgu, wd = _case(kind, 12, 9, 3, seed=31)
    g = torch.Generator().manual_seed(32)
    for local in ([0, 1, 2, 3], list(range(12)), []):
        if not local and kind == "fp8":
            continue  # fp8 experts need at least one local expert to build
        ex = _experts(kind, wgu, wd, local, 12)
        add = (torch.randn(x.shape, generator=g) * 3).to(x.dtype)
        for backend in ("reference", "grouped"):
            routed = GM.grouped_moe(x, ids, w, ex, backend=backend, config=config)
            got = GM.grouped_moe(x, ids, w, ex, backend=backend, config=config, add=add)
            assert torch.equal(got, routed + add), (backend, local)
    if kind == "fp8":
        from dsaserve.kernels import act_quant

        xq, xs = act_quant(x, 128)
        add = torch.randn(x.shape, generator=g).to(x.dtype)
        for backend in ("reference", "grouped"):
            want = GM.grouped_moe_quantized(xq, xs, ids, w, ex, x.dtype, backend=backend) + add
            assert torch.equal(GM.grouped_moe_quantized(xq, xs, ids, w, ex, x.dtype, backend=backend, add=add), want)
        with pytest.raises(KernelInputError, match="add must be"):
            GM.grouped_moe_quantized(xq, xs, ids, w, ex, x.dtype, add=add[:, :-1])
    with pytest.raises(KernelInputError, match="add must be"):
        GM.grouped_moe(x, ids, w, ex, add=add.float() if kind != "fp32" else add.double())


def test_decode_batches_fp8():
    """Decode-sized batches (1 and 3 tokens over 256 experts: the BLOCK_M = 16 tiles)."""
    for t in (1, 3):
        x, ids, w, wgu, wd = _case("fp8", 256, t, 8, seed=100 + t)
        ex = _experts("fp8", wgu, wd, GM.expert_range(256, 0, 2), 256)
        assert GM.default_moe_config(t, 8, 256).block_m == 16
        _assert_matches(GM.grouped_moe(x, ids, w, ex, backend="grouped"),
                        GM.grouped_moe(x, ids, w, ex, backend="reference"), "fp8")


BF16_ODD_DIMS = (40, 24)  # hidden, inter: no multiple of 16, so 16-wide tiles have K and N tails
SMALL_TILES = GM.MoEBf16Config(block_m=16, bn_gate_up=16, bn_down=16, bk=16, group_m=3)  # several K steps


@pytest.mark.parametrize("case", ["t1_256e", "all_on_one_expert", "idle_experts_3ranks", "fp32_odd"])
def test_float_triton_path_matches_reference(case):
    """The decode-size Triton path for float weights at odd shapes: 1 token over 256 experts (half of them
    local), every token on one expert (37 rows: tiles of 16 and 32 with a partial last one), experts without
    a token on a 3-rank split, and fp32 (the math alone, no bf16 rounding) with K and N tails."""
    kind, n_experts, t, k, pool, layout, cfgs = {
        "t1_256e": ("bf16", 256, 1, 8, None, [GM.expert_range(256, 0, 2)], [None, SMALL_TILES]),
        "all_on_one_expert": ("bf16", 8, 37, 1, [5], [list(range(8))],
                              [SMALL_TILES, GM.MoEBf16Config(block_m=32, bn_gate_up=32, bk=32)]),
        "idle_experts_3ranks": ("bf16", 8, 11, 2, [1, 3, 6], LAYOUTS["3ranks"](8), [SMALL_TILES]),
        "fp32_odd": ("fp32", 12, 9, 3, None, [[0, 2, 3, 5, 7, 8, 11]], [SMALL_TILES]),
    }[case]
    x, ids, w, wgu, wd = _case(kind, n_experts, t, k, seed=31, pool=pool, dims=BF16_ODD_DIMS)
    for local in layout:
        ex = _experts(kind, wgu, wd, local, n_experts)
        ref = GM.grouped_moe(x, ids, w, ex, backend="reference")
        assert ref.float().abs().max() > 0 or case == "idle_experts_3ranks"
        for cfg in cfgs:
            got = GM.grouped_moe(x, ids, w, ex, backend="grouped", config=cfg)
            _assert_triton_float_matches(got, ref)


def test_float_path_choice_by_shape():
    """Triton for decode-sized T * k, F.grouped_mm above; tile height follows the mean rows per expert."""
    assert GM.default_bf16_config(1, 8, 256).block_m == 16
    assert GM.default_bf16_config(64, 8, 8).block_m == 64
    assert GM.default_bf16_config(GM.BF16_TRITON_MAX_ASSIGN // 8, 8, 256) is not None
    assert GM.default_bf16_config(GM.BF16_TRITON_MAX_ASSIGN // 8 + 1, 8, 256) is None
    x, ids, w, wgu, wd = _case("bf16", 8, 3, 2, seed=2)
    ex = _experts("bf16", wgu, wd, range(8), 8)
    with pytest.raises(KernelInputError, match="MoEBf16Config or GROUPED_MM"):
        GM.grouped_moe(x, ids, w, ex, backend="grouped", config=GM.MoEGemmConfig())
    with pytest.raises(KernelInputError, match="x in the weights' dtype"):
        GM.grouped_moe(x.float(), ids, w, ex, backend="grouped", config=SMALL_TILES)


def test_fp8_tile_configs_agree():
    x, ids, w, wgu, wd = _case("fp8", 8, 24, 2, seed=5)
    ex = _experts("fp8", wgu, wd, range(8), 8)
    ref = GM.grouped_moe(x, ids, w, ex, backend="reference")
    for cfg in (GM.MoEGemmConfig(block_m=16, bn_down=32, group_m=1, tma=False),
                GM.MoEGemmConfig(block_m=32, group_m=3, tma=False), GM.MoEGemmConfig(block_m=16, bn_down=64)):
        _assert_matches(GM.grouped_moe(x, ids, w, ex, backend="grouped", config=cfg), ref, "fp8")


def test_reference_equals_per_token_formula():
    """The reference against out[t] = sum over local experts e of w * down(silu(gate(x)) * up(x))."""
    x, ids, w, wgu, wd = _case("fp32", 12, 7, 3, seed=3)
    local = [1, 4, 5, 9, 11]
    got = GM.grouped_moe_reference(x, ids, w, _experts("fp32", wgu, wd, local, 12))
    inter = wd.shape[2]
    for t in range(7):
        want = torch.zeros(x.shape[1])
        for s in range(3):
            e = int(ids[t, s])
            if e in local:
                h = wgu[e] @ x[t]
                want += w[t, s] * (wd[e] @ (F.silu(h[:inter]) * h[inter:]))
        assert torch.allclose(got[t], want, rtol=1e-5, atol=1e-6)


def test_fp8_reference_uses_the_quantized_contract():
    """fp8 reference == dequantized weights with x and the SiLU output rounded through act_quant."""
    x, ids, w, wgu, wd = _case("fp8", 8, 5, 2, seed=4)
    x = x.float()
    ex = _experts("fp8", wgu, wd, range(8), 8)
    got = GM.grouped_moe_reference(x, ids, w, ex)
    inter, ipad = wd.shape[2], ex.inter_pad
    t, s = 3, 1
    e = int(ids[t, s])
    w13 = dequantize_block_fp8(ex.w13[e], ex.s13[e])
    xr = FL.R.act_dequant(*FL.R.act_quant(x[t:t + 1]))
    h = xr @ w13.t()
    a = F.silu(h[:, :inter]) * h[:, ipad:ipad + inter]
    y = FL.R.act_dequant(*FL.R.act_quant(a)) @ dequantize_block_fp8(ex.w2[e], ex.s2[e])[:, :inter].t()
    other = int(ids[t, 1 - s])
    y2 = GM._expert_forward_reference(x[t:t + 1], other, ex)
    want = (w[t, 0] * (y if s == 0 else y2) + w[t, 1] * (y2 if s == 0 else y))[0]
    assert torch.allclose(got[t], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_plan_invariants(fused):
    g = torch.Generator().manual_seed(9)
    n_experts, t, k = 12, 30, 4
    ids, _ = _routing(t, k, n_experts, g, pool=list(range(9)))  # experts 9..11 unused
    local = [0, 3, 4, 7, 10, 11]
    ex = GM.prepare_local_experts(torch.zeros(6, 16, 8), torch.zeros(6, 8, 8), local, n_experts)
    plan = GM.plan_moe_routing(ids, ex, block_m=4, fused=fused)
    counts = torch.tensor([(ids == e).sum().item() for e in local])
    assert torch.equal(plan.expert_ends, counts.cumsum(0).int())
    n_loc = int(counts.sum())
    assert plan.n_rows.tolist() == [n_loc]
    # pos: every local (t, s) has a distinct row < n_loc holding its token; non-local slots are -1
    is_local = torch.isin(ids, torch.tensor(local))
    assert torch.equal(plan.pos >= 0, is_local)
    rows = plan.pos[is_local].long()
    assert sorted(rows.tolist()) == list(range(n_loc))
    assert torch.equal(plan.sorted_token[rows].long(), torch.arange(t)[:, None].expand(t, k)[is_local])
    # rows of local expert li are [ends[li-1], ends[li]) and hold exactly its assignments
    starts = plan.expert_ends - counts.int()
    for li, e in enumerate(local):
        sel = plan.pos[ids == e]
        assert torch.all((sel >= starts[li]) & (sel < plan.expert_ends[li]))
    # tiles: within one expert, <= block_m rows, cover the local rows once, fit the static bound
    assert plan.tiles.shape[0] == GM.max_tiles(t * k, len(local), 4)
    covered = []
    for e, r0, r1 in plan.tiles.tolist():
        if e < 0:
            continue
        assert starts[e] <= r0 < plan.expert_ends[e] and r1 == plan.expert_ends[e]
        covered += list(range(r0, min(r0 + 4, r1)))
    assert covered == list(range(n_loc))


@pytest.mark.parametrize("n_experts,t,k,local,pool,block_m", [
    (256, 1, 8, range(128), None, 16),  # one decode token, half the experts local
    (8, 37, 1, range(8), [5], 16),  # every token on one expert: 3 tiles, the last partial
    (8, 13, 3, [1, 6, 7], [0, 2, 3, 4, 5, 6], 4),  # a local expert with no token, most slots non-local
    (8, 9, 2, [2, 3], [0, 1, 4], 16),  # no local assignment at all: every tile unused, every pos -1
    (32, 16, 8, range(32), None, 64),  # n = 128, several experts per 64-row tile budget
    (12, 11, 4, [0, 3, 4, 7, 10, 11], None, None),  # no tile table (the F.grouped_mm path)
])
def test_fused_plan_equals_torch_plan(n_experts, t, k, local, pool, block_m):
    """The one-launch plan (decode sizes) against the torch ops: every field equal; unused tiles: expert -1."""
    g = torch.Generator().manual_seed(t * 31 + k)
    ids, _ = _routing(t, k, n_experts, g, pool=pool)
    local = list(local)
    ex = GM.prepare_local_experts(torch.zeros(len(local), 16, 8), torch.zeros(len(local), 8, 8), local, n_experts)
    want = GM.plan_moe_routing(ids, ex, block_m, fused=False)
    got = GM.plan_moe_routing(ids, ex, block_m, fused=True)
    for name in ("expert_ends", "n_rows", "pos"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    n_loc = int(want.n_rows)
    assert torch.equal(got.sorted_token[:n_loc], want.sorted_token[:n_loc])  # later rows are never read
    assert got.block_m == block_m and (got.tiles is None) == (block_m is None)
    if block_m is not None:
        assert got.tiles.shape == want.tiles.shape and torch.equal(got.tiles[:, 0], want.tiles[:, 0])
        used = want.tiles[:, 0] >= 0
        assert torch.equal(got.tiles[used], want.tiles[used])


def test_fused_plan_variants_depend_on_the_size_bucket_only():
    """The tile table's lanes cover every step of an N_PAD bucket at every config tile height (so one compiled
    variant per bucket serves them all), and the warm-up's token counts reach every bucket a step can."""
    for e_l in (1, 8, 32, 256):
        for n in range(1, GM.FUSED_PLAN_MAX_ASSIGN + 1, 7):
            n_pad = GM._plan_n_pad(n)
            assert n < n_pad <= max(16, 2 * n)
            for bm in (16, 32, 64):
                assert GM._tiles_pad(n_pad, e_l, bm) >= GM.max_tiles(n, e_l, bm)
    for k in (1, 2, 6, 8, 9):
        warm = GM.plan_bucket_tokens(k)
        reached = {GM._plan_n_pad(t * k) for t in range(1, GM.FUSED_PLAN_MAX_ASSIGN // k + 1)}
        assert sorted(GM._plan_n_pad(t * k) for t in warm) == sorted(reached)
        assert max(warm) * k <= GM.FUSED_PLAN_MAX_ASSIGN
    assert GM.plan_bucket_tokens(8) == [1, 3, 7, 15, 31, 63, 127, 255]


def test_plan_choice_by_size(monkeypatch):
    """The default takes the one-launch plan up to FUSED_PLAN_MAX_ASSIGN assignments, the torch ops above."""
    calls = []
    real = GM._plan_fused
    monkeypatch.setattr(GM, "_plan_fused", lambda *a: calls.append(1) or real(*a))
    ids = torch.tensor([[0, 1], [1, 2], [2, 3]])
    ex = GM.prepare_local_experts(torch.zeros(4, 16, 8), torch.zeros(4, 8, 8), range(4), 4)
    GM.plan_moe_routing(ids, ex, 16)
    assert calls == [1]
    monkeypatch.setattr(GM, "FUSED_PLAN_MAX_ASSIGN", 5)
    GM.plan_moe_routing(ids, ex, 16)
    assert calls == [1]


def test_bad_inputs():
    ex = GM.prepare_local_experts(torch.zeros(2, 16, 8), torch.zeros(2, 8, 8), [0, 1], 4)
    x = torch.zeros(3, 8)
    ids = torch.zeros(3, 2, dtype=torch.long)
    w = torch.ones(3, 2)
    with pytest.raises(KernelInputError, match="hidden=8"):
        GM.grouped_moe(torch.zeros(3, 9), ids, w, ex)
    with pytest.raises(KernelInputError, match="topk_weights"):
        GM.grouped_moe(x, ids, w[:, :1], ex)
    with pytest.raises(KernelInputError, match="backend"):
        GM.grouped_moe(x, ids, w, ex, backend="fast")
    with pytest.raises(KernelInputError, match="duplicate"):
        GM.prepare_local_experts(torch.zeros(2, 16, 8), torch.zeros(2, 8, 8), [1, 1], 4)
    with pytest.raises(KernelInputError, match=r"in \[0, 4\)"):
        GM.prepare_local_experts(torch.zeros(2, 16, 8), torch.zeros(2, 8, 8), [1, 4], 4)
    with pytest.raises(KernelInputError, match="16-byte rows"):
        GM.grouped_moe(torch.zeros(3, 12), ids, w,
                       GM.prepare_local_experts(torch.zeros(2, 16, 12), torch.zeros(2, 12, 8), [0, 1], 4),
                       backend="grouped")


def test_no_host_sync_in_device_paths():
    from dsaserve.kernels import moe_gemm_hopper

    assert host_sync_calls(GM) == []
    assert host_sync_calls(moe_gemm_hopper) == []
    # the check sees a sync where there is one (and skips *_reference functions)
    assert any(".nonzero(" in c for c in host_sync_calls(GM, skip_suffix="_never"))


def test_fp8_gemm_kernel_choice():
    """default_moe_config: decode sizes keep the Triton kernel's 16-row tiles; "auto" asks for the Gluon kernel
    from HOPPER_MIN_ROWS_PER_EXPERT rows per expert and resolves to it only where it runs (an sm_90 GPU), to
    the Triton defaults elsewhere (here: the CPU); "hopper" where it cannot run and bad configs are errors."""
    per = GM.HOPPER_MIN_ROWS_PER_EXPERT
    assert GM.default_moe_config(1, 8, 256).kernel == "triton"
    assert GM.default_moe_config(per * 32 // 8, 8, 32).kernel == "auto"
    assert GM.default_moe_config(per * 32 // 8 - 1, 8, 32) == GM.MoEGemmConfig()
    assert GM.default_moe_config(per * 32 // 8, 8, 32, "triton") == GM.MoEGemmConfig()
    assert GM.default_moe_config(per * 32 // 8, 8, 32, "hopper") == GM.MoEGemmConfig(block_m=128, kernel="hopper")
    # the Gluon GEMMs claim their work items from a counter at every size (the measured default), unless pinned
    assert {(c.gate_up_schedule, c.down_schedule) for c in (GM.default_moe_config(16384, 8, e) for e in (32, 256))} \
        == {("queue", "queue")}
    pinned = GM.default_moe_config(16384, 8, 256, "hopper", schedule="per_item")
    assert (pinned.gate_up_schedule, pinned.down_schedule) == ("per_item", "per_item")
    with pytest.raises(KernelInputError, match="schedule must be auto or one of"):
        GM.default_moe_config(16384, 8, 256, schedule="dynamic")
    x, ids, w, wgu, wd = _case("fp8", 8, 40, 2, 0, dims=(128, 128))
    ex = _experts("fp8", wgu, wd, range(8), 8)
    xq, _ = FL.act_quant(x.float())
    assert GM._resolve_kernel(GM.MoEGemmConfig(kernel="auto"), xq, ex) == GM.MoEGemmConfig()
    with pytest.raises(KernelInputError, match="sm_90"):
        GM._resolve_kernel(GM.MoEGemmConfig(block_m=128, kernel="hopper"), xq, ex)
    with pytest.raises(KernelInputError, match="hopper"):
        GM.grouped_moe(x, ids, w, ex, backend="grouped", config=GM.MoEGemmConfig(block_m=128, kernel="hopper"))
    with pytest.raises(KernelInputError, match="block_m=128"):
        GM.MoEGemmConfig(kernel="hopper")
    with pytest.raises(KernelInputError, match="kernel must be one of"):
        GM.MoEGemmConfig(kernel="cutlass")
    with pytest.raises(KernelInputError, match="down_schedule must be one of"):
        GM.MoEGemmConfig(down_schedule="persistent")
    # "auto" on the CPU is the Triton path with its defaults: the same result as asking for it
    want = GM.grouped_moe(x, ids, w, ex, backend="grouped", config=GM.MoEGemmConfig())
    assert torch.equal(GM.grouped_moe(x, ids, w, ex, backend="grouped", config=GM.MoEGemmConfig(kernel="auto")), want)
