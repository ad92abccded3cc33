"""Bubble model of chunked pipeline prefill: predicted TTFT of every PP x CP layout from a 1-GPU breakdown.

    PYTHONPATH=. python3 benchmarks/bubble_model.py \\
        --breakdown benchmarks/results/prefill_h200x4_dispatch_ahead_2026-11-28.json --fit-len 65536 \\
        --measured benchmarks/results/prefill_h200x4_run2_2026-11-28.json \\
        --out benchmarks/results/bubble_model_2026-12-02.json

The model (what it assumes, so what a measurement that misses it points at):
  * One prompt's cost is the chunk cost model of ``dsaserve.engine.chunking`` fitted on the 1x1 run at
    ``--fit-len``: indexer logits + top-k per scored key, sparse attention per attended key, and everything
    else, *including* the run's idle + unmarked time, per token (so 1x1 at the fit length is reproduced).
  * CP is perfect: a stage of C ranks computes a chunk in 1/C of the time. PP stages are equal: each holds
    1/P of the layers. No communication time, no per-step host cost (``--step-overhead-ms`` adds one per
    chunk and stage).
  * Stage s starts chunk c when stage s-1 has finished c and stage s has finished c-1 (the pipeline
    bubble: ``bench.report.pipeline_makespan``).
Chunks are fixed ``--chunk-size`` tokens or the dynamic equal-cost chunks the engine cuts with PP > 1
(``engine.chunking.make_chunker``, first chunk ``--chunk-size``). Writes every number as JSON and prints the
table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from dsaserve.bench.report import IDLE_ROW, find_run, layout_name, parse_int_list, parse_layouts, pipeline_makespan
from dsaserve.engine.chunking import ChunkCostModel, make_chunker

INDEXER_ROWS = ("indexer logits", "top-k")
ATTENTION_ROWS = ("sparse attention",)
NOT_WORK_ROWS = ("PP wait",)


def fit_from_breakdown(run: dict, index_topk: int) -> ChunkCostModel:
    """Per-key, per-attended-key and per-token costs from a 1x1 run's breakdown rows (critical path, ms);
    idle + unmarked time counts as per-token work so the model reproduces the run's TTFT."""
    rows = {k: v["max"] for k, v in run["breakdown"]["rows"].items()}
    phases = {"indexer": sum(rows.get(r, 0.0) for r in INDEXER_ROWS),
              "attention": sum(rows.get(r, 0.0) for r in ATTENTION_ROWS),
              "per_token": sum(ms for r, ms in rows.items() if r not in INDEXER_ROWS + ATTENTION_ROWS + NOT_WORK_ROWS)}
    # the engine's fit reads phase names; map the table's rows onto the groups it knows
    named = {"indexer_logits": phases["indexer"], "sparse_attn": phases["attention"], "other": phases["per_token"]}
    return ChunkCostModel.fit(named, [(0, run["input_len"])], index_topk)


def chunk_lengths(n: int, chunk: int, dynamic: bool, model: ChunkCostModel, page: int = 64) -> list[int]:
    if dynamic:
        return make_chunker(chunk, page, model).sequence(n)
    return [min(chunk, n - s) for s in range(0, n, chunk)]


