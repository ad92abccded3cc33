"""The pure part of ``dsaserve bench prefill``: parsing, the per-phase breakdown, floors and models, the
summary of a run's results and the printed report.

Nothing here touches an engine or a GPU, so every number the report prints can be unit-tested on CPU.
``summarize_prefill`` and ``format_prefill_report`` read only the results JSON and a ``PrefillSetup``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Phase names written by the model / runtime (``with phase(...)``) -> the rows of the breakdown table.
PHASE_ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("indexer logits", ("indexer_logits",)),
    ("top-k", ("topk",)),
    ("fused indexer + top-k", ("indexer_topk",)),
    ("sparse attention", ("sparse_attn",)),
    ("MoE experts", ("moe",)),
    ("MoE comm", ("moe_comm",)),
    ("dense GEMMs", ("dense_gemm",)),
    ("CP gathers", ("cp_gather",)),
    ("PP transfer", ("pp_send", "pp_gather")),
    ("PP wait", ("pp_recv_wait",)),
    ("sample", ("sample",)),
]
KNOWN_PHASES = {p for _, names in PHASE_ROWS for p in names}
IDLE_ROW = "idle + unmarked"


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---- arguments ---------------------------------------------------------------------------------------
def parse_int_list(text: str, what: str) -> list[int]:
    """"16384,49664" -> [16384, 49664]; a clear error for anything else."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers (e.g. 16384,65536), got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must list positive integers, got {text!r}")
    return values


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """"1x1,2x2" -> [(1, 1), (2, 2)]: PP size x CP size."""
    out = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            pp, cp = (int(v) for v in item.split("x"))
        except ValueError:
            raise ValueError(f"layout {item!r} must be PPxCP, e.g. 2x2 (2 pipeline stages of 2 CP ranks)") from None
        if pp < 1 or cp < 1:
            raise ValueError(f"layout {item!r}: PP and CP sizes must be >= 1")
        if (pp, cp) not in out:
            out.append((pp, cp))
    if not out:
        raise ValueError(f"--layouts lists no layout: {text!r}")
    return out


def layout_name(pp: int, cp: int) -> str:
    return f"{pp}x{cp}"


# ---- breakdown ---------------------------------------------------------------------------------------
def rank_rows(phases_ms: dict[str, float], ttft_ms: float) -> dict[str, float]:
    """One rank's exclusive phase times folded into the table rows, plus idle = TTFT - all marked time."""
    rows = {name: sum(phases_ms.get(p, 0.0) for p in names) for name, names in PHASE_ROWS}
    for p, ms in phases_ms.items():           # phases this table does not know yet still show up
        if p not in KNOWN_PHASES:
            rows[p] = rows.get(p, 0.0) + ms
    rows[IDLE_ROW] = max(0.0, ttft_ms - sum(phases_ms.values()))
    return rows


def breakdown(stats: dict, ttft_ms: float) -> dict:
    """Per-phase critical path (max over ranks) and mean over ranks from ``llm.stats()`` of a profiled run.

    ``ttft_ms`` is that run's wall time: each rank's idle is TTFT minus its marked (busy + PP wait) time.
    Returns {"rows": {row: {"max": ms, "mean": ms, "argmax_rank": r}}, "per_rank": {rank: {row: ms}},
    "busy_ms": {rank: ms without PP wait and idle}}.
    """
    per_rank = {int(r): rank_rows(s.get("phases_ms", {}), ttft_ms) for r, s in stats.items()}
    names: list[str] = []
    for rows in per_rank.values():
        names += [n for n in rows if n not in names]
    table = {}
    for n in names:
        vals = {r: rows.get(n, 0.0) for r, rows in per_rank.items()}
        arg = max(vals, key=vals.get)
        table[n] = {"max": vals[arg], "mean": statistics.fmean(vals.values()), "argmax_rank": arg}
    busy = {r: sum(v for k, v in rows.items() if k not in ("PP wait", IDLE_ROW)) for r, rows in per_rank.items()}
    return {"rows": table, "per_rank": per_rank, "busy_ms": busy}


