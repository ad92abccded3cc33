"""GEMM benchmark: fp8 block-scaled linear and grouped MoE next to bf16, with the ceilings of the same run.

    PYTHONPATH=. python3 benchmarks/gemm.py --out $OUT/gemm.json

Sections (``--only``, comma list): ceilings (bf16 mm and tensorwise fp8 ``torch._scaled_mm`` at 8192^3,
device copy bandwidth), dense (q_b, o_proj, kv_b, expert shapes: bf16 ``mm``, torch blockwise
``F.scaled_mm`` GEMM only, ``fp8_linear`` with the activation quantization, the Triton fp8 GEMM), decode
(M = 1, 32, 256 against the weight-read floor), moe (65536 tokens x 8 routed over 32 and 256 experts,
7168 -> 2048: bf16 ``F.grouped_mm`` path and the Triton fp8 path, step by step, against the FLOP floor at
the fp8 ceiling; an expert-parallel eighth; the forward under ``torch.cuda.set_sync_debug_mode("error")``),
moe_decode (1, 32, 256 tokens over 256 experts, eager and CUDA-graph replay, against the weight-read
floor). Every variant's output is checked against the reference (on sampled rows) before it is timed.
TFLOPS = 2 M N K / time. Prints a table last; ``--out`` gets every number as JSON.

``--smoke`` runs every section at toy sizes on the CPU (Triton under its interpreter, wall-clock timing) so
the script itself can be checked without a GPU; its numbers mean nothing and CUDA-only variants fail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

from dsaserve.kernels.block_fp8 import dequantize_block_fp8
from dsaserve.kernels import act_quant
from dsaserve.kernels._common import device_sm_count
from dsaserve.kernels import fp8_linear as FL
from dsaserve.kernels import grouped_moe as GM

if SMOKE:
    import tests.kernels.conftest  # noqa: F401  (the interpreter fix the kernel tests use)

RESULTS: dict = {"device": {}, "ceilings": {}, "checks": [], "dense": [], "decode": [], "moe": [],
                 "moe_decode": [], "probes": {}}
DENSE_SHAPES = {"q_b": (16384, 1536, 24576), "o_proj": (16384, 16384, 7168), "kv_b": (16384, 512, 32768),
                "expert": (4096, 7168, 4096)}  # M x K x N
# candidates (run 1 of 2026-12-02 swept pointer vs TMA loads and 3 vs 4 stages: TMA 128x128 w8 s4 won);
# the 64-row tiles with 4 warps fit two CTAs per SM, so one CTA's scale promotion can overlap the other's MMA
TRITON_CONFIGS = [FL.Fp8GemmConfig(128, 128, 8, 4, tma=True), FL.Fp8GemmConfig(64, 128, 4, 4, tma=True)]
MOE_CONFIGS = [GM.MoEGemmConfig(), GM.MoEGemmConfig(warps_gate_up=4, stages_gate_up=2)]
MOE_T, MOE_K, MOE_H, MOE_I = 65536, 8, 7168, 2048
MOE_EXPERTS = (32, 256)
DEV = "cuda"
if SMOKE:
    DENSE_SHAPES = {"q_b": (40, 256, 96), "o_proj": (24, 1024, 64), "kv_b": (16, 128, 160), "expert": (8, 256, 128)}
    TRITON_CONFIGS = TRITON_CONFIGS[:2]
    MOE_CONFIGS = MOE_CONFIGS[:2]
    MOE_T, MOE_H, MOE_I, MOE_EXPERTS, DEV = 48, 256, 128, (8, 16), "cpu"


def bench(fn, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() over CUDA-event-timed repeats (triton.testing.do_bench, L2 flushed)."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(name: str, ok: bool, detail: str) -> bool:
    RESULTS["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
    print(f"[check] {'OK  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def fp8_rand(*shape, dev=None):
    """Random e4m3 values (a normal draw rounded to e4m3), made in chunks so fp32 temporaries stay small."""
    dev = dev or DEV
    out = torch.empty(shape, dtype=torch.float8_e4m3fn, device=dev)
    flat = out.view(-1)
    step = 1 << 28
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        flat[i:i + n] = torch.randn(n, device=dev).to(torch.float8_e4m3fn)
    return out


def block_scales(*shape):
    return torch.rand(*shape, device=DEV) * 2e-3 + 1e-3


# ----------------------------------------------------------------------------------------------- ceilings
def ceilings():
    n = 256 if SMOKE else 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.ones((), device=DEV)
    bf16_ms = bench(lambda: a @ b)
    if SMOKE:
        RESULTS["ceilings"] = {"bf16_mm_tflops": 2 * n**3 / bf16_ms / 1e9}
        return
    fp8 = 2 * n**3 / bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)) / 1e9
    fp8_fast = 2 * n**3 / bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16,
                                                         use_fast_accum=True)) / 1e9
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    gbs = 2 * x.numel() / bench(lambda: x.clone()) / 1e6
    bf16 = 2 * n**3 / bf16_ms / 1e9
    RESULTS["ceilings"] = {"bf16_mm_tflops": bf16, "fp8_tensorwise_tflops": fp8,
                           "fp8_tensorwise_fast_accum_tflops": fp8_fast, "fp8_ceiling_tflops": max(fp8, fp8_fast),
                           "copy_gbs": gbs}
    print(f"[ceiling] bf16 {bf16:.0f} TFLOPS, fp8 tensorwise {fp8:.0f} (fast accum {fp8_fast:.0f}), "
          f"copy {gbs:.0f} GB/s", flush=True)


def _ceil(key: str, default: float) -> float:
    return RESULTS["ceilings"].get(key, default)


# ----------------------------------------------------------------------------------------------- dense
def _dense_inputs(m, k, n):
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    wq = fp8_rand(n, k)
    ws = block_scales(FL._cdiv(n, 128), FL._cdiv(k, 128))
    return x, wq, ws, FL.prepare_fp8_weight(wq, ws)


def _check_linear(name, y_rows, x_rows, wq, ws) -> bool:
    """Against the reference contract, and the statistical error bound against the exact product."""
    ref = FL.fp8_linear_reference(x_rows, wq, ws, torch.float32)
    err = rel_err(y_rows, ref)
    err_same = rel_err(y_rows, ref.to(y_rows.dtype))
    exact = x_rows.float() @ dequantize_block_fp8(wq, ws).t()
    bound = FL.fp8_linear_error_bound(x_rows, wq, ws, y_rows.dtype, sigmas=6.0)
    used = float(((y_rows.float() - exact).abs() / bound).max())
    # 5e-3: the bf16 output rounding alone is ~1.3e-3 RMS against the fp32 reference, plus Hopper's
    # reduced-precision fp8 MMA accumulation between the 128-wide promotions; a wrong tile, scale or
    # layout gives O(1) errors. Elementwise: the statistical error bound against the exact product.
    return check(name, err < 5e-3 and used <= 1.0 and not torch.isnan(y_rows).any(),
                 f"rel_err vs fp32 reference {err:.2e} (vs the reference in {y_rows.dtype}: {err_same:.2e}); "
                 f"max |err| / statistical bound {used:.2f}")


def dense():
    for name, (m, k, n) in DENSE_SHAPES.items():
        x, wq, ws, p = _dense_inputs(m, k, n)
        rows = torch.randperm(m, device=DEV)[:64]
        flops = 2 * m * n * k
        row: dict = {"shape": name, "M": m, "K": k, "N": n}
        w_bf16 = dequantize_block_fp8(wq, ws).to(torch.bfloat16)
        yb = x @ w_bf16.t()
        eb = rel_err(yb[rows], x[rows].float() @ w_bf16.float().t())
        if check(f"dense {name} bf16 mm", eb < 1e-2, f"rel_err vs fp32 {eb:.2e}"):
            row["bf16_mm_tflops"] = flops / bench(lambda: x @ w_bf16.t()) / 1e9
        del yb, w_bf16
        try:
            y = FL.fp8_linear_prepared(x, p, backend="cublas")
            if _check_linear(f"dense {name} fp8_linear cublas", y[rows], x[rows], wq, ws):
                xq, xs = act_quant(x)
                xs_cm = xs.t().contiguous().t()

                def gemm():
                    return F.scaled_mm(xq, p.weight.t(), xs_cm, F.ScalingType.BlockWise1x128, p.scale.t(),
                                       F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)

                row["scaled_mm_tflops"] = flops / bench(gemm) / 1e9
                row["fp8_linear_cublas_tflops"] = flops / bench(lambda: FL.fp8_linear_prepared(
                    x, p, backend="cublas")) / 1e9
        except Exception as e:  # noqa: BLE001 - record and go on
            check(f"dense {name} fp8_linear cublas", False, f"{type(e).__name__}: {str(e)[:300]}")
        xq, xs = act_quant(x)
        best = None
        for cfg in TRITON_CONFIGS:
            try:
                y = FL.fp8_gemm_triton(xq, xs, p, torch.bfloat16, cfg)
                if _check_linear(f"dense {name} triton {cfg}", y[rows], x[rows], wq, ws):
                    tf = flops / bench(lambda: FL.fp8_gemm_triton(xq, xs, p, torch.bfloat16, cfg)) / 1e9
                    row.setdefault("triton_tflops_by_config", {})[str(cfg)] = tf
                    if best is None or tf > best[0]:
                        best = (tf, str(cfg))
            except Exception as e:  # noqa: BLE001
                check(f"dense {name} triton {cfg}", False, f"{type(e).__name__}: {str(e)[:300]}")
        if best:
            row["triton_tflops"], row["triton_config"] = best
        aq_ms = bench(lambda: act_quant(x))
        row["act_quant_ms"] = aq_ms
        RESULTS["dense"].append(row)
        print(f"[dense] {row}", flush=True)
        del x, wq, ws, p, xq, xs
        torch.cuda.empty_cache()


def decode():
    gbs = _ceil("copy_gbs", 4300.0)
    for name in ("o_proj", "expert"):
        _, k, n = DENSE_SHAPES[name]
        _, wq, ws, p = _dense_inputs(1, k, n)
        w_bf16 = dequantize_block_fp8(wq, ws).to(torch.bfloat16)
        for m in (1, 32, 128, 256) if not SMOKE else (1, 20):
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            row: dict = {"shape": name, "M": m, "K": k, "N": n,
                         "floor_fp8_us": (n * k + m * k * 2 + m * n * 2) / gbs / 1e3,
                         "floor_bf16_us": (n * k * 2 + m * k * 2 + m * n * 2) / gbs / 1e3,
                         "bf16_mm_us": bench(lambda: x @ w_bf16.t()) * 1e3}
            cfg = FL.default_gemm_config(m)
            row["triton_config"] = str(cfg)
            row["triton_split_k"] = FL.choose_split_k(m, n, k, cfg, device_sm_count(x.device))
            for backend in ("cublas", "triton"):
                try:
                    y = FL.fp8_linear_prepared(x, p, backend=backend)
                    if _check_linear(f"decode {name} M={m} {backend}", y, x, wq, ws):
                        row[f"fp8_linear_{backend}_us"] = bench(
                            lambda: FL.fp8_linear_prepared(x, p, backend=backend)) * 1e3
                except Exception as e:  # noqa: BLE001
                    check(f"decode {name} M={m} {backend}", False, f"{type(e).__name__}: {str(e)[:300]}")
            RESULTS["decode"].append(row)
            print(f"[decode] {row}", flush=True)
        del wq, ws, p, w_bf16
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- MoE
def _experts_bf16(e, local):
    wgu = torch.randn(len(local), 2 * MOE_I, MOE_H, device=DEV, dtype=torch.bfloat16).mul_(0.02)
    wd = torch.randn(len(local), MOE_H, MOE_I, device=DEV, dtype=torch.bfloat16).mul_(0.02)
    return GM.prepare_local_experts(wgu, wd, local, e)


def _experts_fp8(e, local):
    """Random fp8 experts straight in the prepared layout (I = 2048 needs no padding)."""
    n = len(local)
    _, m = GM._expert_map(local, e, DEV)
    return GM.LocalExperts(e, tuple(local), m, MOE_H, MOE_I,
                           w13=fp8_rand(n, 2 * MOE_I, MOE_H), s13=block_scales(n, 2 * MOE_I // 128, MOE_H // 128),
                           w2=fp8_rand(n, MOE_H, MOE_I), s2=block_scales(n, MOE_H // 128, MOE_I // 128))


def _routing(t, e, k=MOE_K):
    ids = torch.rand(t, e, device=DEV).topk(k, dim=1).indices
    return ids, torch.rand(t, k, device=DEV) + 0.1


def _check_moe(name, x, ids, w, ex, out, n_sample=24) -> bool:
    rows = torch.randperm(x.shape[0], device=DEV)[:n_sample]
    ref = GM.grouped_moe_reference(x[rows], ids[rows], w[rows], ex)
    err = rel_err(out[rows], ref)
    # bf16: other GEMM kernels round h and y to bf16 at other points; fp8: also the reduced-precision MMA
    # accumulation; a wrong tile, expert or scale gives O(1)
    return check(name, err < 1e-2 and not torch.isnan(out).any(), f"rel_err vs per-expert reference {err:.2e}")


def _sync_free(name, fn) -> None:
    if SMOKE:
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        ok, detail = True, "no host sync under set_sync_debug_mode('error')"
    except Exception as e:  # noqa: BLE001
        ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    check(f"sync-free {name}", ok, detail)


def _moe_flops(n_assign: int) -> float:
    return 2.0 * n_assign * (MOE_H * 2 * MOE_I + MOE_I * MOE_H)


def moe():
    fp8_ceiling = _ceil("fp8_ceiling_tflops", 1300.0)
    bf16_ceiling = _ceil("bf16_mm_tflops", 780.0)
    x = torch.randn(MOE_T, MOE_H, device=DEV, dtype=torch.bfloat16)
    for e in MOE_EXPERTS:
        ids, w = _routing(MOE_T, e)
        flops = _moe_flops(MOE_T * MOE_K)
        row: dict = {"experts": e, "tokens": MOE_T, "top_k": MOE_K, "hidden": MOE_H, "inter": MOE_I,
                     "floor_fp8_ms": flops / fp8_ceiling / 1e9, "floor_bf16_ms": flops / bf16_ceiling / 1e9}
        # bf16: F.grouped_mm
        ex = _experts_bf16(e, list(range(e)))
        out = GM.grouped_moe(x, ids, w, ex)
        if _check_moe(f"moe E={e} bf16", x, ids, w, ex, out):
            _sync_free(f"moe E={e} bf16", lambda: GM.grouped_moe(x, ids, w, ex))
            row["bf16_ms"] = bench(lambda: GM.grouped_moe(x, ids, w, ex), 400)
            plan = GM.plan_moe_routing(ids, ex)
            xs = GM._gather_rows(x, plan)
            hg = GM._grouped_mm(xs, ex.w_gate_up.transpose(1, 2), offs=plan.expert_ends)
            a = GM._silu_mul(hg, plan)
            y = GM._grouped_mm(a, ex.w_down.transpose(1, 2), offs=plan.expert_ends)
            row["bf16_steps_ms"] = {
                "plan": bench(lambda: GM.plan_moe_routing(ids, ex)),
                "gather": bench(lambda: GM._gather_rows(x, plan)),
                "gate_up": bench(lambda: GM._grouped_mm(xs, ex.w_gate_up.transpose(1, 2), offs=plan.expert_ends)),
                "silu_mul": bench(lambda: GM._silu_mul(hg, plan)),
                "down": bench(lambda: GM._grouped_mm(a, ex.w_down.transpose(1, 2), offs=plan.expert_ends)),
                "combine": bench(lambda: GM._combine(y, plan, w, x.dtype)),
            }
            st = row["bf16_steps_ms"]
            row["bf16_gemm_tflops"] = flops / (st["gate_up"] + st["down"]) / 1e9
            del plan, xs, hg, a, y
        del ex, out
        torch.cuda.empty_cache()
        # fp8: the Triton grouped GEMMs
        ex = _experts_fp8(e, list(range(e)))
        best = None
        for cfg in MOE_CONFIGS:
            try:
                out = GM.grouped_moe(x, ids, w, ex, config=cfg)
                if not _check_moe(f"moe E={e} fp8 {cfg}", x, ids, w, ex, out):
                    continue
                ms = bench(lambda: GM.grouped_moe(x, ids, w, ex, config=cfg), 400)
                plan = GM.plan_moe_routing(ids, ex, cfg.block_m)
                xq, xsc = act_quant(x)
                aq, a_s = GM._fp8_gate_up(xq, xsc, plan, ex, cfg)
                y = GM._fp8_down(aq, a_s, plan, ex, cfg, x.dtype)
                steps = {"plan": bench(lambda: GM.plan_moe_routing(ids, ex, cfg.block_m)),
                         "act_quant": bench(lambda: act_quant(x)),
                         "gate_up_silu_quant": bench(lambda: GM._fp8_gate_up(xq, xsc, plan, ex, cfg), 200),
                         "down": bench(lambda: GM._fp8_down(aq, a_s, plan, ex, cfg, x.dtype), 200),
                         "combine": bench(lambda: GM._combine(y, plan, w, x.dtype))}
                res = {"ms": ms, "steps_ms": steps,
                       "gate_up_tflops": 2 * MOE_T * MOE_K * MOE_H * 2 * MOE_I / steps["gate_up_silu_quant"] / 1e9,
                       "down_tflops": 2 * MOE_T * MOE_K * MOE_I * MOE_H / steps["down"] / 1e9}
                row.setdefault("fp8_by_config", {})[str(cfg)] = res
                print(f"[moe] E={e} fp8 {cfg}: {res}", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, str(cfg), cfg)
                del plan, xq, xsc, aq, a_s, y, out
            except Exception as ex_:  # noqa: BLE001
                traceback.print_exc()
                check(f"moe E={e} fp8 {cfg}", False, f"{type(ex_).__name__}: {str(ex_)[:300]}")
        if best:
            row["fp8_ms"], row["fp8_config"] = best[0], best[1]
            row["fp8_over_floor"] = best[0] / row["floor_fp8_ms"]
            _sync_free(f"moe E={e} fp8", lambda: GM.grouped_moe(x, ids, w, ex, config=best[2]))
            if e == MOE_EXPERTS[-1]:  # expert parallelism: this rank owns 1/8 of the experts (and the work)
                n8 = e // 8
                ep = GM.LocalExperts(e, tuple(range(n8)), GM._expert_map(range(n8), e, DEV)[1], MOE_H, MOE_I,
                                     w13=ex.w13[:n8], s13=ex.s13[:n8], w2=ex.w2[:n8], s2=ex.s2[:n8])
                out = GM.grouped_moe(x, ids, w, ep, config=best[2])
                if _check_moe(f"moe E={e} fp8 expert-parallel {n8} local", x, ids, w, ep, out):
                    row["fp8_ep_eighth_ms"] = bench(lambda: GM.grouped_moe(x, ids, w, ep, config=best[2]), 200)
                del ep, out
        if row.get("bf16_ms"):
            row["bf16_over_floor_bf16"] = row["bf16_ms"] / row["floor_bf16_ms"]
        RESULTS["moe"].append(row)
        print(f"[moe] {row}", flush=True)
        del ex
        torch.cuda.empty_cache()


def moe_decode():
    gbs = _ceil("copy_gbs", 4300.0)
    e = MOE_EXPERTS[-1]
    expert_bytes = {"fp8": 3 * MOE_H * MOE_I, "bf16": 3 * MOE_H * MOE_I * 2}
    for kind in ("fp8", "bf16"):
        ex = _experts_fp8(e, list(range(e))) if kind == "fp8" else _experts_bf16(e, list(range(e)))
        for t in (1, 32, 256) if not SMOKE else (1, 4):
            x = torch.randn(t, MOE_H, device=DEV, dtype=torch.bfloat16)
            ids, w = _routing(t, e)
            touched = int(torch.unique(ids).numel())
            row = {"kind": kind, "experts": e, "tokens": t, "experts_touched": touched,
                   "floor_us": touched * expert_bytes[kind] / gbs / 1e3}
            out = GM.grouped_moe(x, ids, w, ex)
            if _check_moe(f"moe decode {kind} T={t}", x, ids, w, ex, out, n_sample=t):
                row["eager_us"] = bench(lambda: GM.grouped_moe(x, ids, w, ex)) * 1e3
                try:
                    if SMOKE:
                        raise RuntimeError("no CUDA graphs in --smoke")
                    g = torch.cuda.CUDAGraph()
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(2):
                            GM.grouped_moe(x, ids, w, ex)
                    torch.cuda.current_stream().wait_stream(side)
                    with torch.cuda.graph(g):
                        out_g = GM.grouped_moe(x, ids, w, ex)
                    g.replay()
                    torch.cuda.synchronize()
                    check(f"moe decode {kind} T={t} graph replay", torch.equal(out_g, out), "equal to eager")
                    row["graph_us"] = bench(g.replay) * 1e3
                except Exception as e_:  # noqa: BLE001
                    check(f"moe decode {kind} T={t} graph", False, f"{type(e_).__name__}: {str(e_)[:300]}")
                if kind == "fp8" and t == 1:  # where the time goes at batch 1 (each step timed alone, eager)
                    cfg = GM.default_moe_config(t, MOE_K, e)
                    plan = GM.plan_moe_routing(ids, ex, cfg.block_m)
                    xq, xsc = act_quant(x)
                    aq, a_s = GM._fp8_gate_up(xq, xsc, plan, ex, cfg)
                    y = GM._fp8_down(aq, a_s, plan, ex, cfg, x.dtype)
                    row["steps_us"] = {
                        "plan": bench(lambda: GM.plan_moe_routing(ids, ex, cfg.block_m)) * 1e3,
                        "act_quant": bench(lambda: act_quant(x)) * 1e3,
                        "gate_up_silu_quant": bench(lambda: GM._fp8_gate_up(xq, xsc, plan, ex, cfg)) * 1e3,
                        "down": bench(lambda: GM._fp8_down(aq, a_s, plan, ex, cfg, x.dtype)) * 1e3,
                        "combine": bench(lambda: GM._combine(y, plan, w, x.dtype)) * 1e3}
            RESULTS["moe_decode"].append(row)
            print(f"[moe_decode] {row}", flush=True)
        del ex
        torch.cuda.empty_cache()


def probes():
    """What torch's grouped fp8 GEMM takes: DeepSeek's block scales (1x128 x 128x128) or not."""
    g, m, k, n = 2, 256, 256, 256
    a = torch.randn(m, k, device=DEV).to(torch.float8_e4m3fn)
    b = torch.randn(g, n, k, device=DEV).to(torch.float8_e4m3fn).transpose(1, 2)
    offs = torch.tensor([128, 256], device=DEV, dtype=torch.int32)
    sa = torch.rand(k // 128, m, device=DEV).t()
    sb = torch.rand(g, n // 128, 4, device=DEV).transpose(1, 2)
    try:
        F.scaled_grouped_mm(a, b, sa, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
                            offs=offs, output_dtype=torch.bfloat16)
        res = "accepted"
    except Exception as e:  # noqa: BLE001
        res = f"{type(e).__name__}: {str(e)[:400]}"
    RESULTS["probes"]["scaled_grouped_mm_blockwise"] = res
    print(f"[probe] F.scaled_grouped_mm 1x128 x 128x128: {res}", flush=True)


# ----------------------------------------------------------------------------------------------- report
def table() -> None:
    c = RESULTS["ceilings"]
    d = RESULTS["device"]
    print(f"\n=== gemm: {d.get('name')} {d.get('date')} torch {d.get('torch')} triton {d.get('triton')} | "
          f"ceilings: bf16 {c.get('bf16_mm_tflops', 0):.0f}, fp8 {c.get('fp8_ceiling_tflops', 0):.0f} TFLOPS, "
          f"copy {c.get('copy_gbs', 0):.0f} GB/s")
    print(f"{'dense MxKxN':30s} {'bf16 mm':>8s} {'scaled_mm':>9s} {'fp8_lin':>8s} {'triton':>8s}  TFLOPS")
    for r in RESULTS["dense"]:
        print(f"{r['shape'] + ' ' + str(r['M']) + 'x' + str(r['K']) + 'x' + str(r['N']):30s} "
              f"{r.get('bf16_mm_tflops', 0):8.0f} {r.get('scaled_mm_tflops', 0):9.0f} "
              f"{r.get('fp8_linear_cublas_tflops', 0):8.0f} {r.get('triton_tflops', 0):8.0f}")
    print(f"{'decode (us)':30s} {'floor8':>8s} {'bf16 mm':>8s} {'cublas':>8s} {'triton':>8s}")
    for r in RESULTS["decode"]:
        print(f"{r['shape'] + ' M=' + str(r['M']):30s} {r['floor_fp8_us']:8.1f} {r['bf16_mm_us']:8.1f} "
              f"{r.get('fp8_linear_cublas_us', 0):8.1f} {r.get('fp8_linear_triton_us', 0):8.1f}")
    print(f"{'moe 64K x 8 (ms)':30s} {'floor8':>8s} {'fp8':>8s} {'x floor':>8s} {'bf16':>8s} {'ep 1/8':>8s}")
    for r in RESULTS["moe"]:
        print(f"{'E=' + str(r['experts']):30s} {r['floor_fp8_ms']:8.1f} {r.get('fp8_ms', 0):8.1f} "
              f"{r.get('fp8_over_floor', 0):8.2f} {r.get('bf16_ms', 0):8.1f} {r.get('fp8_ep_eighth_ms', 0):8.1f}")
    print(f"{'moe decode ' + str(MOE_EXPERTS[-1]) + 'E (us)':30s} {'floor':>8s} {'eager':>8s} {'graph':>8s}")
    for r in RESULTS["moe_decode"]:
        print(f"{r['kind'] + ' T=' + str(r['tokens']):30s} {r['floor_us']:8.1f} {r.get('eager_us', 0):8.1f} "
              f"{r.get('graph_us', 0):8.1f}")
    bad = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    print("checks:", "all OK" if not bad else f"FAILED: {bad}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (checks the script, no numbers)")
    ap.add_argument("--only", default="all",
                    help="comma list of sections: ceilings,dense,decode,moe,moe_decode,probes (default all)")
    args = ap.parse_args()
    if not (SMOKE or torch.cuda.is_available()):
        sys.exit("benchmarks/gemm.py needs a CUDA GPU (or --smoke)")
    import triton

    RESULTS["device"] = {"name": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(0), "torch": torch.__version__,
                         "triton": triton.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d")}
    print(f"[device] {RESULTS['device']}", flush=True)
    torch.manual_seed(0)
    only = set(args.only.split(","))
    sections = [("ceilings", ceilings), ("probes", probes), ("dense", dense), ("decode", decode), ("moe", moe),
                ("moe_decode", moe_decode)]
    for name, fn in sections:
        if "all" not in only and name not in only:
            continue
        t0 = time.time()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on: one broken section must not hide the others
            traceback.print_exc()
            check(f"section {name}", False, f"{type(e).__name__}: {str(e)[:300]}")
        RESULTS.setdefault("section_s", {})[name] = time.time() - t0
        print(f"[section] {name} took {time.time() - t0:.1f} s", flush=True)
        torch.cuda.empty_cache()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(RESULTS, f, indent=1)
    table()


if __name__ == "__main__":
    main()
