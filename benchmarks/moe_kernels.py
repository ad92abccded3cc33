"""MoE kernel benchmark: decode-size experts against the weight-read floor, and the prefill fp8 config sweep.

    PYTHONPATH=. python benchmarks/moe_kernels.py --out $OUT/moe_kernels.json      (one H200: < 90 s)
    PYTHONPATH=. python benchmarks/moe_kernels.py --quick                          (CPU: checks the script)

Sections (``--only``, comma list; all by default, in this order):
  ceilings  device copy bandwidth (1 GiB clone) and the fp8 ``torch._scaled_mm`` ceiling (8192^3 tensorwise,
            best of plain / fast accumulation), measured in this run: the floors below use them.
  decode    T in (1, 8, 32, 64, 128) tokens x top-8 over 32 and 256 experts (7168 -> 2048): bf16 experts through
            F.grouped_mm (``config=GROUPED_MM``) and through the Triton path (``MoEBf16Config``, the tile height
            ``default_bf16_config`` would pick, whether or not T * k is under its threshold), fp8 experts
            through the Triton path (default config); eager and CUDA-graph replay microseconds against the
            weight-read floor of the distinct experts the batch touches (bytes / copy bandwidth); the routing
            plan alone, one Triton launch vs the torch ops, eager and in a graph; device launches per forward
            at T = 1 (torch.profiler).
  prefill   16384 tokens x top-8, uniform random routing, fp8 experts (32 and 256): a sweep of
            ``MoEGemmConfig`` (tile height, down tile width, warps, stages, GROUP_M ordering, TMA); per config
            the whole forward, the gate_up and down launches alone, TFLOPS and the ratio to the FLOP floor at
            the fp8 ceiling.
  decode_bf16_sweep  more ``MoEBf16Config`` tile shapes for the bf16 Triton path at T = 1 and 32 (graph replay).

Every variant is checked against ``grouped_moe_reference`` first (norm-relative and max error / max |ref| are
printed; rows sampled at prefill); one failing variant is recorded and skipped, never fatal. Times are medians
of CUDA-event-timed repeats (``triton.testing.do_bench``, L2 flushed between repeats). A time budget
(``--budget-s``, default 85) skips what is left once spent, listing it under "skipped": Triton compiles most
of the time on a cold cache. ``--quick`` runs every section at toy sizes on the CPU (Triton under its
interpreter, wall-clock times that mean nothing, no graphs/profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

QUICK = "--quick" in sys.argv
if QUICK:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from dsaserve.kernels import grouped_moe as GM  # noqa: E402

if QUICK:
    import tests.kernels.conftest  # noqa: F401,E402  (the interpreter fix the kernel tests use)

RESULTS: dict = {"device": {}, "ceilings": {}, "decode": [], "plan": [], "launches": [], "prefill": [],
                 "decode_bf16_sweep": [], "checks": [], "skipped": [], "section_s": {}}
H, I, TOP_K = 7168, 2048, 8
EXPERTS = (32, 256)
DECODE_T = (1, 8, 32, 64, 128)
SWEEP_T = (1, 32)
PREFILL_T = 16384
DEV = "cuda"
# prefill candidates, most promising first (the budget may cut the tail): the Triton default; the Gluon kernel
# (moe_gemm_hopper: producer + two consumer warpgroups, persistent, 128-row tiles); 128-row tiles (twice the
# MMA work per byte of weight tile read from L2, 8 warps keep the two 128x128 accumulators out of local
# memory); 2-3 stages so two 64-row CTAs share an SM (one's per-K-step scale promotion under the other's MMA);
# GROUP_M (how many row tiles sweep the columns together: L2 reuse of the expert's weights); wider down tiles;
# pointer loads instead of TMA
PREFILL_CONFIGS = [
    GM.MoEGemmConfig(),
    # the Gluon warp-specialized kernel (sm_90) as the engine runs it: both GEMMs' programs (one per SM) claim
    # their work items from a counter (``MoEGemmConfig``'s "queue" default), GROUP_M 8; the same with ordered
    # MMA issues; then GROUP_M 16; then the
    # earlier schedules: one program per SM with the items strided ("static", the default up to session 13 at 32
    # experts), and gate_up with one program per item (the default below 2048 rows an expert in session 13; the
    # persistent static gate_up read ~4x the weights from DRAM at 256 experts, ncu 2026-12-04); then GROUP_M 4
    # with the counter, one program per item at GROUP_M 4 / 16, and static at GROUP_M 4 / 16 / 2 / 32
    GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper"),
    # the same with the two consumers' MMAs issued in turn (session 19: one's promotion under the other's MMA)
    GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper", gate_up_ordered=True, down_ordered=True),
    GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper", group_m=16),
    GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper", gate_up_schedule="static", down_schedule="static"),
    GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper", gate_up_schedule="per_item", down_schedule="static"),
    GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper", group_m=4),
    GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper", gate_up_schedule="per_item", down_schedule="static",
                     group_m=4),
    GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper", gate_up_schedule="per_item", down_schedule="static",
                     group_m=16),
    *(GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper", gate_up_schedule="static", down_schedule="static",
                       group_m=g) for g in (4, 16, 2, 32)),
    # the same before session 9's two knobs (scales one step ahead, stores from the MMA layout), then with only
    # the scales two steps ahead
    GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper", scales_ahead=1, blocked_epilogue=False),
    GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper", scales_ahead=2, blocked_epilogue=False),
    GM.MoEGemmConfig(block_m=GM.HOPPER_BLOCK_M, kernel="hopper", down_pair=False),  # its 128-column down tiles
    GM.MoEGemmConfig(block_m=128, warps_gate_up=8, stages_gate_up=3, warps_down=8, stages_down=3),
    GM.MoEGemmConfig(block_m=128, warps_gate_up=8, stages_gate_up=4, warps_down=8, stages_down=4),
    GM.MoEGemmConfig(warps_gate_up=4, stages_gate_up=2),
    GM.MoEGemmConfig(warps_gate_up=4, stages_gate_up=3, stages_down=3),
    GM.MoEGemmConfig(group_m=16),
    GM.MoEGemmConfig(group_m=4),
    GM.MoEGemmConfig(block_m=128, warps_gate_up=8, stages_gate_up=3, warps_down=8, stages_down=3, group_m=16),
    GM.MoEGemmConfig(warps_gate_up=8, stages_gate_up=3),
    GM.MoEGemmConfig(tma=False),
]
# extra bf16 Triton tiles for decode (block_m comes from default_bf16_config's rule at each T)
BF16_SWEEP = [dict(bn_gate_up=32, bn_down=32), dict(bn_gate_up=32, bn_down=64, bk=64, stages=6),
              dict(bn_gate_up=64, bn_down=128, bk=64, stages=5), dict(bn_gate_up=128, bn_down=128, warps=8, stages=3),
              dict(bk=256, stages=3), dict(group_m=1)]
if QUICK:
    H, I, EXPERTS, DECODE_T, SWEEP_T, PREFILL_T, DEV = 256, 128, (8, 16), (1, 3), (1,), 24, "cpu"
    PREFILL_CONFIGS = [PREFILL_CONFIGS[0], GM.MoEGemmConfig(block_m=16, bn_down=64, group_m=2, tma=False)]
    BF16_SWEEP = BF16_SWEEP[:1]
DEADLINE = [float("inf")]


# ----------------------------------------------------------------------------------------------- helpers
def out_of_time(what: str) -> bool:
    if time.time() < DEADLINE[0]:
        return False
    RESULTS["skipped"].append(what)
    print(f"[skip] {what}: time budget spent", flush=True)
    return True


def bench_us(fn, rep_ms: int = 40) -> float:
    """Median microseconds of fn() (CUDA events, triton.testing.do_bench); --quick: one wall-clock call."""
    if QUICK:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def graph_us(fn, rep_ms: int = 40) -> float | None:
    """fn captured in a CUDA graph (after two warm-up calls on a side stream), median replay microseconds."""
    if QUICK:
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    us = bench_us(g.replay, rep_ms)
    del g
    return us


def device_launches(fn) -> int | None:
    """Device operations (kernels, memsets, copies) of one call of fn, counted by torch.profiler."""
    if QUICK:
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(norm-relative error, max |error| / max |ref|)."""
    d = got.double() - ref.double()
    scale = ref.double().abs().max().clamp_min(1e-30)
    return float(d.norm() / ref.double().norm().clamp_min(1e-30)), float(d.abs().max() / scale)


