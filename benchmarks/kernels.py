"""Kernel benchmark: correctness of every variant on fresh random inputs, then timings and a small tile sweep
per kernel, next to the bf16 / fp8 matmul ceilings measured in the same process. One device call:

    PYTHONPATH=. python3 benchmarks/kernels.py --out $OUT/kernels.json

Sections (``--only``): ceilings, check, logits, topk, mla, quant. Each timed variant is checked against the
PyTorch reference on sampled rows before it is timed; a variant that fails to compile or to check is
reported and skipped. The best variant per kernel is reported; the table printed last is the summary.

Throughput: mqa_logits counts 2 * valid (query, key) pairs * H * D; sparse MLA counts
2 * valid (query, key) pairs * heads * (576 + 512) (QK^T over all 576 dims, PV over 512). Times are
``triton.testing.do_bench`` medians. The fused top-k section also reports peak memory
(``torch.cuda.max_memory_allocated`` above the inputs) of one indexer step, fused vs mqa_logits + top-k.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback

import torch

from dsaserve import kernels as K
from dsaserve.kernels import reference as R
from dsaserve.kernels.indexer_logits import LogitsConfig
from dsaserve.kernels.indexer_logits_hopper import LogitsHopperConfig
from dsaserve.kernels.indexer_topk import TopkConfig
from dsaserve.kernels.threshold_topk import ThresholdTopkConfig
from dsaserve.kernels.sparse_attention import SparseMLAConfig

RESULTS: dict = {"correctness": [], "timing": [], "best": {}, "memory": [], "ceilings": {}}
BEST_CONFIGS: dict = {}  # kernel -> the fastest config object of this run
REP_MS = 150


def bench(fn, rep_ms: int | None = None) -> float:
    """Median milliseconds of fn() (triton.testing.do_bench: CUDA events, L2 flushed between runs)."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms or REP_MS, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def record_check(name: str, ok: bool, detail: str) -> bool:
    RESULTS["correctness"].append({"name": name, "ok": bool(ok), "detail": detail})
    print(f"[check] {'OK  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return bool(ok)


def record_time(op: str, variant: str, ms: float, **extra) -> None:
    RESULTS["timing"].append({"op": op, "variant": variant, "ms": ms, **extra})
    tf = f" {extra['tflops']:.0f} TFLOPS" if "tflops" in extra else ""
    print(f"[time] {op} [{variant}]: {ms:.3f} ms{tf}", flush=True)


def try_compile(name: str, fn):
    """Run fn once (compiles); None and a report if it fails (e.g. a tile that needs too much shared memory)."""
    try:
        out = fn()
        torch.cuda.synchronize()
        return out
    except Exception as e:  # a variant that does not build is reported, not fatal
        print(f"[skip] {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        RESULTS["correctness"].append({"name": name, "ok": None, "detail": f"skipped: {type(e).__name__}"})
        return None


# ----------------------------------------------------------------------------------------------- inputs
def logits_inputs(s: int, skv: int, h: int, d: int, causal_end: bool, seed: int, dev="cuda"):
    """Indexer inputs; causal_end: the S queries are the last S positions of an Skv-token prefix."""
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(s, h, d, device=dev, generator=g).to(torch.float8_e4m3fn)
    k = torch.randn(skv, d, device=dev, generator=g).to(torch.float8_e4m3fn)
    ksc = torch.rand(skv, device=dev, generator=g) * 0.02 + 0.01
    w = torch.randn(s, h, device=dev, generator=g) * 0.1
    if causal_end:
        ks = torch.zeros(s, dtype=torch.int32, device=dev)
        ke = torch.arange(skv - s, skv, device=dev, dtype=torch.int32) + 1
    else:  # ragged: random ranges, some empty
        ks = torch.randint(0, skv, (s,), device=dev, generator=g, dtype=torch.int32)
        ke = torch.randint(0, skv + 1, (s,), device=dev, generator=g, dtype=torch.int32)
    return q, k, ksc, w, ks, ke


def valid_pairs(ks, ke) -> int:
    return int((ke.long() - ks.long()).clamp_min(0).sum())


def check_logits_rows(name, out, q, k, ksc, w, ks, ke, n_rows=48, seed=0) -> bool:
    g = torch.Generator(device=q.device).manual_seed(seed)
    rows = torch.randperm(q.shape[0], device=q.device, generator=g)[:n_rows]
    ref = R.mqa_logits(q[rows], k, ksc, w[rows], ks[rows], ke[rows], chunk=16)
    got = out[rows]
    inf = torch.isinf(ref)
    ok_inf = torch.equal(torch.isinf(got), inf)
    err = rel_err(got[~inf], ref[~inf]) if (~inf).any() else 0.0
    # 1e-3: Hopper's fp8 MMA accumulates with reduced precision (~1e-4 relative seen) while the reference
    # sums exactly in fp32; a wrong tile, mask or scale shows up as O(1) errors
    return record_check(name, ok_inf and err < 1e-3 and not torch.isnan(got).any(),
                        f"rel_err={err:.2e} inf_pattern_ok={ok_inf}")


def topk_agreement(a: torch.Tensor, b: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> dict:
    """Per sampled row: identical index sets, and identical multisets of selected logit values (the sets may
    differ only between columns whose logits tie at the k-th value)."""
    same_set = same_vals = 0
    for i in rows.tolist():
        x, y = a[i][a[i] >= 0].long(), b[i][b[i] >= 0].long()
        same_set += int(torch.equal(torch.sort(x).values, torch.sort(y).values))
        same_vals += int(x.numel() == y.numel()
                         and torch.equal(torch.sort(logits[i, x]).values, torch.sort(logits[i, y]).values))
    n = rows.numel()
    return {"rows": n, "same_set": same_set / n, "same_values": same_vals / n}


# ----------------------------------------------------------------------------------------------- sections
def ceilings():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * n**3 / bench(lambda: a @ b) / 1e9
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()  # B column-major
    one = torch.ones((), device="cuda")
    fp8 = 2 * n**3 / bench(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) / 1e9
    RESULTS["ceilings"] = {"bf16_matmul_tflops": bf16, "fp8_scaled_mm_tflops": fp8, "size": n}
    print(f"[ceiling] bf16 matmul {n}^3: {bf16:.0f} TFLOPS; fp8 _scaled_mm {n}^3: {fp8:.0f} TFLOPS", flush=True)


def check_small():
    """Correctness of every public op and variant on fresh random inputs (real and tiny geometries)."""
    for ue in (False, True):
        x = torch.randn(4096, 7168, device="cuda") * torch.rand(4096, 1, device="cuda") * 10
        y, s = K.act_quant(x, ue8m0=ue)
        ry, rs = R.act_quant(x, ue8m0=ue)
        ok = torch.equal(s, rs) and torch.equal(y.view(torch.uint8), ry.view(torch.uint8))
        record_check(f"act_quant ue8m0={ue} [4096,7168]", ok, "bitwise" if ok else f"scale_eq={torch.equal(s, rs)}")
    for (s, skv, h, d) in [(1000, 3000, 64, 128), (333, 1000, 32, 128), (129, 700, 16, 64)]:
        ins = logits_inputs(s, skv, h, d, False, seed=s)
        check_logits_rows(f"mqa_logits ragged S={s} Skv={skv} H={h} D={d}", K.mqa_logits(*ins), *ins, n_rows=s)
    ins = logits_inputs(300, 2000, 64, 128, True, 3)
    check_logits_rows("mqa_logits causal num_sms=17", K.mqa_logits(*ins, num_sms=17), *ins, n_rows=300)
    # paged decode
    g = torch.Generator(device="cuda").manual_seed(5)
    b, h, d, maxp = 24, 64, 128, 40
    q = torch.randn(b, h, d, device="cuda", generator=g).to(torch.float8_e4m3fn)
    kc = torch.randn(b * maxp + 3, 64, d, device="cuda", generator=g).to(torch.float8_e4m3fn)
    ksc = torch.rand(b * maxp + 3, 64, device="cuda", generator=g) + 0.5
    w = torch.randn(b, h, device="cuda", generator=g)
    lens = torch.randint(0, maxp * 64 + 1, (b,), device="cuda", generator=g, dtype=torch.int32)
    bt = torch.randperm(b * maxp + 3, device="cuda", generator=g)[: b * maxp].view(b, maxp).int()
    out = K.paged_mqa_logits(q, kc, ksc, w, lens, bt)
    ref = R.paged_mqa_logits(q, kc, ksc, w, lens, bt)
    inf = torch.isinf(ref)
    err = rel_err(out[~inf], ref[~inf])
    record_check("paged_mqa_logits B=24 H=64 D=128", torch.equal(torch.isinf(out), inf) and err < 1e-3,
                 f"rel_err={err:.2e}")
    # fused top-k against the reference rule on the kernel's own logits (ragged rows, short rows, k > row)
    for (s, skv, h, kk) in [(300, 5000, 64, 2048), (257, 3000, 32, 512), (64, 900, 64, 1000)]:
        ins = logits_inputs(s, skv, h, 128, False, seed=7 * s)
        fused = K.mqa_topk_indices(*ins, k=kk, offset=5)
        logits = K.mqa_logits(*ins)  # default tiles of both: the same tile math, bit-identical logits
        cols = torch.arange(skv, device="cuda")
        valid = (cols[None, :] >= ins[4][:, None]) & (cols[None, :] < ins[5][:, None])
        want = R.select_topk_ordered(logits, valid, kk)
        want = torch.where(want >= 0, want + 5, -1).to(torch.int32)
        same = torch.equal(torch.sort(fused, 1).values, torch.sort(want, 1).values)
        record_check(f"mqa_topk_indices fused S={s} Skv={skv} H={h} k={kk} ragged", same,
                     "exact sets vs select_topk_ordered(kernel logits)")
    # sparse MLA: real geometry (128 / 64 heads, 512 + 64, top-k 2048, ragged -1 lists) and tiny (16 + 64 + 16)
    for (t, hh, dv, dr, slots, topk) in [(96, 128, 512, 64, 8192, 2048), (8, 128, 512, 64, 8192, 2048),
                                         (40, 64, 512, 64, 8192, 2048), (37, 16, 64, 16, 500, 100)]:
        q = torch.randn(t, hh, dv + dr, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(slots, dv + dr, device="cuda", dtype=torch.bfloat16)
        idx = torch.randint(-1, slots, (t, topk), device="cuda", dtype=torch.int32)
        idx[0] = -1  # a row with no valid key
        idx[1, 5:] = -1  # a short list
        idx[2, topk // 2:] = -1  # -1 padding from the middle on
        scale = (dv + dr) ** -0.5
        rout, rlse = R.sparse_mla(q.float(), kv.float(), idx, scale, d_v=dv, chunk=8)
        variants = [None]
        if dv >= 256:
            variants.append(SparseMLAConfig(min(128, hh), 32, 8, 3, v_split=2))
        for cfg in variants:
            res = try_compile(f"sparse_mla {cfg}", lambda: K.sparse_mla(q, kv, idx, scale, d_v=dv, config=cfg))
            if res is None:
                continue
            out, lse = res
            err = rel_err(out, rout)
            fin = torch.isfinite(rlse)
            lerr = float((lse[fin] - rlse[fin]).abs().max())
            ok = err < 1e-2 and lerr < 1e-2 and torch.equal(torch.isfinite(lse), fin) and bool((out[0] == 0).all())
            record_check(f"sparse_mla t={t} h={hh} dqk={dv + dr} topk={topk} {cfg or 'default'}", ok,
                         f"rel_err={err:.2e} lse_maxabs={lerr:.1e}")


LOGITS_CONFIGS = {  # (bq, bk, warps, stages, CTAs/SM); H=64 first entry = today's default
    64: [LogitsConfig(4, 64, 4, 3, 2), LogitsConfig(4, 64, 4, 4, 2), LogitsConfig(4, 64, 4, 2, 2),
         LogitsConfig(4, 128, 8, 3, 1)],
    32: [LogitsConfig(4, 64, 4, 3, 2), LogitsConfig(8, 64, 4, 3, 2), LogitsConfig(8, 64, 4, 4, 2)],
}


def time_logits(quick: bool):
    """mqa_logits at 8K queries causal at 64K keys, D=128, H=64 and H=32 (GLM-5's indexer): the Triton tile
    sweep and the Gluon kernel (``indexer_logits_hopper``, ring depths 8 and 4), each checked against the
    reference, the Gluon output also against the best Triton output (max diff / largest logit); then the
    issue's other shapes with the best of each kernel."""
    from dsaserve.kernels import indexer_logits_hopper as G

    gluon_ok = gluon_logits_available()
    # the Gluon kernel (3 / 4 consumers x 128 columns, ordered MMA issues and 232 registers were measured and
    # dropped: KERNELS_NOTES) and the session 21 knobs beside the default: the ReLU as s + |s| (``relu_add``),
    # blocks split evenly over the programs (``balanced``), both; the default once more at the end (the drift of
    # the run, against a few-percent effect)
    gluon_configs = ([G.LogitsHopperConfig(4, relu_add=False, balanced=False), G.LogitsHopperConfig(4, balanced=False),
                      G.LogitsHopperConfig(4, relu_add=False, balanced=True), G.default_config(64),
                      G.LogitsHopperConfig(4, relu_add=False, balanced=False)] if gluon_ok else [])
    for h in (64, 32):
        ins = logits_inputs(8192, 65536, h, 128, True, seed=11)
        flops = 2 * valid_pairs(ins[4], ins[5]) * h * 128
        best = None
        tri_out = None
        for cfg in LOGITS_CONFIGS[h][: 2 if quick else None]:
            name = f"mqa_logits 8Kx64K causal H{h} {cfg}"
            out = try_compile(name, lambda: K.mqa_logits(*ins, config=cfg))
            if out is None or not check_logits_rows(name, out, *ins):
                continue
            ms = bench(lambda: K.mqa_logits(*ins, config=cfg))
            record_time(f"mqa_logits 8Kx64K causal H={h}", str(cfg), ms, tflops=flops / ms / 1e9)
            if best is None or ms < best[1]:
                best = (cfg, ms)
                tri_out = out
            del out
        labels: set = set()
        for gcfg in gluon_configs:
            # named by what differs from the default (default_config: relu_add, balanced)
            label = ("gluon" + (f" stages={gcfg.stages}" if gcfg.stages != 4 else "")
                     + (" ordered" if gcfg.ordered else "")
                     + (f" regs={gcfg.consumer_regs}" if gcfg.consumer_regs != G.CONSUMER_REGS else "")
                     + ("" if gcfg.relu_add else " relu=max") + ("" if gcfg.balanced else " strided"))
            label += " again" if label in labels else ""
            labels.add(label)
            name = f"mqa_logits 8Kx64K causal H{h} {label}"
            out = try_compile(name, lambda: G.mqa_logits_hopper(*ins, config=gcfg))
            if out is None or not check_logits_rows(name, out, *ins):
                continue
            if tri_out is not None:
                inf = torch.isinf(tri_out)
                same_inf = torch.equal(torch.isinf(out), inf)
                diff = float((out[~inf] - tri_out[~inf]).abs().max() / tri_out[~inf].abs().max())
                record_check(f"{name} vs Triton", same_inf and diff <= 1e-6,
                             f"max diff / max logit {diff:.2e}, bit-identical {torch.equal(out, tri_out)}")
            del out
            ms = bench(lambda: G.mqa_logits_hopper(*ins, config=gcfg))
            record_time(f"mqa_logits 8Kx64K causal H={h}", label, ms, tflops=flops / ms / 1e9)
            if best is None or ms < best[1]:
                best = (label, ms)
        if best:
            BEST_CONFIGS[f"mqa_logits_h{h}"] = best[0]
            RESULTS["best"][f"mqa_logits_h{h}"] = {"config": str(best[0]), "ms": best[1],
                                                  "tflops": flops / best[1] / 1e9}
        del ins, tri_out
    # the other shapes: Triton's default tiles and the Gluon kernel side by side
    shapes = [("full 8192x65536 H=64", 8192, 65536, 64, "full"), ("causal 4096^2 H=64", 4096, 4096, 64, "causal"),
              ("2048 queries at 128K H=64", 2048, 131072, 64, "causal")]
    for label, s_, skv, h, kind in shapes:
        ins2 = logits_inputs(s_, skv, h, 128, kind == "causal", seed=12)
        if kind == "full":
            ins2 = ins2[:4] + (torch.zeros_like(ins2[4]), torch.full_like(ins2[5], skv))
        fl = 2 * valid_pairs(ins2[4], ins2[5]) * h * 128
        for kern in (("triton", "gluon") if gluon_ok else ("triton",)):
            ms = bench(lambda: K.mqa_logits(*ins2, kernel=kern))
            record_time(f"mqa_logits {label}", kern, ms, tflops=fl / ms / 1e9)
        if gluon_ok:  # session 20's Gluon kernel (relu = max, whole blocks strided) beside today's default
            old = G.LogitsHopperConfig(relu_add=False, balanced=False)
            ms = bench(lambda: G.mqa_logits_hopper(*ins2, config=old))
            record_time(f"mqa_logits {label}", "gluon relu=max strided", ms, tflops=fl / ms / 1e9)
        del ins2


TOPK_CONFIGS = {  # fused top-k: (bq, bk, warps, stages, CTAs/SM, ring tiles, capacity factor), list cut, slack
    # the first two are the same tiles with the radix16 cut (default) and the old bisection cut: the ablation
    # (--quick runs only those two); capacity 4 = fewer, longer cuts, slack 512 = tighter cuts, R = 32 = half
    # the segments (filter parts and pipeline restarts; compile_report: no spill in its H = 64 key loop)
    64: [TopkConfig(4, 64, 4, 3, 2, 16, 2), TopkConfig(4, 64, 4, 3, 2, 16, 2, cut="bisect"),
         TopkConfig(4, 64, 4, 3, 2, 16, 4), TopkConfig(4, 64, 4, 3, 2, 16, 2, slack=512),
         TopkConfig(4, 64, 4, 3, 2, 32, 4)],
    32: [TopkConfig(8, 64, 4, 3, 2, 16, 2), TopkConfig(8, 64, 4, 3, 2, 16, 2, cut="bisect"),
         TopkConfig(8, 64, 4, 3, 2, 16, 4), TopkConfig(8, 64, 4, 3, 2, 16, 2, slack=512),
         TopkConfig(8, 64, 4, 3, 2, 32, 4)],
}


def gluon_logits_available() -> bool:
    """The Gluon logits kernel can run here (Gluon, an sm_90 GPU)."""
    from dsaserve.kernels import indexer_logits_hopper

    return indexer_logits_hopper.HAVE_GLUON and torch.cuda.get_device_capability()[0] == 9


def topk_label(cfg: TopkConfig) -> str:
    """Short variant name for the summary table (str(TopkConfig) is cut off there)."""
    return (f"cut={cfg.cut} bq={cfg.bq} R={cfg.ring_tiles} cf={cfg.capacity_factor}"
            + (f" slack={cfg.slack}" if cfg.slack is not None else "")
            + (f" chunk={cfg.cut_chunk}" if cfg.cut_chunk != 1024 else ""))


def time_topk(quick: bool):
    """Fused indexer top-k vs mqa_logits + top-k (k = 2048): time at 8K x 64K causal (H=64 and 32), peak
    memory at 16K x 128K, selected-set agreement on random and causal inputs."""
    k = 2048
    for h in (64, 32):
        ins = logits_inputs(8192, 65536, h, 128, True, seed=21)
        ks, ke = ins[4], ins[5]
        flops = 2 * valid_pairs(ks, ke) * h * 128
        lcfg = LogitsConfig(4 if h == 64 else 8, 64, 4, 3, 2)
        ms_logits = bench(lambda: K.mqa_logits(*ins, config=lcfg))
        record_time(f"indexer logits only 8Kx64K causal H={h}", str(lcfg), ms_logits, tflops=flops / ms_logits / 1e9)
        # the fastest logits kernel of the run (the Gluon one on Hopper): the honest denominator for the target
        ms_fastest = ms_logits
        if gluon_logits_available():
            ms_g = bench(lambda: K.mqa_logits(*ins, kernel="gluon"))
            record_time(f"indexer logits only 8Kx64K causal H={h}", "gluon", ms_g, tflops=flops / ms_g / 1e9)
            ms_fastest = min(ms_logits, ms_g)
        logits = K.mqa_logits(*ins, config=lcfg)
        unfused = K.topk_indices(logits, ks, ke, k, assume_masked=True)
        ms_unfused = bench(lambda: K.topk_indices(K.mqa_logits(*ins, config=lcfg), ks, ke, k, assume_masked=True))
        record_time(f"logits + torch.topk 8Kx64K causal H={h} k={k}", "unfused", ms_unfused,
                    ratio_to_logits=ms_unfused / ms_logits)
        rows = torch.arange(0, 8192, 97, device="cuda")
        best = None
        for cfg in TOPK_CONFIGS[h][: 2 if quick else None]:
            name = f"fused topk 8Kx64K causal H={h} k={k} {cfg}"
            fused = try_compile(name, lambda: K.mqa_topk_indices(*ins, k=k, config=cfg))
            if fused is None:
                continue
            agree = topk_agreement(fused, unfused, logits, rows)
            same_tiles = cfg.bq == lcfg.bq and cfg.bk == lcfg.bk and cfg.num_warps == lcfg.num_warps
            # identical tile math => bit-identical logits: the value multisets must agree on every row
            ok = agree["same_values"] == 1.0 if same_tiles else agree["same_values"] >= 0.99
            record_check(name, ok, f"vs logits + torch.topk on {agree['rows']} rows: {agree}")
            if not ok:
                continue
            ms = bench(lambda: K.mqa_topk_indices(*ins, k=k, config=cfg))
            record_time(f"fused indexer top-k 8Kx64K causal H={h} k={k}", topk_label(cfg), ms,
                        ratio_to_logits=ms / ms_logits, agreement=agree, config=str(cfg))
            if best is None or ms < best[1]:
                best = (cfg, ms)
        if best:
            RESULTS["best"][f"fused_topk_h{h}"] = {"config": topk_label(best[0]), "ms": best[1], "logits_ms": ms_logits,
                                                  "ratio_to_logits": best[1] / ms_logits,
                                                  "ratio_to_fastest_logits": best[1] / ms_fastest,
                                                  "unfused_ms": ms_unfused}
        if gluon_logits_available():
            time_threshold(ins, h, k, unfused, logits, rows, ms_logits, ms_fastest, ms_unfused, quick)
        del ins, logits, unfused
        torch.cuda.empty_cache()
    # random (non-causal, ragged) agreement
    ins = logits_inputs(2048, 30000, 64, 128, False, seed=23)
    logits = K.mqa_logits(*ins)
    agree = topk_agreement(K.mqa_topk_indices(*ins, k=k), K.topk_indices(logits, ins[4], ins[5], k),
                           logits, torch.arange(0, 2048, 7, device="cuda"))
    record_check("fused topk ragged random 2Kx30K H=64", agree["same_values"] == 1.0, str(agree))
    RESULTS["topk_agreement_random"] = agree
    del ins, logits
    torch.cuda.empty_cache()
    # peak memory of one indexer step at 16K queries x 128K keys (causal), fused vs unfused
    s, skv = 16384, 131072
    ins = logits_inputs(s, skv, 64, 128, True, seed=25)
    steps = [("unfused: mqa_logits + topk_indices", lambda: K.mqa_topk_indices(*ins, k=k, fused=False)),
             ("fused Triton: mqa_topk_indices", lambda: K.mqa_topk_indices(*ins, k=k, kernel="triton"))]
    if gluon_logits_available():
        steps.append(("fused threshold: mqa_topk_indices", lambda: K.mqa_topk_indices(*ins, k=k, kernel="threshold")))
    for name, fn in steps:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
        ms = bench(fn, rep_ms=100)
        RESULTS["memory"].append({"step": name, "queries": s, "keys": skv, "k": k, "peak_bytes_above_inputs": peak,
                                  "output_bytes": out.numel() * 4, "ms": ms, "first_call_s": wall})
        print(f"[memory] {name} 16Kx128K: peak {peak / 2**30:.2f} GiB above inputs "
              f"(output {out.numel() * 4 / 2**20:.0f} MiB), {ms:.2f} ms", flush=True)
        del out
    del ins
    torch.cuda.empty_cache()


# the default first (the filter strided, relu_add below 64 heads), then the filter with relu_add, with relu = max and
# balanced: the A/B of this session's knobs; --quick times the first four
THRESHOLD_CONFIGS = [ThresholdTopkConfig(), ThresholdTopkConfig(filter_config=LogitsHopperConfig(relu_add=True)),
                     ThresholdTopkConfig(filter_config=LogitsHopperConfig(relu_add=False)),
                     ThresholdTopkConfig(filter_config=LogitsHopperConfig(balanced=True)),
                     ThresholdTopkConfig(stride=16, margin=1.5, caps=320),
                     ThresholdTopkConfig(stride=32, margin=1.5, caps=320), ThresholdTopkConfig(caps=384),
                     ThresholdTopkConfig(rows=8192)]


def time_threshold(ins, h, k, unfused, logits, rows, ms_logits, ms_fastest, ms_unfused, quick):
    """The threshold top-k (``threshold_topk.mqa_topk_threshold``) beside the fused Triton kernel: its variants,
    its phases timed alone (sample logits + threshold, the filter kernel, the select), rows redone, and its rows
    checked against select_topk_ordered on the (bit-identical) kernel logits."""
    from dsaserve.kernels import indexer_logits_hopper as G
    from dsaserve.kernels import threshold_topk as TT

    s, skv = ins[0].shape[0], ins[1].shape[0]
    cols = torch.arange(skv, device="cuda")
    valid = (cols[None, :] >= ins[4][rows, None]) & (cols[None, :] < ins[5][rows, None])
    want = R.select_topk_ordered(logits[rows], valid, k)
    want = torch.sort(want, dim=1, descending=True).values.to(torch.int32)
    best = None
    for cfg in THRESHOLD_CONFIGS[: 4 if quick else None]:
        name = f"threshold topk 8Kx64K causal H={h} k={k} {cfg}"
        stats = {}
        got = try_compile(name, lambda: TT.mqa_topk_threshold(*ins, k, 0, config=cfg, stats=stats))
        if got is None:
            continue
        exact = torch.equal(torch.sort(got[rows], dim=1, descending=True).values, want)  # a row: candidate order
        agree = topk_agreement(got, unfused, logits, rows)
        n_redo = int(stats["redo"].sum())
        record_check(name, exact, f"rows equal select_topk_ordered on {rows.numel()} rows: {exact}; "
                                  f"vs unfused {agree}; "
                                  f"redone rows {n_redo}; candidates a row mean {stats['count'].float().mean():.0f}")
        if not exact:
            continue
        ms = bench(lambda: TT.mqa_topk_threshold(*ins, k, 0, config=cfg))
        record_time(f"threshold indexer top-k 8Kx64K causal H={h} k={k}", str(cfg), ms,
                    ratio_to_logits=ms / ms_logits, ratio_to_fastest_logits=ms / ms_fastest, redone_rows=n_redo)
        if best is None or ms < best[1]:
            best = (cfg, ms)
    if best is None:
        return
    RESULTS["best"][f"threshold_topk_h{h}"] = {"config": str(best[0]), "ms": best[1], "logits_ms": ms_logits,
                                              "ratio_to_logits": best[1] / ms_logits,
                                              "ratio_to_fastest_logits": best[1] / ms_fastest, "unfused_ms": ms_unfused}
    # the phases of the default, each timed alone
    cfg = ThresholdTopkConfig()
    ms_sample = bench(lambda: TT.sample_thresholds(*ins, k, cfg))
    # the same with the Triton row-threshold kernel (the A/B of the Gluon one-warp rows)
    cfg_triton = ThresholdTopkConfig(select="triton")
    same = torch.equal(TT.sample_thresholds(*ins, k, cfg_triton), TT.sample_thresholds(*ins, k, cfg))
    record_check(f"row thresholds gluon == triton H={h}", same, "equal thresholds")
    ms_sample_triton = bench(lambda: TT.sample_thresholds(*ins, k, cfg_triton))
    thr = TT.sample_thresholds(*ins, k, cfg)
    ms_filter = bench(lambda: G.mqa_threshold_candidates(*ins, thr, cfg.caps))
    cand, count = G.mqa_threshold_candidates(*ins, thr, cfg.caps)
    # the filter balanced, with relu_add, with relu = max, and the default again: each row's candidates must be the
    # same set (the balanced split puts a split block's in other slots) and its count the same (a part overflowing
    # its slots adds caps + 1: that row is redone), then their times beside the default's
    filter_variants = {}
    for label, fcfg in (("balanced", G.LogitsHopperConfig(balanced=True)),
                        ("relu_add", G.LogitsHopperConfig(relu_add=True)),
                        ("relu_max", G.LogitsHopperConfig(relu_add=False)),
                        ("default_again", G.LogitsHopperConfig())):  # the run's drift
        cand_v, count_v = G.mqa_threshold_candidates(*ins, thr, cfg.caps, config=fcfg)
        same = torch.equal(cand_v.flatten(1).sort(1).values, cand.flatten(1).sort(1).values)
        rows_off = int((count_v.sum(1) != count.sum(1)).sum())
        record_check(f"filter {label} == default H={h}", same,
                     f"same candidate set every row: {same}; rows whose count differs (overflow poison): {rows_off}")
        del cand_v, count_v
        filter_variants[label] = (bench(lambda: G.mqa_threshold_candidates(*ins, thr, cfg.caps, config=fcfg))
                                  if same else None)
    redo = torch.empty(s, dtype=torch.int32, device=cand.device)
    sel_args = dict(counts=count, ks=ins[4], ke=ins[5], redo=redo, n_keys=ins[1].shape[0])  # as mqa_topk_threshold
    select = functools.partial(TT.select_fn(cfg.select, cand), cand, k, **sel_args)  # the default (auto)
    ms_select = bench(select)
    want_sel = select().clone()
    # both kernels and their knobs (warps, output chunk / slots a thread): each must list the same columns in the
    # same order
    variants = {"triton": (TT.select_candidates_triton, {}),
                "triton_warps8": (TT.select_candidates_triton, dict(num_warps=8)),
                "triton_chunk2048": (TT.select_candidates_triton, dict(chunk=2048)),
                "gluon": (TT.select_candidates_gluon, {}),
                "gluon_warps8": (TT.select_candidates_gluon, dict(num_warps=8)),
                "gluon_spt4": (TT.select_candidates_gluon, dict(slots_per_thread=4)),
                "gluon_spt16": (TT.select_candidates_gluon, dict(slots_per_thread=16))}
    select_variants = {}
    for name, (fn, kw) in variants.items():
        run = functools.partial(fn, cand, k, **sel_args, **kw)
        same = torch.equal(run(), want_sel)
        record_check(f"select {name} H={h}", same, "rows equal the default's")
        select_variants[name] = bench(run) if same else None
    # an earlier select where an untracked scratch/select_previous.py is present (the earlier commit's
    # select_gluon.py, then a LABEL naming it and a select_candidates_previous launcher, as kept in
    # benchmarks/results/h200_2026-12-04_session16/*/select_previous_tail.py): the same-run baseline of the select
    ms_previous, previous_label = None, None
    try:
        if "scratch" not in sys.path:  # (this runs once per head count)
            sys.path.insert(0, "scratch")
        import select_previous as prev

        old_select = functools.partial(prev.select_candidates_previous, cand, k, counts=count, ks=ins[4], ke=ins[5],
                                       redo=redo, n_keys=ins[1].shape[0])
        same = torch.equal(old_select(), want_sel)
        record_check(f"select {prev.LABEL} H={h}", same, "same rows in the same order as the select")
        ms_previous, previous_label = bench(old_select), prev.LABEL
    except ImportError:
        pass
    # the redo launch with no row flagged: walking the blocks' flags vs the one redo_any load a program
    from dsaserve.kernels.indexer_topk import mqa_topk_triton

    none = torch.zeros(s, dtype=torch.int32, device=cand.device)
    none_any = torch.zeros(1, dtype=torch.int32, device=cand.device)
    out_copy = want_sel.clone()
    ms_redo_walk = bench(lambda: mqa_topk_triton(*ins, k, need=none, out=out_copy))
    ms_redo_any = bench(lambda: mqa_topk_triton(*ins, k, need=none, out=out_copy, need_any=none_any))
    record_check(f"redo launch with nothing flagged H={h}", torch.equal(out_copy, want_sel), "rows untouched")
    RESULTS.setdefault("threshold_phases", []).append(
        {"h": h, "sample_and_threshold_ms": ms_sample, "sample_and_threshold_triton_rows_ms": ms_sample_triton,
         "filter_ms": ms_filter, "filter_variants_ms": filter_variants, "select_ms": ms_select,
         "select_variants_ms": select_variants, "select_previous_ms": ms_previous,
         "select_previous": previous_label,
         "redo_nothing_flagged_ms": ms_redo_walk, "redo_nothing_flagged_with_any_ms": ms_redo_any,
         "logits_ms": ms_logits, "fastest_logits_ms": ms_fastest})
    print(f"[threshold] H={h}: sample + threshold {ms_sample:.3f} ms (Triton rows {ms_sample_triton:.3f}), "
          f"filter {ms_filter:.3f} (variants {filter_variants}), select {ms_select:.3f} "
          f"({previous_label}: {ms_previous}; variants {select_variants}); redo launch, nothing flagged: "
          f"{ms_redo_walk:.3f} ms walking the flags, {ms_redo_any:.3f} with redo_any "
          f"(logits {ms_logits:.3f}, fastest {ms_fastest:.3f})", flush=True)
    del cand


def time_topk_short():
    """Chunks that end at a 64K context (a long prompt's chunk while others decode, and the last 16K chunk of a
    64K prefill): the fused kernel with its keys split over 1 / 2 / 4 / 8 programs per query block
    (``TopkConfig.key_splits``) and the automatic choice, vs the logits kernel alone and logits + top-k.
    H = 64, k = 2048; every variant must select the same rows as one program per block."""
    from dsaserve.kernels.indexer_topk import auto_key_splits

    k, skv = 2048, 65536
    RESULTS.setdefault("topk_short", [])
    slots = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    for s in (256, 512, 1024, 2048, 4096, 16384):
        ins = logits_inputs(s, skv, 64, 128, True, seed=31 + s)
        ks, ke = ins[4], ins[5]
        ms_logits = bench(lambda: K.mqa_logits(*ins))
        logits = K.mqa_logits(*ins)
        unfused = K.topk_indices(logits, ks, ke, k, assume_masked=True)
        ms_unfused = bench(lambda: K.mqa_topk_indices(*ins, k=k, fused=False))
        rows = torch.arange(0, s, max(1, s // 64), device="cuda")
        one = K.mqa_topk_indices(*ins, k=k, config=TopkConfig(key_splits=1))
        row = {"queries": s, "keys": skv, "k": k, "logits_ms": ms_logits, "unfused_ms": ms_unfused,
               "auto_splits": auto_key_splits(-(-s // 4), skv, slots, 64, 16),
               "agreement_vs_unfused": topk_agreement(one, unfused, logits, rows), "fused_ms": {}}
        for splits in (1, 2, 4, 8, None):
            cfg = TopkConfig(key_splits=splits)
            got = K.mqa_topk_indices(*ins, k=k, config=cfg)
            same = torch.equal(torch.sort(one, 1).values, torch.sort(got, 1).values)
            record_check(f"fused top-k {s}x64K key_splits={splits} == key_splits=1", same, f"identical rows: {same}")
            row["fused_ms"][str(splits or "auto")] = bench(lambda: K.mqa_topk_indices(*ins, k=k, config=cfg))
            del got
        RESULTS["topk_short"].append(row)
        fm = row["fused_ms"]
        print(f"[topk_short] {s} queries x 64K: logits {ms_logits:.3f} ms, logits+topk {ms_unfused:.3f}, fused by "
              f"splits " + ", ".join(f"{key}: {v:.3f}" for key, v in fm.items())
              + f" (auto = {row['auto_splits']})", flush=True)
        del ins, logits, unfused, one
        torch.cuda.empty_cache()


MLA_PREFILL_CONFIGS = [  # first = the Triton default (one program owns all 512 value columns)
    SparseMLAConfig(64, 64, 8, 2), SparseMLAConfig(64, 32, 8, 3), SparseMLAConfig(128, 32, 8, 3, v_split=2),
]
MLA_HOPPER = SparseMLAConfig(kernel="hopper")  # the Gluon kernel (sm_90), timed beside the Triton variants


def time_mla(quick: bool):
    """Sparse MLA prefill (t=4096 queries, 128 and 64 heads, 576/512, top-k 2048, 64K-slot pool) and decode."""
    dv, dr, topk, slots = 512, 64, 2048, 65536
    kv = torch.randn(slots, dv + dr, device="cuda", dtype=torch.bfloat16)
    for h in (128, 64):
        t = 4096
        q = torch.randn(t, h, dv + dr, device="cuda", dtype=torch.bfloat16)
        idx = torch.randint(0, slots, (t, topk), device="cuda", dtype=torch.int32)
        flops = 2 * t * topk * h * (dv + dr + dv)
        rows = torch.randperm(t, device="cuda")[:16]
        rout, rlse = R.sparse_mla(q[rows].float(), kv.float(), idx[rows], 0.1, d_v=dv, chunk=4)
        best = None
        configs = MLA_PREFILL_CONFIGS[: 2 if quick else None] if h == 128 else MLA_PREFILL_CONFIGS[:2]
        configs = [MLA_HOPPER] + configs
        for cfg in configs:
            name = f"sparse_mla prefill t={t} h={h} topk={topk} slots={slots} {cfg}"
            res = try_compile(name, lambda: K.sparse_mla(q, kv, idx, 0.1, config=cfg))
            if res is None:
                continue
            out, lse = res
            err = rel_err(out[rows], rout)
            lerr = float((lse[rows] - rlse).abs().max())
            if not record_check(name, err < 1e-2 and lerr < 1e-3, f"rel_err={err:.2e} lse_maxabs={lerr:.1e}"):
                continue
            del out, lse
            ms = bench(lambda: K.sparse_mla(q, kv, idx, 0.1, config=cfg))
            record_time(f"sparse_mla prefill t={t} h={h}", str(cfg), ms, tflops=flops / ms / 1e9)
            if best is None or ms < best[1]:
                best = (cfg, ms)
        if best:
            RESULTS["best"][f"sparse_mla_prefill_h{h}"] = {"config": str(best[0]), "ms": best[1],
                                                          "tflops": flops / best[1] / 1e9}
        del q, idx
    # decode: batches of 8 and 64 tokens; one split (the kernel before the split default) and the default
    # (auto split + fused merge) of the default tiles, one split of the best prefill variant.
    # benchmarks/sparse_mla_decode.py has the full decode sweep.
    h = 128
    for t in (8, 64):
        q = torch.randn(t, h, dv + dr, device="cuda", dtype=torch.bfloat16)
        idx = torch.randint(0, slots, (t, topk), device="cuda", dtype=torch.int32)
        best_cfg = RESULTS["best"].get("sparse_mla_prefill_h128", {}).get("config")
        runs = [(MLA_PREFILL_CONFIGS[0], 1, ""), (MLA_PREFILL_CONFIGS[0], None, " auto-split")]
        runs += [(c, 1, "") for c in MLA_PREFILL_CONFIGS[1:] if str(c) == best_cfg]
        for cfg, splits, tag in runs:
            ms = bench(lambda: K.sparse_mla(q, kv, idx, 0.1, config=cfg, num_splits=splits))
            record_time(f"sparse_mla decode t={t} h={h}", str(cfg) + tag, ms,
                        GBps_gathered=t * topk * (dv + dr) * 2 / ms / 1e6,
                        tflops=2 * t * topk * h * (dv + dr + dv) / ms / 1e9)


def time_act_quant():
    x = torch.randn(16384, 7168, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: K.act_quant(x))
    record_time("act_quant bf16 [16384,7168]", "default", ms, GBps=x.numel() * (2 + 1 + 4 / 128) / ms / 1e6)


def profile_once():
    ins = logits_inputs(8192, 65536, 64, 128, True, seed=11)
    K.mqa_logits(*ins)
    K.mqa_topk_indices(*ins, k=2048)
    del ins
    q = torch.randn(4096, 128, 576, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(65536, 576, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 65536, (4096, 2048), device="cuda", dtype=torch.int32)
    for cfg in [MLA_HOPPER] + MLA_PREFILL_CONFIGS:
        try_compile(str(cfg), lambda: K.sparse_mla(q, kv, idx, 0.1, config=cfg))
    torch.cuda.synchronize()


def summary_table() -> str:
    c = RESULTS["ceilings"]
    lines = [f"=== kernels: {RESULTS['device']['name']} {RESULTS['device']['date']} | ceilings: bf16 mm "
             f"{c.get('bf16_matmul_tflops', 0):.0f}, fp8 _scaled_mm {c.get('fp8_scaled_mm_tflops', 0):.0f} TFLOPS"]
    targets = {"mqa_logits_h64": ("TFLOPS", 1000), "mqa_logits_h32": ("TFLOPS", 885),
               "sparse_mla_prefill_h128": ("TFLOPS", 490)}
    for key, b in RESULTS["best"].items():
        if "tflops" in b:
            unit, goal = targets.get(key, ("TFLOPS", None))
            met = "" if goal is None else (" MET" if b["tflops"] >= goal else f" missed (target {goal})")
            lines.append(f"  best {key:26s} {b['ms']:8.3f} ms {b['tflops']:7.0f} TFLOPS{met}  {b['config']}")
        else:
            met = " MET" if b.get("ratio_to_fastest_logits", b["ratio_to_logits"]) <= 1.15 else " missed (target <= 1.15)"
            lines.append(f"  best {key:26s} {b['ms']:8.3f} ms = {b['ratio_to_logits']:.3f} x logits "
                         f"({b['logits_ms']:.3f} ms; unfused {b['unfused_ms']:.3f} ms; "
                         f"{b.get('ratio_to_fastest_logits', b['ratio_to_logits']):.3f} x the fastest logits kernel)"
                         f"{met}  {b['config']}")
    for m in RESULTS["memory"]:
        lines.append(f"  memory {m['step']:38s} peak {m['peak_bytes_above_inputs'] / 2**30:7.2f} GiB  {m['ms']:.2f} ms")
    lines.append("  all timings:")
    for r in RESULTS["timing"]:
        extra = f"{r['tflops']:7.0f} TFLOPS" if "tflops" in r else (f"x{r['ratio_to_logits']:.3f}" if "ratio_to_logits" in r else "")
        lines.append(f"    {r['op'][:46]:46s} {r['variant'][:70]:70s} {r['ms']:8.3f} ms {extra}")
    bad = [x["name"] for x in RESULTS["correctness"] if x["ok"] is False]
    lines.append("correctness: " + ("all OK" if not bad else f"FAILED: {bad}"))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write all results as JSON here (rewritten after each section)")
    ap.add_argument("--quick", action="store_true", help="fewer variants per kernel")
    ap.add_argument("--only", default="all", help="comma list: ceilings,check,logits,topk,topk_short,mla,quant")
    ap.add_argument("--profile-once", action="store_true",
                    help="for ncu: run mqa_logits, the fused top-k and every sparse MLA prefill variant once at the "
                         "benchmark shapes, nothing else")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    RESULTS["device"] = {"name": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
                         "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    import triton

    RESULTS["device"]["triton"] = triton.__version__
    print(f"[device] {RESULTS['device']}", flush=True)
    if args.profile_once:
        profile_once()
        return
    only = set(args.only.split(","))
    sections = [("ceilings", ceilings), ("check", check_small), ("logits", lambda: time_logits(args.quick)),
                ("topk", lambda: time_topk(args.quick)),
                ("topk_short", time_topk_short), ("mla", lambda: time_mla(args.quick)),
                ("quant", time_act_quant)]
    for name, fn in sections:
        if "all" in only or name in only:
            t0 = time.time()
            try:
                fn()
            except Exception as e:  # report and go on: one broken section must not hide the others
                traceback.print_exc()
                record_check(f"section {name}", False, f"{type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache()
            print(f"[section] {name} took {time.time() - t0:.1f} s", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(RESULTS, f, indent=1)
    print()
    print(summary_table())


if __name__ == "__main__":
    main()
