"""The Gluon grouped MoE GEMM (``kernels.moe_gemm_hopper``, sm_90) against the per-expert reference and the
Triton kernel, on the GPU: ragged experts (row counts that are not multiples of the 128-row tile, tiles whose
second 64-row half is empty), experts without tokens, one expert taking every token, an expert-parallel subset, intermediate sizes padded to 128,
and DeepSeek-V3.2's expert shapes (7168 -> 2048) at 32 and 256 experts. Skipped without an sm_90 GPU."""

from dataclasses import replace

import pytest
import torch

from dsaserve.kernels import act_quant
from dsaserve.kernels import fp8_linear as FL
from dsaserve.kernels import grouped_moe as GM
from dsaserve.kernels import moe_gemm_hopper as MH

HOPPER = GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper")
TRITON = GM.MoEGemmConfig(kernel="triton")


def _need_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9 or not MH.HAVE_GLUON:
        pytest.skip("needs an sm_90 GPU and Triton's Gluon")


def _experts(n_experts, local, hidden, inter, gen):
    """fp8 experts ``local`` (global ids) of ``n_experts``, drawn on the GPU and quantized per 128x128 block."""
    parts = {"g": [], "sg": [], "u": [], "su": [], "d": [], "sd": []}
    for _ in local:  # one expert at a time: the float weights of 256 experts would not fit at once
        wg = torch.randn(inter, hidden, device="cuda", generator=gen) * hidden**-0.5
        wu = torch.randn(inter, hidden, device="cuda", generator=gen) * hidden**-0.5
        wd = torch.randn(hidden, inter, device="cuda", generator=gen) * inter**-0.5
        for (q, s), a, b in ((FL.quantize_weight_fp8(wg), "g", "sg"), (FL.quantize_weight_fp8(wu), "u", "su"),
                             (FL.quantize_weight_fp8(wd), "d", "sd")):
            parts[a].append(q)
            parts[b].append(s)
    st = {k: torch.stack(v) for k, v in parts.items()}
    return GM.prepare_local_experts_fp8(st["g"], st["sg"], st["u"], st["su"], st["d"], st["sd"], list(local),
                                        n_experts)


def _routing(t, k, n_experts, gen, pool=None):
    pool = torch.arange(n_experts, device="cuda") if pool is None else torch.tensor(pool, device="cuda")
    ids = pool[torch.rand(t, len(pool), device="cuda", generator=gen).topk(k, dim=1).indices]
    return ids, torch.rand(t, k, device="cuda", generator=gen) + 0.1


# name: (n_experts, local experts, tokens, top-k, hidden, inter, routing pool or None)
CASES = {
    "ragged_8e_inter_padded": (8, range(8), 300, 2, 256, 200, None),
    "ep_subset_with_idle_experts": (16, range(3, 11), 517, 4, 384, 128, [0, 1, 2, 3, 4, 7, 8, 9, 10, 12, 15]),
    "one_expert_takes_all": (8, range(8), 257, 1, 256, 256, [2]),
    "dsv32_32e": (32, range(32), 1024, 8, 7168, 2048, None),
    "dsv32_256e_ep_quarter": (256, range(64, 128), 2048, 8, 7168, 2048, None),
}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_hopper_kernel_matches_reference_and_triton(case):
    _need_hopper()
    n_experts, local, t, k, hidden, inter, pool = CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(7)
    ex = _experts(n_experts, local, hidden, inter, gen)
    x = (torch.randn(t, hidden, device="cuda", generator=gen) * 2).bfloat16()
    ids, w = _routing(t, k, n_experts, gen, pool)
    ref = GM.grouped_moe_reference(x, ids, w, ex)
    got = GM.grouped_moe(x, ids, w, ex, backend="grouped", config=HOPPER)
    tri = GM.grouped_moe(x, ids, w, ex, backend="grouped", config=TRITON)
    single = GM.grouped_moe(x, ids, w, ex, backend="grouped", config=replace(HOPPER, down_pair=False))
    ahead1 = GM.grouped_moe(x, ids, w, ex, backend="grouped",
                            config=replace(HOPPER, scales_ahead=1, blocked_epilogue=False))
    unblocked = GM.grouped_moe(x, ids, w, ex, backend="grouped", config=replace(HOPPER, blocked_epilogue=False))
    per_item = GM.grouped_moe(x, ids, w, ex, backend="grouped", config=replace(HOPPER, gate_up_schedule="per_item",
                                                                             down_schedule="per_item"))
    static = GM.grouped_moe(x, ids, w, ex, backend="grouped", config=replace(HOPPER, gate_up_schedule="static",
                                                                           down_schedule="static"))
    # the consumers' MMAs issued in turn, under each schedule and with 128-column down items (idle halves pass
    # their turns: ragged and one-expert cases)
    ordered = {sched: GM.grouped_moe(x, ids, w, ex, backend="grouped",
                                     config=replace(HOPPER, gate_up_ordered=True, down_ordered=True,
                                                    gate_up_schedule=sched, down_schedule=sched))
               for sched in ("queue", "static", "per_item")}
    ordered_single = GM.grouped_moe(x, ids, w, ex, backend="grouped",
                                    config=replace(HOPPER, gate_up_ordered=True, down_ordered=True, down_pair=False))
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert ref.float().abs().max() > 0
    err, err_tri, vs_tri = _rel(got, ref), _rel(tri, ref), _rel(got, tri)
    d = (got.float() - ref.float()).abs()
    far = (d > 0.02 * ref.float().abs().max()).float().mean().item()
    print(f"{case}: rel err vs reference {err:.2e} (triton {err_tri:.2e}), vs triton {vs_tri:.2e}, far {far:.4f}")
    # same MMAs (4 x k32 per 128-deep step), same promotion formula, same epilogue: the Triton kernel's result
    # bit for bit (H200, 2026-12-03: every case)
    assert torch.equal(got, tri), vs_tri
    assert torch.equal(single, tri)  # 128-column down work items (the pair is the default where hidden % 256 == 0)
    # the scales one step ahead (same values, same promotions), stores from the MMA layout (other stores)
    assert torch.equal(ahead1, tri) and torch.equal(unblocked, tri)
    # items claimed from a counter (the default), strided over one program per SM, or one program per item: the
    # same items, the same math
    assert torch.equal(per_item, tri) and torch.equal(static, tri)
    # the order of the two consumers' MMA issues changes no value
    for sched, out in ordered.items():
        assert torch.equal(out, tri), sched
    assert torch.equal(ordered_single, tri)
    # vs the fp32 products of the dequantized operands: the fp8 tensor-core accumulation inside each 128-deep
    # step is not fp32 (both kernels 3.5e-3 .. 4.5e-3 on these cases, H200 2026-12-03; the CPU interpreter
    # meets 2e-3); no element far off
    assert err < 5e-3 and far == 0, (err, far)
    if pool is not None:  # tokens of experts outside the pool / rank contribute nothing, no NaN anywhere
        assert torch.isfinite(got.float()).all()


