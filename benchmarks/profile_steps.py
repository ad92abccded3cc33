"""Where a prefill chunk and a decode step spend their GPU time: torch.profiler tables, per weight format.

For each ``--quantization`` (fp8, none) one eager single-GPU engine on the bench model (random weights):
  * prefill: one ``--prefill-len`` chunk (after an untimed one that pays the Triton compilations), profiled;
  * decode: per ``--batch-size``, ``--warmup-steps`` untimed then ``--steps`` profiled greedy steps at
    ``--context-len`` tokens of context (the requests share the prefilled prompt's first pages as prefix).
Writes, per (format, part): ``<part>_ops.txt`` (aten ops by device time incl. their kernels, with shapes),
``<part>_kernels.txt`` (kernels by device time) and a summary JSON (wall time, summed kernel time, kernel
count per step). Kernel sums below the wall time = host-bound gaps (launches, Python, syncs).

    python benchmarks/profile_steps.py --out OUTDIR [--quantization fp8,none] [--prefill-len 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dsaserve.bench.common import shutdown_llm  # noqa: E402
from dsaserve.runtime.plan import PlanEntry, SampleSpec, StepPlan  # noqa: E402

_REQ = 1 << 40


def _device_events(prof):
    """(name, device us) of every kernel / memcpy / memset in the profile."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out.append((e.name, e.device_time if hasattr(e, "device_time") else e.cuda_time))
    return out


def _write_tables(prof, out_dir: str, part: str, steps: int, wall_s: float) -> dict:
    sort = "device_time_total"
    with open(os.path.join(out_dir, f"{part}_ops.txt"), "w") as f:
        f.write(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=60, max_name_column_width=60,
                                                                   max_shapes_column_width=90))
    with open(os.path.join(out_dir, f"{part}_opcounts.txt"), "w") as f:   # which torch ops launch the most
        f.write(prof.key_averages().table(sort_by="count", row_limit=60, max_name_column_width=60))
    kern: dict[str, list[float]] = {}
    for name, us in _device_events(prof):
        k = kern.setdefault(name, [0, 0.0])
        k[0] += 1
        k[1] += us
    total = sum(v[1] for v in kern.values())
    rows = sorted(kern.items(), key=lambda kv: -kv[1][1])
    with open(os.path.join(out_dir, f"{part}_kernels.txt"), "w") as f:
        f.write(f"{part}: wall {wall_s * 1e3 / steps:.3f} ms/step, kernels {total / 1e3 / steps:.3f} ms/step, "
                f"{sum(v[0] for v in kern.values()) / steps:.0f} launches/step\n")
        f.write(f"{'ms/step':>9} {'%':>6} {'count/step':>10}  kernel\n")
        for name, (n, us) in rows[:80]:
            f.write(f"{us / 1e3 / steps:9.3f} {100 * us / max(total, 1e-9):6.2f} {n / steps:10.1f}  {name[:160]}\n")
    summary = {"wall_ms_per_step": wall_s * 1e3 / steps, "kernel_ms_per_step": total / 1e3 / steps,
               "launches_per_step": sum(v[0] for v in kern.values()) / steps,
               "top": [(name[:120], round(us / 1e3 / steps, 4), n / steps) for name, (n, us) in rows[:25]]}
    print(f"  {part}: wall {summary['wall_ms_per_step']:.3f} ms/step, kernels {summary['kernel_ms_per_step']:.3f} "
          f"ms/step, {summary['launches_per_step']:.0f} launches/step", flush=True)
    for name, ms, n in summary["top"][:12]:
        print(f"    {ms:9.3f} ms  x{n:6.1f}  {name[:110]}", flush=True)
    return summary


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _run(ex, plan):
    return ex.wait(ex.submit(plan))


def _profile_late_chunks(a, ex, alloc, engine, quantization: str, out_dir: str, nxt) -> dict:
    """Prefill chunks of ``--chunk-len`` tokens that end at ``--chunk-context`` tokens of context: what a
    long prompt's chunk costs while other requests decode (the serving ITL check). The context is filled in
    ``--prefill-len`` chunks first (untimed)."""
    res = {}
    pages: list[int] = []
    alloc.grow(pages, a.chunk_context)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, engine.cfg.vocab_size, (a.chunk_context,), generator=g).tolist()
    for s in range(0, a.chunk_context, a.prefill_len):
        e = min(a.chunk_context, s + a.prefill_len)
        _run(ex, StepPlan(nxt(), False, [PlanEntry(_REQ + 999, prompt[s:e], s, list(pages))]))
    for n in a.chunk_len:
        start = a.chunk_context - n
        chunk = lambda: StepPlan(nxt(), False, [PlanEntry(_REQ + 999, prompt[start:], start, list(pages))])  # noqa: E731
        for _ in range(2):
            _run(ex, chunk())                                                  # compiles, warms
        _sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            t = time.perf_counter()
            for _ in range(3):
                _run(ex, chunk())
            _sync()
            wall = time.perf_counter() - t
        res[f"chunk{n}_at{a.chunk_context}"] = _write_tables(prof, out_dir,
                                                             f"{quantization}_chunk{n}_at{a.chunk_context}", 3, wall)
        del prof
    alloc.free(pages)
    return res