def check(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> dict:
    """Record the errors against the reference; ok = norm-relative error < tol (bf16 rounds h, a and y; fp8
    also quantizes x and a and accumulates in reduced precision: ~1e-3; a wrong row, expert or scale: O(1))."""
    rel, mx = errors(got, ref)
    ok = rel < tol and not torch.isnan(got).any().item()
    RESULTS["checks"].append({"name": name, "ok": ok, "rel_err": rel, "max_rel_err": mx})
    print(f"[check] {'OK  ' if ok else 'FAIL'} {name}: rel err {rel:.2e}, max err / max|ref| {mx:.2e}", flush=True)
    return {"ok": ok, "rel_err": rel, "max_rel_err": mx}


def failed(name: str, e: BaseException) -> None:
    traceback.print_exc()
    RESULTS["checks"].append({"name": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    print(f"[check] FAIL {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)


def fp8_rand(*shape) -> torch.Tensor:
    """Random e4m3 values (normal draws rounded), in chunks so the fp32 temporaries stay small."""
    out = torch.empty(shape, dtype=torch.float8_e4m3fn, device=DEV)
    flat = out.view(-1)
    step = 1 << 28
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        flat[i:i + n] = torch.randn(n, device=DEV).to(torch.float8_e4m3fn)
    return out


def experts_bf16(e: int) -> GM.LocalExperts:
    wgu = torch.randn(e, 2 * I, H, device=DEV, dtype=torch.bfloat16).mul_(H**-0.5)
    wd = torch.randn(e, H, I, device=DEV, dtype=torch.bfloat16).mul_(I**-0.5)
    return GM.prepare_local_experts(wgu, wd, range(e), e)


def experts_fp8(e: int) -> GM.LocalExperts:
    """Random fp8 experts straight in the prepared layout (I a multiple of 128: no padding); scales ~ 1/sqrt(K)
    over e4m3 values of unit variance, so the activations stay O(1) through both projections."""
    _, m = GM._expert_map(range(e), e, DEV)

    def scales(*shape, k):
        return (torch.rand(*shape, device=DEV) * 0.5 + 0.75) * k**-0.5

    return GM.LocalExperts(e, tuple(range(e)), m, H, I,
                           w13=fp8_rand(e, 2 * I, H), s13=scales(e, 2 * I // 128, H // 128, k=H),
                           w2=fp8_rand(e, H, I), s2=scales(e, H // 128, I // 128, k=I))


def routing(t: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random distinct experts per token, weights in [0.1, 1.1)."""
    ids = torch.rand(t, e, device=DEV).topk(TOP_K, dim=1).indices
    return ids, torch.rand(t, TOP_K, device=DEV) + 0.1


def bf16_block_m(t: int, e: int) -> int:
    """The tile height ``default_bf16_config`` picks (also above its T * k threshold)."""
    rows = t * TOP_K / e
    return 16 if rows <= 16 else (32 if rows <= 32 else 64)


def expert_bytes(kind: str) -> float:
    if kind == "bf16":
        return 3 * H * I * 2
    return 3 * H * I + 4 * (2 * I // 128 * H // 128 + H // 128 * I // 128)


# ----------------------------------------------------------------------------------------------- sections
def ceilings() -> None:
    n_copy = (1 << 20) if QUICK else (1 << 30)
    buf = torch.empty(n_copy, dtype=torch.uint8, device=DEV)
    gbs = 2 * n_copy / bench_us(lambda: buf.clone(), 100) / 1e3
    RESULTS["ceilings"]["copy_gbs"] = gbs
    del buf
    if not QUICK:
        n = 8192
        a8 = torch.randn(n, n, device=DEV).to(torch.float8_e4m3fn)
        b8 = torch.randn(n, n, device=DEV).to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=DEV)
        best = 0.0
        for fast in (False, True):
            us = bench_us(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16, use_fast_accum=fast),
                          100)
            RESULTS["ceilings"][f"fp8_tensorwise{'_fast_accum' if fast else ''}_tflops"] = 2 * n**3 / us / 1e6
            best = max(best, 2 * n**3 / us / 1e6)
        RESULTS["ceilings"]["fp8_ceiling_tflops"] = best
        del a8, b8
    print(f"[ceilings] {RESULTS['ceilings']}", flush=True)


def _variant(row: dict, name: str, fn, ref: torch.Tensor, graphs: bool = True) -> None:
    """Check fn() against ref, then time it eager and as a CUDA graph into row[name]."""
    try:
        res = check(f"decode E={row['experts']} T={row['tokens']} {name}", fn(), ref)
        if res["ok"]:
            res["eager_us"] = bench_us(fn)
            if graphs:
                res["graph_us"] = graph_us(fn)
        row[name] = res
    except Exception as e:  # noqa: BLE001 - record and go on
        failed(f"decode E={row['experts']} T={row['tokens']} {name}", e)


def decode() -> None:
    gbs = RESULTS["ceilings"].get("copy_gbs", 4300.0)
    for e in EXPERTS:
        if out_of_time(f"decode E={e}"):
            return
        exb, ex8 = experts_bf16(e), experts_fp8(e)
        for t in DECODE_T:
            if out_of_time(f"decode E={e} T={t}"):
                break
            x = torch.randn(t, H, device=DEV, dtype=torch.bfloat16)
            ids, w = routing(t, e)
            touched = int(torch.unique(ids).numel())
            row: dict = {"experts": e, "tokens": t, "top_k": TOP_K, "experts_touched": touched,
                         "floor_bf16_us": touched * expert_bytes("bf16") / gbs / 1e3,
                         "floor_fp8_us": touched * expert_bytes("fp8") / gbs / 1e3,
                         "default_bf16_path": "triton" if GM.default_bf16_config(t, TOP_K, e) else "grouped_mm"}
            ref_b = GM.grouped_moe_reference(x, ids, w, exb)
            ref_8 = GM.grouped_moe_reference(x, ids, w, ex8)
            cfg_b = GM.MoEBf16Config(block_m=bf16_block_m(t, e))
            row["bf16_triton_config"] = str(cfg_b)
            _variant(row, "bf16_grouped_mm", lambda: GM.grouped_moe(x, ids, w, exb, config=GM.GROUPED_MM), ref_b)
            _variant(row, "bf16_triton", lambda: GM.grouped_moe(x, ids, w, exb, config=cfg_b), ref_b)
            _variant(row, "fp8_triton", lambda: GM.grouped_moe(x, ids, w, ex8), ref_8)
            for name, kind in (("bf16_grouped_mm", "bf16"), ("bf16_triton", "bf16"), ("fp8_triton", "fp8")):
                r = row.get(name) or {}
                for how in ("eager_us", "graph_us"):
                    if r.get(how):
                        r[how.replace("_us", "_over_floor")] = r[how] / row[f"floor_{kind}_us"]
            # the two launches of the bf16 Triton path alone (eager), against their own weight-read floors
            try:
                plan = GM.plan_moe_routing(ids, exb, cfg_b.block_m)
                row["bf16_triton_steps_us"] = {
                    "plan": bench_us(lambda: GM.plan_moe_routing(ids, exb, cfg_b.block_m)),
                    "forward_after_plan": bench_us(lambda: GM._moe_bf16_triton(x, plan, w, exb, cfg_b)),
                }
            except Exception as e_:  # noqa: BLE001
                failed(f"decode E={e} T={t} bf16 triton steps", e_)
            plan_row(e, t, ids, exb, cfg_b.block_m)
            if t == 1:
                launches = {"experts": e, "tokens": t}
                for name, fn in (("bf16_grouped_mm", lambda: GM.grouped_moe(x, ids, w, exb, config=GM.GROUPED_MM)),
                                 ("bf16_triton", lambda: GM.grouped_moe(x, ids, w, exb, config=cfg_b)),
                                 ("fp8_triton", lambda: GM.grouped_moe(x, ids, w, ex8)),
                                 ("plan_fused", lambda: GM.plan_moe_routing(ids, exb, 16, fused=True)),
                                 ("plan_torch", lambda: GM.plan_moe_routing(ids, exb, 16, fused=False))):
                    try:
                        launches[name] = device_launches(fn)
                    except Exception as e_:  # noqa: BLE001
                        failed(f"launches {name}", e_)
                RESULTS["launches"].append(launches)
                print(f"[launches] {launches}", flush=True)
            RESULTS["decode"].append(row)
            print(f"[decode] {row}", flush=True)
        del exb, ex8
        if not QUICK:
            torch.cuda.empty_cache()


def plan_row(e: int, t: int, ids: torch.Tensor, ex: GM.LocalExperts, block_m: int) -> None:
    """The routing plan alone: one Triton launch vs the torch ops (fields checked equal first)."""
    row: dict = {"experts": e, "tokens": t, "block_m": block_m}
    try:
        a = GM.plan_moe_routing(ids, ex, block_m, fused=False)
        b = GM.plan_moe_routing(ids, ex, block_m, fused=True)
        used = a.tiles[:, 0] >= 0
        n_loc = int(a.n_rows.item())
        same = (torch.equal(a.pos, b.pos) and torch.equal(a.expert_ends, b.expert_ends)
                and torch.equal(a.n_rows, b.n_rows) and torch.equal(a.sorted_token[:n_loc], b.sorted_token[:n_loc])
                and torch.equal(a.tiles[:, 0], b.tiles[:, 0]) and torch.equal(a.tiles[used], b.tiles[used]))
        RESULTS["checks"].append({"name": f"plan E={e} T={t} fused == torch", "ok": same})
        print(f"[check] {'OK  ' if same else 'FAIL'} plan E={e} T={t} fused == torch", flush=True)
        for fused in (False, True):
            fn = (lambda f=fused: GM.plan_moe_routing(ids, ex, block_m, fused=f))
            key = "fused" if fused else "torch"
            row[f"{key}_eager_us"] = bench_us(fn)
            row[f"{key}_graph_us"] = graph_us(fn)
    except Exception as e_:  # noqa: BLE001
        failed(f"plan E={e} T={t}", e_)
    RESULTS["plan"].append(row)
    print(f"[plan] {row}", flush=True)


def _moe_flops(n_assign: int) -> float:
    return 2.0 * n_assign * (H * 2 * I + I * H)


def prefill() -> None:
    from dsaserve.kernels import act_quant

    ceiling = RESULTS["ceilings"].get("fp8_ceiling_tflops", 1300.0)
    x = torch.randn(PREFILL_T, H, device=DEV, dtype=torch.bfloat16)
    n = PREFILL_T * TOP_K
    flops = _moe_flops(n)
    flops_gu, flops_dn = 2.0 * n * H * 2 * I, 2.0 * n * I * H
    for e in EXPERTS:
        if out_of_time(f"prefill E={e}"):
            return
        ex = experts_fp8(e)
        ids, w = routing(PREFILL_T, e)
        rows = torch.randperm(PREFILL_T, device=DEV)[:16]
        ref = GM.grouped_moe_reference(x[rows], ids[rows], w[rows], ex)
        xq, xs = act_quant(x)
        row: dict = {"experts": e, "tokens": PREFILL_T, "top_k": TOP_K, "floor_ms": flops / ceiling / 1e9,
                     "fp8_ceiling_tflops": ceiling, "by_config": {}}
        for cfg in PREFILL_CONFIGS:
            name = str(cfg)
            if out_of_time(f"prefill E={e} {name}"):
                break
            try:
                out = GM.grouped_moe(x, ids, w, ex, config=cfg)
                res = check(f"prefill E={e} {name}", out[rows], ref)
                del out
                if res["ok"]:
                    res["forward_ms"] = bench_us(lambda: GM.grouped_moe(x, ids, w, ex, config=cfg), 150) / 1e3
                    plan = GM.plan_moe_routing(ids, ex, cfg.block_m)
                    c = cfg  # H % 16 == 0: _grouped_fp8 keeps TMA as asked
                    aq, a_s = GM._fp8_gate_up(xq, xs, plan, ex, c)
                    res["gate_up_ms"] = bench_us(lambda: GM._fp8_gate_up(xq, xs, plan, ex, c), 100) / 1e3
                    res["down_ms"] = bench_us(lambda: GM._fp8_down(aq, a_s, plan, ex, c, x.dtype), 100) / 1e3
                    gemm_ms = res["gate_up_ms"] + res["down_ms"]
                    res.update(gate_up_tflops=flops_gu / res["gate_up_ms"] / 1e9,
                               down_tflops=flops_dn / res["down_ms"] / 1e9, gemm_tflops=flops / gemm_ms / 1e9,
                               gemm_over_floor=gemm_ms / row["floor_ms"],
                               forward_over_floor=res["forward_ms"] / row["floor_ms"])
                    del plan, aq, a_s
                row["by_config"][name] = res
                print(f"[prefill] E={e} {name}: {res}", flush=True)
            except Exception as e_:  # noqa: BLE001
                failed(f"prefill E={e} {name}", e_)
        ok = {k: v for k, v in row["by_config"].items() if v.get("gemm_over_floor")}
        if ok:
            best = min(ok, key=lambda k: ok[k]["gemm_over_floor"])
            row["best_config"], row["best_gemm_over_floor"] = best, ok[best]["gemm_over_floor"]
        RESULTS["prefill"].append(row)
        del ex, xq, xs
        if not QUICK:
            torch.cuda.empty_cache()


def decode_bf16_sweep() -> None:
    gbs = RESULTS["ceilings"].get("copy_gbs", 4300.0)
    for e in EXPERTS:
        if out_of_time(f"decode_bf16_sweep E={e}"):
            return
        exb = experts_bf16(e)
        for t in SWEEP_T:
            x = torch.randn(t, H, device=DEV, dtype=torch.bfloat16)
            ids, w = routing(t, e)
            touched = int(torch.unique(ids).numel())
            ref = GM.grouped_moe_reference(x, ids, w, exb)
            row: dict = {"experts": e, "tokens": t, "floor_us": touched * expert_bytes("bf16") / gbs / 1e3,
                         "by_config": {}}
            for kw in [{}] + BF16_SWEEP:
                cfg = GM.MoEBf16Config(block_m=bf16_block_m(t, e), **kw)
                if out_of_time(f"decode_bf16_sweep E={e} T={t} {cfg}"):
                    break
                fn = (lambda c=cfg: GM.grouped_moe(x, ids, w, exb, config=c))
                try:
                    res = check(f"bf16 sweep E={e} T={t} {cfg}", fn(), ref)
                    if res["ok"]:
                        us = graph_us(fn) or bench_us(fn)
                        res.update(us=us, over_floor=us / row["floor_us"])
                    row["by_config"][str(cfg)] = res
                except Exception as e_:  # noqa: BLE001
                    failed(f"bf16 sweep E={e} T={t} {cfg}", e_)
            RESULTS["decode_bf16_sweep"].append(row)
            print(f"[decode_bf16_sweep] {row}", flush=True)
        del exb
        if not QUICK:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- report
def table() -> None:
    c = RESULTS["ceilings"]
    print(f"\n=== moe_kernels {RESULTS['device'].get('name')}: copy {c.get('copy_gbs', 0):.1f} GB/s, fp8 ceiling "
          f"{c.get('fp8_ceiling_tflops', 0):.0f} TFLOPS")
    print(f"{'decode (graph us)':22s} {'floor16':>8s} {'gmm':>8s} {'triton':>8s} {'floor8':>8s} {'fp8':>8s}  default")
    for r in RESULTS["decode"]:
        def g(k):
            return (r.get(k) or {}).get("graph_us") or (r.get(k) or {}).get("eager_us") or 0.0
        print(f"{'E=%d T=%d (%d touched)' % (r['experts'], r['tokens'], r['experts_touched']):22s} "
              f"{r['floor_bf16_us']:8.1f} {g('bf16_grouped_mm'):8.1f} {g('bf16_triton'):8.1f} {r['floor_fp8_us']:8.1f} "
              f"{g('fp8_triton'):8.1f}  {r['default_bf16_path']}")
    print(f"{'plan (us)':22s} {'torch':>8s} {'fused':>8s} {'torch g':>8s} {'fused g':>8s}")
    for r in RESULTS["plan"]:
        vals = [r.get(k) or 0.0 for k in ("torch_eager_us", "fused_eager_us", "torch_graph_us", "fused_graph_us")]
        print(f"{'E=%d T=%d' % (r['experts'], r['tokens']):22s} " + " ".join(f"{v:8.1f}" for v in vals))
    for r in RESULTS["launches"]:
        print(f"launches per forward E={r['experts']} T=1: {r}")
    for r in RESULTS["prefill"]:
        print(f"prefill E={r['experts']} T={r['tokens']}: floor {r['floor_ms']:.2f} ms")
        for name, v in sorted(r["by_config"].items(), key=lambda kv: kv[1].get("gemm_over_floor") or 1e9):
            print(f"  {v.get('gemm_over_floor') or 0:5.2f}x  gemm {v.get('gemm_tflops') or 0:6.0f} TFLOPS "
                  f"(gate_up {v.get('gate_up_ms') or 0:6.2f} ms, down {v.get('down_ms') or 0:6.2f} ms) "
                  f"fwd {v.get('forward_ms') or 0:6.2f} ms  err {v.get('rel_err', float('nan')):.1e}  {name}")
    for r in RESULTS["decode_bf16_sweep"]:
        print(f"bf16 sweep E={r['experts']} T={r['tokens']} floor {r['floor_us']:.1f} us")
        for name, v in sorted(r["by_config"].items(), key=lambda kv: kv[1].get("us") or 1e9):
            print(f"  {v.get('us') or 0:8.1f} us  {v.get('over_floor') or 0:5.2f}x  {name}")
    bad = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    print("checks:", "all OK" if not bad else f"FAILED: {bad}")
    if RESULTS["skipped"]:
        print("skipped (time budget):", RESULTS["skipped"])


def profile_once(n_experts: int = 32) -> None:
    """One gate_up and one down launch of the Gluon grouped GEMM, both persistent (the launchers' default), at the
    prefill shape (``n_experts``, 32 by default), nothing else: the target of ``ncu --kernel-name
    regex:_moe_fp8_gemm_hopper_kernel``."""
    from dsaserve.kernels import act_quant
    from dsaserve.kernels import moe_gemm_hopper as MH

    ex = experts_fp8(n_experts)
    ids, _ = routing(PREFILL_T, n_experts)
    xq, xs = act_quant(torch.randn(PREFILL_T, H, device=DEV, dtype=torch.bfloat16))
    plan = GM.plan_moe_routing(ids, ex, MH.BM)
    aq, a_s = MH.fp8_gate_up_hopper(xq, xs, plan, ex)
    MH.fp8_down_hopper(aq, a_s, plan, ex, torch.bfloat16)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write all results as JSON here (after every section)")
    ap.add_argument("--quick", action="store_true", help="toy sizes on the CPU under the Triton interpreter")
    ap.add_argument("--only", default="all", help="comma list: ceilings,decode,prefill,decode_bf16_sweep")
    ap.add_argument("--budget-s", type=float, default=85.0, help="skip what is left after this many seconds")
    ap.add_argument("--prefill-configs", type=int, default=None,
                    help="time only the first N prefill configs (the Triton default, the Gluon kernel, ...)")
    ap.add_argument("--profile-experts", type=int, default=32, help="the expert count of --profile-once")
    ap.add_argument("--profile-once", action="store_true",
                    help="for ncu: one gate_up and one down launch of the Gluon kernel at the prefill shape, nothing else")
    args = ap.parse_args()
    if args.profile_once:
        torch.manual_seed(0)
        profile_once(args.profile_experts)
        return
    if args.prefill_configs:
        del PREFILL_CONFIGS[args.prefill_configs:]
    if not (QUICK or torch.cuda.is_available()):
        sys.exit("benchmarks/moe_kernels.py needs a CUDA GPU (or --quick)")
    import triton

    DEADLINE[0] = time.time() + args.budget_s
    RESULTS["device"] = {"name": "cpu (quick)" if QUICK else torch.cuda.get_device_name(0),
                         "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
                         "hidden": H, "inter": I, "top_k": TOP_K}
    print(f"[device] {RESULTS['device']}", flush=True)
    torch.manual_seed(0)
    only = set(args.only.split(","))
    for name, fn in (("ceilings", ceilings), ("decode", decode), ("prefill", prefill),
                     ("decode_bf16_sweep", decode_bf16_sweep)):
        if "all" not in only and name not in only:
            continue
        t0 = time.time()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            failed(f"section {name}", e)
        RESULTS["section_s"][name] = time.time() - t0
        print(f"[section] {name} took {time.time() - t0:.1f} s", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(RESULTS, f, indent=1)
    table()


if __name__ == "__main__":
    main()
