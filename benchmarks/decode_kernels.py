"""Decode-size kernels, graph-replayed: fp8 linear variants per projection, and the indexer's top-k.

    PYTHONPATH=. python3 benchmarks/decode_kernels.py --out $OUT/decode_kernels.json [--m 1,32] [--only gemm,topk]

A decode step reads every weight once; what is left above that floor is per-launch cost. For each projection
of the 8-layer bench model (DeepSeek-V3.2 geometry), separate and fused along N (q_a + wk + kv_a share x;
q_b + wq_b share q_a's output; gate + up share x), and each M it times:

  quant-in-gemm / 2-launch  the kernel quantizes x itself, split K reduced by a second launch (session 2's default)
  quant-in-gemm             the same with the split-K reduction in the kernel (the tile's last program)
  default (act_quant + GEMM) what ``fp8_linear_prepared`` runs now (its default tile), both launches timed
  gemv bnXX wY sZ           M = 1 on the CUDA cores (``Fp8GemmConfig.gemv``), x quantized beforehand
  prequant bmXX bnYY sZ     x quantized beforehand (``act_quant``, timed apart: the act_quant row), the
                            given tile and split multiplier (x1 = ``choose_split_k``'s choice)
  cublas blockwise          torch ``F.scaled_mm`` (BlockWise1x128 / 128x128) incl. its act_quant
  bf16 mm                   the same weight dequantized to bf16 (the ``--quantization none`` path)

Timing: each call captured REPS times in one CUDA graph over enough weight copies that nothing stays in L2
(the step's other layers evict it too), replayed 5 times; the median replay / REPS. Floor: weight + x + y bytes
at the copy bandwidth measured in the same run. Every fp8 variant is checked against the reference first.
Top-k (``topk``): ``topk_indices`` over [B, ctx] fp32 rows (k = 2048) by the radix-select kernel and by
torch.topk on masked rows, B = 1 / 32, ctx = 4K / 32K, same graph timing; rows of normal draws and the real
decode logits (``paged_mqa_logits`` of random e4m3 queries and keys). (An in-register bit-by-bit select for
rows up to 8K was measured here on 2026-12-02 at 26.6 us vs the radix kernel's 15.7 us at B = 1, 4K: dropped.)
``--smoke``: toy sizes on the CPU under the Triton interpreter (checks the script; numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from dsaserve.kernels import act_quant
from dsaserve.kernels import fp8_linear as FL
from dsaserve.kernels._common import device_sm_count
from dsaserve.kernels.block_fp8 import dequantize_block_fp8

if SMOKE:
    import tests.kernels.conftest  # noqa: F401  (the interpreter fixes the kernel tests use)

# (N, K) of the bench model's fp8 projections; 'fused' rows concatenate along N what shares an input
SHAPES = {
    "q_a": (1536, 7168), "wk": (128, 7168), "kv_a": (576, 7168), "qkv_a fused": (2240, 7168),
    "q_b": (24576, 1536), "wq_b": (8192, 1536), "q_b+wq_b fused": (32768, 1536),
    "o_proj": (7168, 16384),
    "shared gate": (2048, 7168), "shared gate_up fused": (4096, 7168), "shared down": (7168, 2048),
    "dense gate_up fused": (36864, 7168), "dense down": (7168, 18432),
}
L2_BYTES = 50 << 20
# (block, tail, num_warps) of the radix top-k kernel tried beside its defaults
RADIX_SWEEP = [(4096, 256, 4), (4096, 256, 16), (4096, 512, 8), (4096, 1024, 8), (2048, 256, 8), (2048, 256, 4),
               (2048, 512, 4), (1024, 256, 4), (8192, 256, 16), (8192, 512, 16)]
DEV = "cpu" if SMOKE else "cuda"
if SMOKE:
    SHAPES = {"q_a": (96, 256), "wk": (16, 256), "o_proj": (64, 512)}


def variants(m: int) -> list[tuple[str, str, FL.Fp8GemmConfig | None]]:
    """(name, kind, config): kind 'qgemm' (x quantized in the kernel), 'pre' (act_quant first), 'cublas', 'bf16'."""
    d = FL.default_gemm_config(m)
    out = [("default (act_quant + GEMM)", "default", d)]
    if m <= 16:  # the in-GEMM quantization takes 16-row tiles (off by default: QUANT_IN_GEMM_MAX_BM)
        q16 = FL.Fp8GemmConfig(bm=16, bn=64, num_warps=4, num_stages=4)
        out += [("quant-in-gemm / 2-launch", "qgemm", dataclasses.replace(q16, reduce_in_kernel=False)),
                ("quant-in-gemm", "qgemm", q16)]
    tiles = [(16, 32, 4), (16, 64, 4), (16, 128, 4), (16, 64, 6), (64, 32, 4), (64, 64, 4)] if m <= 16 else \
        [(64, 32, 4), (64, 64, 4), (64, 128, 4)]
    for bm, bn, stages in tiles:
        out.append((f"prequant bm{bm} bn{bn} s{stages}", "pre",
                    FL.Fp8GemmConfig(bm=bm, bn=bn, num_warps=4, num_stages=stages)))
    if m == 1:  # the CUDA-core GEMV: tile width, warps, stages
        for bn, warps, stages in ((32, 4, 4), (64, 4, 3), (64, 4, 5), (128, 8, 3), (128, 4, 4)):
            out.append((f"gemv bn{bn} w{warps} s{stages}", "pre",
                        FL.Fp8GemmConfig(bn=bn, num_warps=warps, num_stages=stages, gemv=True)))
    out += [("cublas blockwise", "cublas", None), ("bf16 mm", "bf16", None)]
    return out


def graph_time_us(fn_of_copy, copies: int, reps: int) -> float:
    """Median microseconds per call of fn_of_copy(i % copies), REPS calls captured in one CUDA graph."""
    if SMOKE:
        t0 = time.perf_counter()
        fn_of_copy(0)
        return (time.perf_counter() - t0) * 1e6
    for i in range(min(copies, 3)):
        fn_of_copy(i)  # compile, workspaces
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn_of_copy(i % copies)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    del g
    return statistics.median(times)


def copy_gbs() -> float:
    if SMOKE:
        return 1.0
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    us = graph_time_us(lambda i: y.copy_(x), 1, 10)
    return 2 * x.numel() / us / 1e3


def run_shape(name: str, n: int, k: int, ms: list[int], gbs: float, rows: list, checks: list) -> None:
    wbytes = n * k
    copies = 1 if SMOKE else max(2, -(-3 * L2_BYTES // wbytes))
    reps = 1 if SMOKE else max(copies, 24)
    g = torch.Generator(device=DEV).manual_seed(n + k)
    ws = [FL.prepare_fp8_weight(*FL.quantize_weight_fp8(torch.randn(n, k, device=DEV, generator=g) * 0.05))
          for _ in range(copies)]
    wd = [dequantize_block_fp8(*w.unpadded()).to(torch.bfloat16) for w in ws[: max(1, copies // 2)]]
    nsm = device_sm_count(torch.device(DEV))
    for m in ms:
        x = torch.randn(m, k, device=DEV, generator=g).to(torch.bfloat16)
        xq, xs = act_quant(x, FL.BLOCK)
        ref = FL.fp8_linear_reference(x, *ws[0].unpadded(), torch.float32)
        floor = (wbytes + m * k * 2 + m * n * 2) / gbs / 1e3
        base = {"shape": name, "M": m, "N": n, "K": k, "floor_us": round(floor, 2), "copies": copies}
        rows.append({**base, "variant": "act_quant", "us": graph_time_us(lambda i: act_quant(x, FL.BLOCK), 1, 24)})
        for vname, kind, cfg in variants(m):
            row = {**base, "variant": vname}
            try:
                if kind == "default":  # what the layer runs: fp8_linear_prepared, act_quant launch included
                    fn = lambda i: FL.fp8_linear_prepared(x, ws[i], torch.bfloat16)  # noqa: E731
                elif kind == "qgemm":
                    fn = lambda i, cfg=cfg: FL.fp8_gemm_triton(x, None, ws[i], torch.bfloat16, cfg)  # noqa: E731
                elif kind == "pre":
                    fn = lambda i, cfg=cfg: FL.fp8_gemm_triton(xq, xs, ws[i], torch.bfloat16, cfg)  # noqa: E731
                elif kind == "cublas":
                    fn = lambda i: FL.fp8_linear_prepared(x, ws[i], torch.bfloat16, backend="cublas")  # noqa: E731
                else:
                    fn = lambda i: x @ wd[i % len(wd)].t()  # noqa: E731
                if kind != "bf16":
                    got = fn(0).float()
                    err = float((got - ref).norm() / ref.norm())
                    ok = err < 1e-2
                    checks.append({"shape": name, "M": m, "variant": vname, "rel_err": err, "ok": ok})
                    if not ok:
                        row["error"] = f"rel err {err:.3g}"
                        rows.append(row)
                        continue
                if cfg is not None:
                    row["split_k"] = FL.choose_split_k(m, n, k, cfg, nsm)
                row["us"] = graph_time_us(fn, copies if kind != "bf16" else len(wd), reps)
                row["x_floor"] = round(row["us"] / floor, 2)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(f"[{name} M={m}] {vname:28s} " + (f"{row['us']:8.2f} us  x{row['x_floor']:.2f} floor "
                  f"({floor:.2f})" if "us" in row else row.get("error", "")), flush=True)
    del ws, wd
    if not SMOKE:
        torch.cuda.empty_cache()


def _paged_logits(b: int, ctx: int, width: int) -> torch.Tensor:
    """The engine's decode logits: ``paged_mqa_logits`` of random e4m3 q / keys (64 heads x 128, 64-token pages)
    -> fp32 [b, width] (-inf past ctx), as ``Indexer.decode_topk_slots`` hands them to top-k."""
    from dsaserve.kernels import hadamard_act_quant, paged_mqa_logits

    g = torch.Generator(device=DEV).manual_seed(b + ctx)
    pages = width // 64
    q8, qs = hadamard_act_quant(torch.randn(b, 64, 128, device=DEV, generator=g).to(torch.bfloat16))
    w = torch.randn(b, 64, device=DEV, generator=g) * 64 ** -0.5 * 128 ** -0.5 * qs[..., 0]
    k8, kscale = hadamard_act_quant(torch.randn(b * pages * 64, 128, device=DEV, generator=g).to(torch.bfloat16))
    bt = torch.arange(b * pages, device=DEV, dtype=torch.int32).view(b, pages)
    ctx_t = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
    return paged_mqa_logits(q8, k8.view(-1, 64, 128), kscale.view(-1, 64), w, ctx_t, bt)


def run_topk(rows: list) -> None:
    from dsaserve.kernels.topk import topk_indices_gpu, topk_indices_radix

    k = 64 if SMOKE else 2048
    for data in ("normal", "paged logits"):
        for b in (1, 32):
            for ctx in ((256,) if SMOKE else (4136, 32768, 65536)):
                width = -(-ctx // 64) * 64 + 128  # the block table covers a little more than the context
                logits = torch.randn(b, width, device=DEV) if data == "normal" else _paged_logits(b, ctx, width)
                ks = torch.zeros(b, dtype=torch.int32, device=DEV)
                ke = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
                want = set(torch.topk(logits[0, :ctx], k).indices.tolist())
                variants = {"radix": lambda i: topk_indices_radix(logits, ks, ke, k),
                            "torch": lambda i: topk_indices_gpu(logits, ks, ke, k, backend="torch")}
                # the radix kernel's chunk sizes and warps (one CTA per row: its latency is the step's)
                for blk, tail, warps in ([] if SMOKE else RADIX_SWEEP):
                    variants[f"radix b{blk} t{tail} w{warps}"] = (
                        lambda i, blk=blk, tail=tail, warps=warps:
                        topk_indices_radix(logits, ks, ke, k, block=blk, tail=tail, num_warps=warps))
                for name, fn in variants.items():
                    ok = set(fn(0)[0].tolist()) == want
                    us = graph_time_us(fn, 1, 20)
                    rows.append({"shape": f"topk {data} B={b} ctx={ctx}", "M": b, "variant": f"topk {name}",
                                 "us": us, "ok": ok})
                    print(f"[topk {data} B={b} ctx={ctx}] {name:34s} {us:8.2f} us  same set: {ok}", flush=True)
                if data != "normal":
                    row = logits[0, :ctx]
                    expo = torch.frexp(row).exponent
                    print(f"   logits: {row.unique().numel()} distinct of {ctx}, exponents {int(expo.min())}.."
                          f"{int(expo.max())}, {(row == 0).sum().item()} zeros", flush=True)


def table(rows: list) -> str:
    best: dict = {}
    for r in rows:
        if "us" in r and r["variant"] != "act_quant" and "floor_us" in r:
            key = (r["shape"], r["M"])
            if r["variant"].startswith(("prequant", "quant", "gemv")) and (key not in best or r["us"] < best[key]["us"]):
                best[key] = r
    lines = [f"{'shape':22s} {'M':>3} {'floor':>7} {'2-launch':>9} {'qgemm':>8} {'best pre':>9} {'(variant)':24s} "
             f"{'act_q':>6} {'cublas':>7} {'bf16':>7}"]
    get = {(r["shape"], r["M"], r["variant"]): r.get("us") for r in rows}
    for (shape, m), b in best.items():
        def f(v):
            u = get.get((shape, m, v))
            return f"{u:.1f}" if u else "-"
        lines.append(f"{shape:22s} {m:>3} {b['floor_us']:7.1f} {f('quant-in-gemm / 2-launch'):>9} "
                     f"{f('quant-in-gemm'):>8} {b['us']:9.1f} {b['variant']:24s} {f('act_quant'):>6} "
                     f"{f('cublas blockwise'):>7} {f('bf16 mm'):>7}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write every row as JSON here")
    ap.add_argument("--m", default="1,32", help="decode batch sizes (rows of x), comma-separated")
    ap.add_argument("--only", default="gemm,topk", help="sections: gemm, topk")
    ap.add_argument("--shapes", default="all", help="comma-separated names from SHAPES, or all")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (checks the script, no numbers)")
    a = ap.parse_args()
    ms = [int(v) for v in a.m.split(",")]
    names = list(SHAPES) if a.shapes == "all" else a.shapes.split(",")
    gbs = copy_gbs()
    print(f"copy bandwidth {gbs:.0f} GB/s", flush=True)
    rows: list = []
    checks: list = []
    res = {"card": torch.cuda.get_device_name(0) if not SMOKE else "CPU (smoke)", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "copy_gbs": gbs, "rows": rows, "checks": checks}

    def save():  # after every section: a run cut short keeps what finished
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)

    if "topk" in a.only:
        run_topk(rows)
        save()
    if "gemm" in a.only:
        for name in names:
            run_shape(name, *SHAPES[name], ms, gbs, rows, checks)
            save()
    print(table(rows), flush=True)
    return 0 if all(c["ok"] for c in checks) and all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