def scaling_loss(base_rows: dict, rows: dict, world: int) -> list[tuple[str, float, float, float]]:
    """Where a layout loses against perfect scaling of the 1-GPU run, phase by phase.

    -> [(row, ideal_ms = 1-GPU ms / world, measured critical-path ms, excess ms)], biggest excess first.
    """
    out = []
    for name in dict.fromkeys([*base_rows, *rows]):
        ideal = base_rows.get(name, {}).get("max", 0.0) / world
        got = rows.get(name, {}).get("max", 0.0)
        out.append((name, ideal, got, got - ideal))
    return sorted(out, key=lambda t: -t[3])


# ---- bytes -------------------------------------------------------------------------------------------
def pp_bytes_per_rank(comm: dict) -> dict[int, int]:
    """pp_send bytes per rank of every non-last stage (rank -> bytes) from one prompt's comm counters
    ({rank: {"bytes": {kind: n}, "calls": {...}}}, as ``llm.stats()[rank]["comm"]``)."""
    out = {}
    for r, s in comm.items():
        b = s.get("bytes", {}).get("pp_send")
        if b:
            out[int(r)] = int(b)
    return out


def expected_pp_bytes(num_tokens: int, chunk: int, cp_size: int, hidden: int, elem_bytes: int) -> int:
    """Bytes one rank sends over one PP boundary for a scattered prefill: (hidden, residual) of its shard
    of every chunk (round-robin shards padded to a multiple of C)."""
    total, done = 0, 0
    while done < num_tokens:
        n = min(chunk, num_tokens - done)
        total += 2 * (-(-n // cp_size)) * hidden * elem_bytes
        done += n
    return total


# ---- floors and models -------------------------------------------------------------------------------
def causal_pairs(n: int) -> int:
    """(query, key) pairs the indexer scores for one n-token prompt: query at position p sees p+1 keys."""
    return n * (n + 1) // 2


def indexer_floor_ms(n: int, heads: int, dim: int, layers: int, tflops: float) -> float:
    """Roofline floor of the indexer logits on one GPU: 2 * pairs * H * D per layer at the fp8 ceiling."""
    return 2.0 * causal_pairs(n) * heads * dim * layers / (tflops * 1e12) * 1e3


def pipeline_makespan(chunk_costs: list[float], pp: int) -> float:
    """Time for ``pp`` equal stages to push chunks through in order (stage s takes cost/pp per chunk).

    The bubble model of chunked pipeline prefill: stage s starts chunk c when stage s-1 finished c and
    stage s finished c-1. With one stage it is the sum of the costs.
    """
    done = [0.0] * pp
    for cost in chunk_costs:
        t = cost / pp
        prev = 0.0
        for s in range(pp):
            start = max(done[s], prev)
            done[s] = start + t
            prev = done[s]
    return done[-1] if chunk_costs else 0.0


def chunk_costs(n: int, chunk: int, per_token_ms: float, per_pair_ms: float) -> list[float]:
    """Cost of each chunk of an n-token prompt: a linear part per token plus the indexer's causal pairs."""
    out, start = [], 0
    while start < n:
        end = min(n, start + chunk)
        pairs = causal_pairs(end) - causal_pairs(start)
        out.append((end - start) * per_token_ms + pairs * per_pair_ms)
        start = end
    return out


def pp_bound_speedup(n: int, chunk: int, pp: int, per_token_ms: float, per_pair_ms: float) -> float:
    """Best speedup PP stages alone can give at this chunk size (bubble only: no comm, perfect balance)."""
    costs = chunk_costs(n, chunk, per_token_ms, per_pair_ms)
    span = pipeline_makespan(costs, pp)
    return sum(costs) / span if span > 0 else 1.0


def equal_cost_bounds(n: int, k: int, per_token_ms: float, per_pair_ms: float, align: int = 64) -> list[int]:
    """Chunk end positions that give k chunks of (about) equal cost: what dynamic chunk sizing would do
    (later chunks shorter because every query there scores more keys). Ends are multiples of ``align``."""
    def cum(x: int) -> float:
        return x * per_token_ms + causal_pairs(x) * per_pair_ms
    total, ends = cum(n), []
    for i in range(1, k):
        lo, hi, target = 0, n, total * i / k
        while lo < hi:                                   # first x with cum(x) >= target
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if cum(mid) < target else (lo, mid)
        end = min(n, max(align, round(lo / align) * align))
        if not ends or end > ends[-1]:
            ends.append(end)
    return [e for e in ends if e < n] + [n]


def dynamic_pp_bound_speedup(n: int, chunk: int, pp: int, per_token_ms: float, per_pair_ms: float) -> float:
    """pp_bound_speedup with the same number of chunks as fixed ``chunk`` but equal-cost boundaries."""
    k = -(-n // chunk)
    ends = equal_cost_bounds(n, k, per_token_ms, per_pair_ms)
    costs, start = [], 0
    for end in ends:
        costs.append((end - start) * per_token_ms + (causal_pairs(end) - causal_pairs(start)) * per_pair_ms)
        start = end
    span = pipeline_makespan(costs, pp)
    return sum(costs) / span if span > 0 else 1.0


# breakdown rows whose cost grows with the causal (query, key) pairs
QUADRATIC_ROWS = ("indexer logits", "top-k", "fused indexer + top-k")


def fit_cost_model(base_rows: dict, n: int) -> tuple[float, float]:
    """Split a 1-GPU breakdown at length n into per-token and per-causal-pair costs (ms).

    Indexer logits and top-k (separate, or the fused indexer + top-k) grow with the causal pairs; everything
    else (GEMMs, MoE, sparse attention with its fixed top-k) with the tokens.
    """
    quad = sum(base_rows.get(k, {}).get("max", 0.0) for k in QUADRATIC_ROWS)
    lin = sum(v.get("max", 0.0) for k, v in base_rows.items() if k not in QUADRATIC_ROWS + (IDLE_ROW, "PP wait"))
    return lin / n, quad / causal_pairs(n)


# ---- formatting --------------------------------------------------------------------------------------
def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1024
    return f"{b:.2f} GiB"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---- the prefill bench's summary and report ---------------------------------------------------------
@dataclass
class PrefillSetup:
    """What the analysis of a prefill run needs besides its results: the grid and the model's sizes."""

    layouts: list[tuple[int, int]]
    lengths: list[int]
    key_len: int                          # the length of the breakdown tables and the scaling analysis
    chunk_size: int
    ablation_chunks: list[int]
    ablation_layout: tuple[int, int] | None
    ablation_len: int
    hidden_size: int
    elem_bytes: int
    index_n_heads: int
    index_head_dim: int


def find_run(results: dict, layout: str, n: int, variant: str = "baseline") -> dict | None:
    """The successful run of (layout, input length, variant), if any."""
    for e in results["runs"]:
        if e["layout"] == layout and e["input_len"] == n and e["variant"] == variant and e["status"] == "ok":
            return e
    return None


def summarize_prefill(results: dict, setup: PrefillSetup) -> dict:
    """Speedups vs 1x1, where each layout loses against perfect scaling, the pipeline-bubble bound, the PP
    boundary bytes and the ablation deltas, from the runs in ``results``."""
    s: dict = {"speedup": {}, "pp_bytes": {}, "ablations": [], "scaling_loss": {}, "pp_bound": {}}
    for n in setup.lengths:
        base = find_run(results, "1x1", n)
        for pp, cp in setup.layouts:
            e = find_run(results, layout_name(pp, cp), n)
            if base and e:
                sp = base["ttft_median_s"] / e["ttft_median_s"]
                s["speedup"].setdefault(layout_name(pp, cp), {})[str(n)] = {
                    "speedup": sp, "efficiency": sp / (pp * cp)}
    # where the time goes, relative to perfect scaling of 1x1, at the key length
    n = setup.key_len
    base = find_run(results, "1x1", n)
    if base and "breakdown" in base:
        per_token, per_pair = fit_cost_model(base["breakdown"]["rows"], n)
        for pp, cp in setup.layouts:
            e = find_run(results, layout_name(pp, cp), n)
            if e and "breakdown" in e and pp * cp > 1:
                s["scaling_loss"][e["layout"]] = scaling_loss(base["breakdown"]["rows"], e["breakdown"]["rows"], pp * cp)
            if pp > 1:
                s["pp_bound"][layout_name(pp, cp)] = {
                    str(c): {"fixed": pp_bound_speedup(n, c, pp, per_token, per_pair),
                             "equal_cost": dynamic_pp_bound_speedup(n, c, pp, per_token, per_pair)}
                    for c in sorted({setup.chunk_size, *setup.ablation_chunks})}
    # PP bytes and the ablations
    if setup.ablation_layout:
        lay = layout_name(*setup.ablation_layout)
        n = setup.ablation_len
        base = find_run(results, lay, n)
        for e in results["runs"]:
            if e["layout"] != lay or e["input_len"] != n or e["variant"] == "baseline":
                continue
            row = {"variant": e["variant"], "status": e["status"]}
            if e["status"] == "ok":
                row["ttft_s"] = e["ttft_median_s"]
                if base:
                    row["baseline_s"] = base["ttft_median_s"]
                    row["delta_s"] = e["ttft_median_s"] - base["ttft_median_s"]
                row["pp_send_bytes_per_rank"] = pp_bytes_per_rank(e.get("comm", {}))
            s["ablations"].append(row)
        if base:
            scat = pp_bytes_per_rank(base.get("comm", {}))
            gath = next((r for r in s["ablations"] if r["variant"] == "pp_transfer=gathered" and r["status"] == "ok"), None)
            s["pp_bytes"] = {
                "layout": lay, "input_len": n, "scattered_per_rank": scat,
                "expected_scattered": expected_pp_bytes(n, setup.chunk_size, setup.ablation_layout[1],
                                                          setup.hidden_size, setup.elem_bytes),
                "gathered_per_rank": gath["pp_send_bytes_per_rank"] if gath else None,
                "ttft_scattered_s": base["ttft_median_s"], "ttft_gathered_s": gath["ttft_s"] if gath else None}
    return s


def device_label(meta: dict) -> str:
    """'NVIDIA H200 x4' for GPUs; 'CPU (2 cores: AMD EPYC ...)' on CPU (not 'CPU x0')."""
    if meta.get("gpus"):
        return f"{meta.get('card')} x{meta['gpus']}"
    cores = meta.get("cpu_cores")
    name = meta.get("cpu_name")
    detail = ", ".join(x for x in (f"{cores} cores" if cores else None, name) if x)
    return f"CPU ({detail})" if detail else "CPU"


def format_prefill_report(results: dict, setup: PrefillSetup) -> str:
    """The Markdown report ``dsaserve bench prefill`` prints (the compact TTFT table last)."""
    m, s = results["meta"], results["summary"]
    out = ["", f"# dsaserve bench prefill — {device_label(m)}, {m['date']}, torch {m['torch']}, "
           f"{m['dtype']}, chunk {m['chunk_size']}, {m['repeats']} timed runs (median)", f"command: {m['command']}", ""]
    # breakdown at the key length per layout
    n = setup.key_len
    for pp, cp in setup.layouts:
        e = find_run(results, layout_name(pp, cp), n)
        if not e or "breakdown" not in e:
            continue
        rows = e["breakdown"]["rows"]
        out.append(f"## breakdown {e['layout']} at {n} tokens (profiled TTFT {e['profiled_ttft_s'] * 1e3:.0f} ms; "
                   f"ms, max over ranks = critical path / mean over ranks)")
        out.append(md_table(["phase", "max ms", "mean ms", "slowest rank"],
                              [[k, f"{v['max']:.1f}", f"{v['mean']:.1f}", v["argmax_rank"]] for k, v in rows.items()
                               if v["max"] > 0.05 or k == IDLE_ROW]))
        out.append("")
    for lay, loss in s.get("scaling_loss", {}).items():
        out.append(f"## {lay} vs perfect scaling of 1x1 at {n} tokens (ideal = 1x1 phase / world)")
        out.append(md_table(["phase", "ideal ms", "measured ms", "excess ms"],
                              [[k, f"{a:.1f}", f"{b:.1f}", f"{c:+.1f}"] for k, a, b, c in loss if abs(c) > 0.5 or b > 0.5]))
        out.append("")
    if s.get("pp_bound"):
        out.append(f"## pipeline-bubble bound at {n} tokens: best speedup the PP stages alone can give "
                   f"(fixed chunks / same chunk count with equal-cost boundaries = dynamic chunk sizing); "
                   f"x C = the layout's bound with perfect CP; cost model fitted on the 1x1 breakdown")
        out.append(md_table(["layout"] + [f"chunk {c}" for c in next(iter(s["pp_bound"].values()))],
                              [[lay] + [f"{v['fixed']:.2f}x / {v['equal_cost']:.2f}x (x C: {v['fixed'] * int(lay.split('x')[1]):.2f}x"
                                        f" / {v['equal_cost'] * int(lay.split('x')[1]):.2f}x)"
                                        for v in d.values()] for lay, d in s["pp_bound"].items()]))
        out.append("")
    floors = results.get("indexer_floor") or {}
    if floors:
        fp8 = results["ceilings"]["fp8_tflops"]
        out.append(f"## indexer logits floor (2 * causal pairs * {setup.index_n_heads} * {setup.index_head_dim} "
                   f"* layers / fp8 ceiling {fp8:.0f} TFLOPS measured here)")
        hdr = ["input", "floor 1 GPU ms"] + [f"{layout_name(pp, cp)} floor / measured" for pp, cp in setup.layouts]
        rows = []
        for k, f in floors.items():
            row = [k, f"{f['floor_ms_1gpu']:.1f}"]
            for pp, cp in setup.layouts:
                e = find_run(results, layout_name(pp, cp), int(k))
                brows = e["breakdown"]["rows"] if e and "breakdown" in e else {}
                got, mark = brows.get("indexer logits", {}).get("max"), ""
                if not got and brows.get("fused indexer + top-k", {}).get("max"):   # fused: logits + top-k
                    got, mark = brows["fused indexer + top-k"]["max"], " (fused with top-k)"
                fl = f["floor_ms_1gpu"] / (pp * cp)
                row.append(f"{fl:.1f} / {got:.1f}{mark}" if got else f"{fl:.1f} / -")
            rows.append(row)
        out.append(md_table(hdr, rows))
        out.append("")
    pb = s.get("pp_bytes")
    if pb:
        out.append(f"## PP boundary bytes per rank, {pb['layout']} at {pb['input_len']} tokens")
        sc = pb["scattered_per_rank"]
        ga = pb["gathered_per_rank"] or {}
        rows = []
        for r in sorted(set(sc) | set(ga)):
            ratio = f"{sc[r] / ga[r]:.3f}" if r in sc and ga.get(r) else "-"
            rows.append([r, fmt_bytes(sc.get(r, 0)), fmt_bytes(ga[r]) if r in ga else "-", ratio])
        out.append(md_table(["rank", "scattered", "gathered", "scattered / gathered"], rows))
        tg = pb.get("ttft_gathered_s")
        out.append(f"expected scattered per rank: {fmt_bytes(pb['expected_scattered'])}; TTFT scattered "
                   f"{pb['ttft_scattered_s']:.3f} s vs gathered " + (f"{tg:.3f} s ({(tg - pb['ttft_scattered_s']) * 1e3:+.0f} ms)"
                                                                      if tg else "-"))
        out.append("")
    if s.get("ablations"):
        lay = layout_name(*setup.ablation_layout)
        base = find_run(results, lay, setup.ablation_len)
        out.append(f"## ablations, {lay} at {setup.ablation_len} tokens (baseline: scattered PP, SM reservation auto, "
                   f"chunk {setup.chunk_size}" + (f": {base['ttft_median_s']:.3f} s)" if base else ")"))
        rows = []
        for a in s["ablations"]:
            if a["status"] != "ok":
                rows.append([a["variant"], a["status"], "-"])
            else:
                d = a.get("delta_s")
                rows.append([a["variant"], f"{a['ttft_s']:.3f}", f"{d * 1e3:+.0f} ms" if d is not None else "-"])
        out.append(md_table(["variant", "TTFT s", "vs baseline"], rows))
        out.append("dynamic chunk sizing: not in the runtime (fixed chunked_prefill_size); its modelled effect is "
                   "the 'equal-cost' column of the pipeline-bubble bound above")
        out.append("")
    # the compact table, last
    out.append("## TTFT (s, median) and speedup vs 1x1 in this run")
    hdr = ["layout", "GPUs"] + [str(n) for n in setup.lengths]
    rows = []
    for pp, cp in setup.layouts:
        lay = layout_name(pp, cp)
        row = [lay, pp * cp]
        for n in setup.lengths:
            e = next((x for x in results["runs"] if x["layout"] == lay and x["input_len"] == n
                      and x["variant"] == "baseline"), None)
            if e is None:
                row.append("-")
            elif e["status"] != "ok":
                row.append(e["status"])
            else:
                sp = s["speedup"].get(lay, {}).get(str(n))
                row.append(f"{e['ttft_median_s']:.3f}" + (f" ({sp['speedup']:.2f}x, {sp['efficiency'] * 100:.0f}%)" if sp and pp * cp > 1 else ""))
        rows.append(row)
    out.append(md_table(hdr, rows))
    return "\n".join(out)