def test_hopper_gate_up_output_equals_triton_on_written_rows():
    """The fused SiLU + quant epilogue: the down GEMM's e4m3 input and its scales agree with the Triton
    kernel's on every row the plan fills (row order is the plan's, the same for both tile heights)."""
    _need_hopper()
    gen = torch.Generator(device="cuda").manual_seed(3)
    ex = _experts(8, range(8), 512, 384, gen)
    x = (torch.randn(700, 512, device="cuda", generator=gen) * 2).bfloat16()
    ids, _ = _routing(700, 3, 8, gen)
    xq, xs = act_quant(x)
    plan_h = GM.plan_moe_routing(ids, ex, GM.HOPPER_BLOCK_M)
    plan_t = GM.plan_moe_routing(ids, ex, TRITON.block_m)
    aq_h, as_h = GM._fp8_gate_up(xq, xs, plan_h, ex, HOPPER)
    aq_t, as_t = GM._fp8_gate_up(xq, xs, plan_t, ex, TRITON)
    n = 700 * 3
    assert torch.equal(plan_h.sorted_token[:n], plan_t.sorted_token[:n])
    deq_h = aq_h[:n].float().view(n, -1, 128) * as_h[:n, :, None]
    deq_t = aq_t[:n].float().view(n, -1, 128) * as_t[:n, :, None]
    rel = _rel(deq_h, deq_t)
    same = (aq_h[:n].view(torch.uint8) == aq_t[:n].view(torch.uint8)).float().mean().item()
    print(f"gate_up: rel diff {rel:.2e}, identical e4m3 codes {same:.5f}")
    assert rel < 1e-3 and same > 0.99, (rel, same)
    assert torch.allclose(as_h[:n], as_t[:n], rtol=1e-3, atol=0)


def test_hopper_kernel_is_deterministic_and_sync_free():
    _need_hopper()
    gen = torch.Generator(device="cuda").manual_seed(5)
    ex = _experts(16, range(16), 1024, 512, gen)
    x = torch.randn(999, 1024, device="cuda", generator=gen).bfloat16()
    ids, w = _routing(999, 4, 16, gen)
    first = GM.grouped_moe(x, ids, w, ex, backend="grouped", config=HOPPER)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = GM.grouped_moe(x, ids, w, ex, backend="grouped", config=HOPPER)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(first, again)


def test_shared_output_added_in_the_combine_equals_adding_after():
    """The engine hands the shared expert's output to the combine (``add=``): bit for bit ``routed + add``
    in bf16 on the GPU, with the routed sum rounded to bf16 first as a separate add does."""
    _need_hopper()
    gen = torch.Generator(device="cuda").manual_seed(6)
    ex = _experts(16, range(16), 1024, 512, gen)
    x = torch.randn(999, 1024, device="cuda", generator=gen).bfloat16()
    ids, w = _routing(999, 4, 16, gen)
    add = torch.randn(999, 1024, device="cuda", generator=gen).bfloat16()
    xq, xs = act_quant(x, 128)
    for cfg in (HOPPER, TRITON):
        routed = GM.grouped_moe_quantized(xq, xs, ids, w, ex, torch.bfloat16, backend="grouped", config=cfg)
        got = GM.grouped_moe_quantized(xq, xs, ids, w, ex, torch.bfloat16, backend="grouped", config=cfg, add=add)
        assert torch.equal(got, routed + add), cfg.kernel


def test_auto_takes_the_hopper_kernel_at_prefill_sizes_only():
    _need_hopper()
    gen = torch.Generator(device="cuda").manual_seed(9)
    ex = _experts(32, range(32), 256, 128, gen)
    xq = torch.zeros(1, 256, device="cuda").to(torch.float8_e4m3fn)
    assert GM._resolve_kernel(GM.default_moe_config(1024, 8, 32), xq, ex).kernel == "hopper"
    assert GM._resolve_kernel(GM.default_moe_config(1024, 8, 32, "triton"), xq, ex).kernel == "triton"
    assert GM._resolve_kernel(GM.default_moe_config(64, 8, 32), xq, ex).kernel == "triton"  # 16 rows per expert
