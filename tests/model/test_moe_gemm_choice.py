"""--moe-gemm picks the grouped experts' fp8 GEMM kernel at prefill sizes: "auto" (the Gluon kernel on
Hopper, resolved per call) by default, "triton" as the ablation; the choice reaches every grouped call."""

import pytest
import torch

from dsaserve import args as engine_args
from dsaserve.model import moe as moe_module
from dsaserve.model.backends import select_backends


def _forward_configs(monkeypatch, backends, tokens):
    seen = []
    real = moe_module.grouped_moe_quantized

    def spy(*a, **kw):
        seen.append(a[7] if len(a) > 7 else kw.get("config"))
        return real(*a, **kw)

    monkeypatch.setattr(moe_module, "grouped_moe_quantized", spy)
    experts = backends.experts(32, range(32), 128, 128, torch.bfloat16, True, "cpu")
    x = torch.randn(tokens, 128)
    xq, xs = experts.prepare_input(x)
    ids = torch.randint(0, 32, (tokens, 8))
    experts(xq, xs, ids, torch.rand(tokens, 8))
    return experts, seen


@pytest.mark.parametrize("choice", ["auto", "triton"])
def test_moe_gemm_choice_reaches_the_grouped_kernel_config(monkeypatch, choice):
    assert set(engine_args.MOE_GEMM) == {"auto", "triton"}
    backends = select_backends(device="cpu", experts="grouped", quantization="fp8", moe_gemm=choice)
    assert backends.experts.name == "grouped"
    experts, seen = _forward_configs(monkeypatch, backends, 512)  # 128 rows per expert: a prefill size
    assert experts.gemm_kernel == choice
    assert len(seen) == 1 and seen[0].kernel == choice, seen
    _, seen = _forward_configs(monkeypatch, backends, 2)  # decode size: the Triton kernel's short tiles
    assert seen[0].kernel == "triton" and seen[0].block_m == 16


def test_unknown_moe_gemm_is_refused():
    with pytest.raises(ValueError, match="unknown MoE GEMM kernel 'hopper'"):
        select_backends(device="cpu", experts="grouped", moe_gemm="hopper")


@pytest.mark.parametrize("schedule,group_m", [("queue", 0), ("static", 16), ("per_item", 4), ("auto", 16)])
def test_moe_schedule_and_raster_reach_the_grouped_kernel_config(monkeypatch, schedule, group_m):
    """--moe-schedule / --moe-group-m (the A/B flags of the Hopper kernel) reach the prefill-size config; "auto" and
    0 keep MoEGemmConfig's defaults (the counter schedule, GROUP_M 8)."""
    assert set(engine_args.MOE_SCHEDULES) == {"auto", "static", "per_item", "queue"}
    backends = select_backends(device="cpu", experts="grouped", quantization="fp8", moe_schedule=schedule,
                               moe_group_m=group_m)
    _, seen = _forward_configs(monkeypatch, backends, 512)
    want = "queue" if schedule == "auto" else schedule
    assert (seen[0].gate_up_schedule, seen[0].down_schedule, seen[0].group_m) == (want, want, group_m or 8), seen


def test_bad_moe_schedule_or_raster_is_refused():
    with pytest.raises(ValueError, match="unknown MoE GEMM schedule 'dynamic'"):
        select_backends(device="cpu", experts="grouped", moe_schedule="dynamic")
    with pytest.raises(ValueError, match="moe_group_m must be >= 0"):
        select_backends(device="cpu", experts="grouped", moe_group_m=-1)


@pytest.mark.parametrize("order,want", [("auto", False), ("ordered", True), ("free", False)])
def test_moe_mma_order_reaches_the_grouped_kernel_config(monkeypatch, order, want):
    """--moe-mma-order (the A/B flag of the Hopper kernels' turn-taking consumers) reaches both GEMMs' prefill-size
    config; "auto" keeps MoEGemmConfig's default (free)."""
    from dsaserve.kernels import mma_turns

    assert engine_args.MMA_ORDERS == mma_turns.MMA_ORDERS
    backends = select_backends(device="cpu", experts="grouped", quantization="fp8", moe_mma_order=order)
    _, seen = _forward_configs(monkeypatch, backends, 512)
    assert (seen[0].gate_up_ordered, seen[0].down_ordered) == (want, want), seen


@pytest.mark.parametrize("order,regs,want", [("auto", 0, None), ("ordered", 0, (True, 240)),
                                             ("free", 232, (False, 232)), ("ordered", 232, (True, 232))])
def test_indexer_filter_knobs_make_the_filter_config(order, regs, want):
    """--indexer-mma-order / --indexer-filter-regs make the fp8 indexer's filter launch config (None: the kernel's
    defaults); tests/model/test_fast_path.py follows it into the top-k calls of a forward."""
    backends = select_backends(device="cpu", indexer="fp8", indexer_mma_order=order, indexer_filter_regs=regs)
    fc = backends.indexer.filter_config
    assert (fc is None) == (want is None) and (fc is None or (fc.ordered, fc.consumer_regs) == want), fc


def test_bad_indexer_filter_knobs_are_refused():
    with pytest.raises(ValueError, match="unknown indexer_mma_order 'on'"):
        select_backends(device="cpu", indexer="fp8", indexer_mma_order="on")
    with pytest.raises(ValueError, match="indexer_filter_regs"):
        select_backends(device="cpu", indexer="fp8", indexer_filter_regs=248)