def profile_format(a, quantization: str, out_dir: str) -> dict:
    from dsaserve.engine.engine import LLMEngine

    ps = 64
    ctx = a.context_len // ps * ps
    bmax = max(a.batch_size)
    steps = a.warmup_steps + a.steps + 2
    own = -(-(steps + 1) // ps) + 1
    kv_tokens = a.prefill_len + a.chunk_context + bmax * own * ps + 8 * ps
    t0 = time.perf_counter()
    engine = LLMEngine(a.config, pp_size=1, cp_size=1, device=a.device, dtype=a.dtype, load_format="random",
                       weights_seed=0, max_num_seqs=bmax, max_model_len=max(a.prefill_len, a.chunk_context) + steps + ps,
                       kv_cache_tokens=kv_tokens, page_size=ps, quantization=quantization,
                       moe_backend=a.moe_backend, enforce_eager=not a.graphs, skip_warmup=True,
                       chunked_prefill_size=a.prefill_len)
    res: dict = {"engine_start_s": round(time.perf_counter() - t0, 1)}
    try:
        ex, alloc = engine.executor, engine.scheduler.allocator
        pages: list[int] = []
        alloc.grow(pages, a.prefill_len)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(2, engine.cfg.vocab_size, (a.prefill_len,), generator=g).tolist()
        step = [_REQ]

        def nxt():
            step[0] += 1
            return step[0]

        prefill = lambda: StepPlan(nxt(), False, [PlanEntry(_REQ, prompt, 0, list(pages))])  # noqa: E731
        t = time.perf_counter()
        _run(ex, prefill())                                                   # compiles
        res["first_prefill_s"] = round(time.perf_counter() - t, 2)
        _sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            t = time.perf_counter()
            _run(ex, prefill())
            _sync()
            wall = time.perf_counter() - t
        res["prefill"] = _write_tables(prof, out_dir, f"{quantization}_prefill{a.prefill_len}", 1, wall)
        del prof
        if a.chunk_context:
            res.update(_profile_late_chunks(a, ex, alloc, engine, quantization, out_dir, nxt))
        prefix = pages[: ctx // ps]
        for b in a.batch_size:
            tables = []
            for _ in range(b):
                mine: list[int] = []
                alloc.grow(mine, steps + ps)
                tables.append(list(prefix) + mine)
            tokens = [(prompt[ctx - 1] + 7919 * i) % engine.cfg.vocab_size for i in range(b)]  # rows differ

            def decode(t_idx):
                pos = ctx + t_idx
                plan = StepPlan(nxt(), True, [PlanEntry(_REQ + 1 + i, [tokens[i]], pos, tables[i][: pos // ps + 1],
                                                        SampleSpec(0.0, 1.0, -1, i, t_idx, None)) for i in range(b)])
                out = _run(ex, plan)
                got = {o.req_id: o.token_id for o in out}
                for i in range(b):
                    tokens[i] = got.get(_REQ + 1 + i, tokens[i])

            for t_idx in range(a.warmup_steps):
                decode(t_idx)
            _sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                t = time.perf_counter()
                for t_idx in range(a.warmup_steps, a.warmup_steps + a.steps):
                    decode(t_idx)
                _sync()
                wall = time.perf_counter() - t
            tag = "_graphs" if a.graphs else ""
            res[f"decode_b{b}"] = _write_tables(prof, out_dir, f"{quantization}_decode_b{b}_ctx{ctx}{tag}", a.steps, wall)
            del prof
            for tb in tables:
                alloc.free(tb[len(prefix):])
    finally:
        shutdown_llm(engine)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "benchmarks", "configs", "dsv32_8layer_32e.json"),
                   help="model config .json (random weights)")
    p.add_argument("--quantization", default="fp8,none", help="weight formats, comma-separated (fp8, none)")
    p.add_argument("--prefill-len", type=int, default=16384, help="tokens of the profiled prefill chunk")
    p.add_argument("--context-len", type=int, default=4096, help="decode context (rounded down to 64-token pages)")
    p.add_argument("--batch-size", default="1,32", help="decode batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=5, help="profiled decode steps per batch size")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps before them")
    p.add_argument("--moe-backend", default="grouped", help="routed experts backend")
    p.add_argument("--graphs", action="store_true",
                   help="decode through the engine's CUDA graphs (captured at start for batch buckets up to the "
                        "largest --batch-size): the profile is of graph replays, at the GPU clock a busy step runs "
                        "at (eager steps leave the GPU idle between launches, which slows every short kernel)")
    p.add_argument("--chunk-context", type=int, default=0,
                   help="also profile prefill chunks that end at this many tokens of context (0: off)")
    p.add_argument("--chunk-len", default="512,256", help="with --chunk-context: chunk lengths, comma-separated")
    p.add_argument("--device", default="cuda", help="cuda (or cpu for a dry run)")
    p.add_argument("--dtype", default="bfloat16", help="model dtype")
    p.add_argument("--out", required=True, help="output folder")
    a = p.parse_args()
    a.batch_size = [int(x) for x in a.batch_size.split(",")]
    a.chunk_len = [int(x) for x in a.chunk_len.split(",")]
    os.makedirs(a.out, exist_ok=True)
    results = {"card": torch.cuda.get_device_name(0) if a.device == "cuda" else "CPU", "torch": torch.__version__, "config": a.config,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "formats": {}}
    for q in a.quantization.split(","):
        print(f"== {q}", flush=True)
        results["formats"][q] = profile_format(a, q, a.out)
        with open(os.path.join(a.out, "profile_steps.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
