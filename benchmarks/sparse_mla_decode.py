"""Sparse MLA at decode batch sizes: one program per (token, head block) vs the top-k split + fused merge.

One device call (estimated 20-40 s on an H200, mostly Triton compiles; not yet run on a device):

    PYTHONPATH=. python3 benchmarks/sparse_mla_decode.py --out $OUT/sparse_mla_decode.json

Shape: DeepSeek-V3.2 decode, 128 heads, 576/512 latent, top-k 2048 over a 64K-slot bf16 pool, random slot
ids (distinct rows, as after a long prompt). For t in 1..128 tokens it times each variant:
  split=1   the kernel before this change (one program per token x 64-head block)
  auto      the default (``pick_num_splits``; the nsplit column says what it chose)
  split=N   fixed split counts (rounded to whole 64-key tiles, no empty split)
  auto bk32 the auto choice with 32-key tiles (twice the programs at t = 1; the prefill sweep's 2nd config)
Each variant is first checked against the fp32 reference on up to 4 rows (rel. err < 5e-3, lse < 1e-4).

Timing (medians, CUDA events, L2 flushed before every run, like benchmarks/kernels.py):
  eager us  ``triton.testing.do_bench`` of the Python call (allocations + 1 or 2 launches): includes the
            launch gap when the kernels are shorter than the host's launch work
  graph us  the same call captured once in a CUDA graph and replayed (how the decode step runs it); capture
            also proves the path has no host sync
  merge us  the fused merge kernel alone at that split count (graph replay)
Floors per batch: every gathered row read once from HBM (t x 2048 x 576 x 2 bytes at 4.2 TB/s) and the MMA
work (2 x t x 2048 x 128 x (576 + 512) flops at 989 dense bf16 TFLOPS); the two are about equal
(0.56 / 0.58 us a token), so neither alone is reachable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

HEADS, DV, DR, TOPK, SLOTS = 128, 512, 64, 2048, 65536
HBM_BYTES_PER_S = 4.2e12  # H200 HBM3e, achievable read bandwidth
MMA_FLOPS = 989e12  # H200 dense bf16 peak
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)
FIXED_SPLITS = (4, 8, 16)


def floors_us(t: int, heads: int = HEADS, topk: int = TOPK, dv: int = DV, dr: int = DR) -> tuple[float, float]:
    """(memory floor, MMA floor) in microseconds for t decode tokens: gathered bf16 rows read once at
    HBM_BYTES_PER_S; QK^T over dv + dr and PV over dv at MMA_FLOPS."""
    mem = t * topk * (dv + dr) * 2 / HBM_BYTES_PER_S * 1e6
    mma = 2 * t * topk * heads * (dv + dr + dv) / MMA_FLOPS * 1e6
    return mem, mma


def variants(fixed=FIXED_SPLITS) -> list[tuple[str, int | None, str]]:
    """(name, num_splits or None = auto, tile) in table order; tile 'bk64' = the default config."""
    return ([("split=1", 1, "bk64"), ("auto", None, "bk64")] + [(f"split={n}", n, "bk64") for n in fixed]
            + [("auto bk32", None, "bk32")])


def format_table(rows: list[dict]) -> str:
    """The printed table: one line per (t, variant); 'x split1' = split=1's time / this one's at the same t
    (graph replays, or eager calls under --no-graph)."""
    head = (f"{'t':>4} {'variant':>10} {'nsplit':>6} {'progs':>5} {'eager us':>9} {'graph us':>9} "
            f"{'merge us':>8} {'x split1':>8} {'floor mem':>9} {'floor mma':>9}")
    lines = [head, "-" * len(head)]

    def us(r):
        return r.get("graph_us") or r.get("eager_us")

    base = {r["t"]: us(r) for r in rows if r["variant"] == "split=1" and not r.get("error")}
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['t']:>4} {r['variant']:>10}  {r['error']}")
            continue
        speed = base.get(r["t"], 0.0) / us(r)
        graph = f"{r['graph_us']:9.1f}" if r.get("graph_us") else f"{'-':>9}"
        merge = f"{r['merge_us']:8.1f}" if r.get("merge_us") else f"{'-':>8}"
        lines.append(f"{r['t']:>4} {r['variant']:>10} {r['nsplit']:>6} {r['programs']:>5} {r['eager_us']:9.1f} "
                     f"{graph} {merge} {speed:8.2f} {r['floor_mem_us']:9.2f} {r['floor_mma_us']:9.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- device part
def _bench_eager(fn, rep_ms: int) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def _bench_graph(fn, reps: int) -> float:
    """Median microseconds of one replay of fn captured in a CUDA graph, L2 flushed before each replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        flush.zero_()
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3