def predict_ms(n: int, pp: int, cp: int, lengths: list[int], model: ChunkCostModel, step_overhead_ms: float) -> float:
    costs, start = [], 0
    for c in lengths:
        costs.append(model.span(start, start + c) / cp + pp * step_overhead_ms)
        start += c
    return pipeline_makespan(costs, pp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--breakdown", required=True, help="a dsaserve bench prefill JSON with a 1x1 breakdown")
    p.add_argument("--fit-len", type=int, default=65536, help="input length of the 1x1 run to fit on")
    p.add_argument("--index-topk", type=int, default=2048, help="the bench model's index_topk")
    p.add_argument("--lengths", default="16384,65536,131072", help="input lengths to predict, comma-separated")
    p.add_argument("--layouts", default="1x1,1x2,2x1,2x2,1x4,2x4,1x8,4x2", help="PPxCP layouts to predict")
    p.add_argument("--chunk-size", type=int, default=16384, help="fixed chunk size / first dynamic chunk")
    p.add_argument("--step-overhead-ms", type=float, default=0.0,
                   help="host / launch cost added per chunk and stage (0: the bubble alone)")
    p.add_argument("--measured", default=None,
                   help="a bench prefill JSON whose baseline TTFTs (fixed chunks) are set beside the predictions")
    p.add_argument("--out", required=True, help="write the predictions as JSON here")
    a = p.parse_args(argv)
    with open(a.breakdown) as f:
        source = json.load(f)
    run = find_run(source, "1x1", a.fit_len)
    if run is None or "breakdown" not in run:
        print(f"error: {a.breakdown} has no 1x1 run with a breakdown at {a.fit_len} tokens", file=sys.stderr)
        return 2
    model = fit_from_breakdown(run, a.index_topk)
    measured = None
    if a.measured:
        with open(a.measured) as f:
            measured = json.load(f)
    layouts, lengths = parse_layouts(a.layouts), parse_int_list(a.lengths, "--lengths")
    rows = []
    for n in lengths:
        one = predict_ms(n, 1, 1, chunk_lengths(n, a.chunk_size, False, model), model, a.step_overhead_ms)
        base = find_run(measured, "1x1", n) if measured else None
        for pp, cp in layouts:
            row = {"layout": layout_name(pp, cp), "gpus": pp * cp, "input_len": n}
            for kind, dyn in (("fixed", False), ("dynamic", True)):
                lens = chunk_lengths(n, a.chunk_size, dyn, model)
                ms = predict_ms(n, pp, cp, lens, model, a.step_overhead_ms)
                row[kind] = {"ttft_s": ms / 1e3, "speedup": one / ms, "chunks": lens}
            got = find_run(measured, layout_name(pp, cp), n) if measured else None
            if got:
                row["measured_fixed"] = {"ttft_s": got["ttft_median_s"],
                                         "speedup": base["ttft_median_s"] / got["ttft_median_s"] if base else None}
            rows.append(row)
    out = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "command": "PYTHONPATH=. python3 benchmarks/bubble_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "breakdown_source": a.breakdown, "fit_run": {"layout": "1x1", "input_len": a.fit_len,
                                                              "ttft_median_s": run["ttft_median_s"]},
                 "measured_source": a.measured, "chunk_size": a.chunk_size, "step_overhead_ms": a.step_overhead_ms},
        "model": {"per_token_ms": model.per_token_ms, "per_key_ms": model.per_key_ms,
                  "per_attended_ms": model.per_attended_ms, "index_topk": model.index_topk},
        "predictions": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"bubble model fitted on {a.breakdown} (1x1, {a.fit_len} tokens, TTFT {run['ttft_median_s']:.3f} s); "
          f"chunk {a.chunk_size}; perfect CP, equal stages, step overhead {a.step_overhead_ms} ms")
    print("| layout | GPUs | tokens | fixed: TTFT (speedup) | dynamic: TTFT (speedup), chunks | measured fixed (speedup) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        m = r.get("measured_fixed")
        meas = f"{m['ttft_s']:.3f} s ({m['speedup']:.2f}x)" if m and m["speedup"] else "-"
        d = r["dynamic"]           # with one stage the engine keeps fixed chunks (and the order does not matter)
        dyn = "= fixed" if r["layout"].startswith("1x") else f"{d['ttft_s']:.3f} s ({d['speedup']:.2f}x), {len(d['chunks'])}"
        print(f"| {r['layout']} | {r['gpus']} | {r['input_len']} | {r['fixed']['ttft_s']:.3f} s ({r['fixed']['speedup']:.2f}x) "
              f"| {dyn} | {meas} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