def run(tokens, fixed, rep_ms: int, reps: int, graph: bool) -> list[dict]:
    import torch

    from dsaserve import kernels as K
    from dsaserve.kernels import reference as R
    from dsaserve.kernels._common import device_sm_count
    from dsaserve.kernels.sparse_attention import (SparseMLAConfig, default_config, merge_splits_triton,
                                                   pick_num_splits, split_layout)

    dev = torch.device("cuda")
    sms = device_sm_count(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    kv = torch.randn(SLOTS, DV + DR, device=dev, dtype=torch.bfloat16, generator=g)
    kv_f32 = kv.float()
    scale = 192**-0.5
    base = default_config(HEADS, DV, torch.bfloat16)
    tiles = {"bk64": base, "bk32": SparseMLAConfig(bh=base.bh, bk=32, num_warps=8, num_stages=3)}
    rows = []
    for t in tokens:
        q = torch.randn(t, HEADS, DV + DR, device=dev, dtype=torch.bfloat16, generator=g)
        idx = torch.randint(0, SLOTS, (t, TOPK), device=dev, dtype=torch.int32, generator=g)
        chk = slice(0, min(t, 4))
        rout, rlse = R.sparse_mla(q[chk].float(), kv_f32, idx[chk], scale, d_v=DV, chunk=2)
        mem, mma = floors_us(t)
        for name, splits, tile in variants(fixed):
            cfg = tiles[tile]
            n_hb = -(-HEADS // cfg.bh)
            want = splits if splits is not None else pick_num_splits(t, n_hb, TOPK, cfg.bk, sms)
            nsplit, _ = split_layout(TOPK, want, cfg.bk)
            row = {"t": t, "variant": name, "tile": str(cfg), "nsplit": nsplit, "programs": t * n_hb * nsplit,
                   "floor_mem_us": mem, "floor_mma_us": mma}
            rows.append(row)
            fn = lambda: K.sparse_mla(q, kv, idx, scale, d_v=DV, config=cfg, num_splits=splits)  # noqa: E731
            try:
                out, lse = fn()
                err = float((out[chk].double() - rout.double()).norm() / rout.double().norm())
                lerr = float((lse[chk] - rlse).abs().max())
                row.update(rel_err=err, lse_err=lerr)
                if not (err < 5e-3 and lerr < 1e-4):
                    row["error"] = f"CHECK FAILED rel_err={err:.2e} lse_err={lerr:.1e}"
                    continue
                del out, lse
                row["eager_us"] = _bench_eager(fn, rep_ms)
                row["graph_us"] = _bench_graph(fn, reps) if graph else None
                if nsplit > 1 and graph:
                    o_buf = torch.randn(nsplit, t, HEADS, DV, device=dev, generator=g)
                    l_buf = torch.randn(nsplit, t, HEADS, device=dev, generator=g)
                    row["merge_us"] = _bench_graph(lambda: merge_splits_triton(o_buf, l_buf, torch.bfloat16), reps)
                    del o_buf, l_buf
            except Exception as e:  # one broken variant must not hide the others
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"[{time.strftime('%H:%M:%S')}] t={t} {name}: " + (row.get("error") or
                  f"nsplit={nsplit} eager {row['eager_us']:.1f} us graph {row['graph_us'] or 0:.1f} us"), flush=True)
        del q, idx
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the rows and device facts as JSON here")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list of decode batch sizes")
    ap.add_argument("--splits", default=",".join(map(str, FIXED_SPLITS)), help="comma list of fixed split counts")
    ap.add_argument("--rep-ms", type=int, default=60, help="do_bench time per eager measurement")
    ap.add_argument("--reps", type=int, default=50, help="graph replays per measurement")
    ap.add_argument("--no-graph", action="store_true", help="eager timings only (no CUDA graph capture)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/sparse_mla_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    t0 = time.time()
    tokens = [int(x) for x in args.tokens.split(",") if x]
    fixed = [int(x) for x in args.splits.split(",") if x]
    props = torch.cuda.get_device_properties(0)
    device = {"name": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    print(f"[device] {device}", flush=True)
    rows = run(tokens, fixed, args.rep_ms, args.reps, graph=not args.no_graph)
    print()
    print(format_table(rows))
    print(f"\n{time.time() - t0:.1f} s; floors in us for the whole batch (mem: {HBM_BYTES_PER_S / 1e12} TB/s, "
          f"mma: {MMA_FLOPS / 1e12:.0f} TFLOPS)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "shape": {"heads": HEADS, "dv": DV, "dr": DR, "topk": TOPK, "slots": SLOTS},
                       "rows": rows, "seconds": time.time() - t0}, f, indent=1)
    return 0 if not any(r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
