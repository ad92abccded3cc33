"""``dsaserve bench decode``: the time of one decode step per (layout, context length, batch size, graphs on/off),
beside the weight-read floor of the same run.

    dsaserve bench decode --config benchmarks/configs/dsv32_8layer_32e.json --batch-size 1,8,32,64 \\
        --context-len 4096,32768 --steps 64 --graphs on,off --out decode.json

Per (layout, graphs mode) one engine (``--graphs off`` = ``enforce_eager``). Per context length C the bench
prefills ONE prompt of C tokens (C rounded down to whole KV pages) and every request of a batch shares its
pages as its prefix (block tables name the same pages; each request writes its new tokens into pages of its
own), so a batch of 64 at 32K costs one 32K prefill. Then, per batch size B and ``--scheduling`` mode:
``--warmup-steps`` untimed decode steps, then ``--steps`` timed ones, each fed the greedy tokens of the one
before. A step's time is the wall time from one step's tokens reaching the host to the next one's (inputs,
forward, sampling, the copy back, and the host's own work between steps). ``sync``: each step is submitted
after the tokens of the one before are on the host (``--sync-scheduling``); ``async`` (the engine's default
in one process): the next step is submitted while the current one runs, its token ids fed from the current
step's samples on the device (``StepPlan.fed_from``), so the host's work overlaps the GPU's.

The floor: bytes one decode step must read, over the copy bandwidth measured in the same run (device to
device copy; read + write bytes / time). Bytes: every weight of every attention and indexer, dense MLP,
router, shared expert, final norm and lm_head (counted from the parameters of the model built on the meta
device with the run's backends, so fp8 weights count as fp8), the routed experts the batch routes to (the
distinct experts per layer, measured on a probe step in a single-process run, else the expectation under
uniform routing), and the cache rows attended: min(index_topk, context) latent rows and the whole context
of indexer keys per request and layer. Under CP each rank reads 1/C of the experts; pipeline stages run one
after another, so the floor of a layout is the sum over its stages of one rank's bytes.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import os
import pstats
import statistics
import sys
import time
import traceback
from collections import deque

import torch

from dsaserve.args import MOE_BACKENDS, QUANTIZATIONS
from dsaserve.bench import report as R
from dsaserve.bench.common import REPO_ROOT, command_line, is_oom, save_json_atomic, shutdown_llm

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "benchmarks", "configs", "dsv32_8layer_32e.json")
_REQ_BASE = 1 << 40          # request ids of the bench's synthetic requests (never the scheduler's)
_STEP_BASE = 1 << 40         # step ids likewise


# ---- CLI -------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="model config .json (random weights) or a checkpoint folder (default: the 8-layer DSV3.2 "
                        "bench model)")
    p.add_argument("--model", default=None, help="a checkpoint folder (same as --config DIR)")
    p.add_argument("--batch-size", default="1,8,32,64", help="decode batch sizes, comma-separated")
    p.add_argument("--context-len", default="4096,32768", help="tokens already in the cache per request (rounded "
                                                               "down to whole pages), comma-separated")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per (context, batch) (default 64)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps before the timed ones")
    p.add_argument("--layouts", default="1x1", help="PPxCP layouts, comma-separated (default 1x1)")
    p.add_argument("--scheduling", default="async",
                   help="async, sync or async,sync: decode steps queued back to back with their tokens fed on the "
                        "device (async, the engine's default in one process; multi-process layouts run sync), "
                        "or each one after the previous step's tokens reached the host (sync)")
    p.add_argument("--graphs", default=None,
                   help="on, off or on,off: decode with CUDA graphs and/or eagerly (--enforce-eager); default: "
                        "on,off on CUDA, off on CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--attention-backend", default="auto", help="auto | reference | triton")
    p.add_argument("--indexer-mode", default="auto", help="exact | fp8 | auto (fp8 on cuda)")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="linear and routed-expert weights: fp8 = e4m3 128x128 blocks, none = the model dtype, "
                        "auto = the config's quantization_config (see dsaserve serve --help)")
    p.add_argument("--moe-backend", default="auto", choices=MOE_BACKENDS,
                   help="routed experts backend (see dsaserve serve --help; default: %(default)s)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt token ids")
    p.add_argument("--comm-timeout-s", type=float, default=600.0, help="engine collective timeout")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no new measurement after this many seconds (what is done is still reported)")
    p.add_argument("--out", default=None, help="write every number as JSON here (rewritten after each measurement)")
    p.add_argument("--host-profile", default=None,
                   help="append a cProfile of the host side of each measurement's timed steps (top functions by "
                        "own time) to this text file: where a step's time goes besides the GPU's")


def run(args: argparse.Namespace) -> int:
    try:
        bench = DecodeBench(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = bench.run()
    ok = [r for r in results["runs"] if r["status"] == "ok"]
    return 0 if ok else 1


# ---- the floor (pure) --------------------------------------------------------------------------------------
def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def weight_bytes(model) -> dict:
    """Bytes of the weights a decode step reads, by part, from a whole model (built on any device, "meta"
    included): {"attention": [per layer], "dense_mlp": [...], "router": [...], "shared_experts": [...],
    "routed_experts_each": [bytes of ONE routed expert per MoE layer, 0 elsewhere], "n_experts": E,
    "head": final norm + lm_head}."""
    out = {"attention": [], "dense_mlp": [], "router": [], "shared_experts": [], "routed_experts_each": [],
           "n_experts": 0}
    for layer in model.layers.values():
        out["attention"].append(_nbytes(layer.self_attn) + _nbytes(layer.input_layernorm)
                                + _nbytes(layer.post_attention_layernorm))
        mlp = layer.mlp
        if layer.is_moe:
            out["dense_mlp"].append(0)
            out["router"].append(_nbytes(mlp.gate))
            out["shared_experts"].append(_nbytes(mlp.shared_experts) if mlp.shared_experts is not None else 0)
            out["routed_experts_each"].append(_nbytes(mlp.experts) / mlp.n_experts)
            out["n_experts"] = mlp.n_experts
        else:
            out["dense_mlp"].append(_nbytes(mlp))
            out["router"].append(0)
            out["shared_experts"].append(0)
            out["routed_experts_each"].append(0)
    out["head"] = _nbytes(model.norm) + _nbytes(model.lm_head)
    return out


def expected_distinct_experts(n_experts: int, per_token: int, batch: int) -> float:
    """E * (1 - (1 - k/E)^B): distinct experts B tokens reach when each picks k of E uniformly."""
    return n_experts * (1.0 - (1.0 - per_token / n_experts) ** batch)


def step_bytes(cfg, weights: dict, *, batch: int, context: int, elem_bytes: int, index_fp8: bool, cp: int,
               distinct: list[float]) -> dict:
    """Bytes one decode step reads on one rank of each stage, summed over the stages (see the module doc).

    ``distinct``: distinct routed experts per layer (0 on dense layers); ``context``: keys each request sees."""
    kv_rows = batch * min(cfg.index_topk, context)
    latent = sum(kv_rows * cfg.kv_cache_dim * elem_bytes for _ in weights["attention"])
    index_row = (cfg.index_head_dim + 4) if index_fp8 else cfg.index_head_dim * elem_bytes
    index_layers = sum(1 for i in range(cfg.num_hidden_layers) if cfg.has_indexer(i))
    parts = {
        "attention_weights": sum(weights["attention"]),
        "dense_mlp_weights": sum(weights["dense_mlp"]),
        "router_weights": sum(weights["router"]),
        "shared_expert_weights": sum(weights["shared_experts"]) / cp,
        "routed_expert_weights": sum(e * d for e, d in zip(weights["routed_experts_each"], distinct)) / cp,
        "head_weights": weights["head"],
        "kv_latent_rows": latent,
        "indexer_key_rows": batch * context * index_row * index_layers,
    }
    parts["total"] = sum(parts.values())
    return parts


def measure_copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s ((read + write) bytes / time), median of repeats."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(12):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            e.synchronize()
            dt = s.elapsed_time(e) / 1e3
        else:
            t = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t
        if i >= 2:
            times.append(dt)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def agreement(runs: list[dict], field: str, a: str, b: str) -> list[dict]:
    """Per (layout, context, batch, the other mode) measured with ``field`` = a AND b: whether the greedy tokens
    are identical, else the first step and request where they part."""
    other = "scheduling" if field == "graphs" else "graphs"
    by = {}
    for r in runs:
        if r["status"] == "ok" and r.get("greedy_tokens") is not None:
            key = (r["layout"], r["context_len"], r["batch_size"], r.get(other, "sync"))
            by.setdefault(key, {})[r.get(field, "sync")] = r["greedy_tokens"]
    out = []
    for (layout, ctx, batch, mode), modes in sorted(by.items()):
        if a not in modes or b not in modes:
            continue
        x_all, y_all = modes[a], modes[b]
        first = next(((t, i) for t, (x, y) in enumerate(zip(x_all, y_all)) for i, (u, v) in enumerate(zip(x, y))
                      if u != v), None)
        out.append({"compared": f"{field} {a} vs {b}", "layout": layout, "context_len": ctx, "batch_size": batch,
                    other: mode, "steps": min(len(x_all), len(y_all)),
                    "identical": first is None and len(x_all) == len(y_all),
                    "first_difference": None if first is None else {"step": first[0], "request": first[1]}})
    return out


def graphs_agreement(runs: list[dict]) -> list[dict]:
    """Greedy tokens with graphs on vs off, and with async vs sync scheduling (see ``agreement``)."""
    return agreement(runs, "graphs", "on", "off") + agreement(runs, "scheduling", "async", "sync")


def format_report(results: dict) -> str:
    m = results["meta"]
    lines = [f"bench decode: {m['card']} x{m['gpus']}  {m['dtype']}  model {os.path.basename(m['config'])}  "
             f"copy bandwidth {results['copy_bandwidth_gbps']:.0f} GB/s",
             "layout  context  batch  graphs  sched |  ms/step median    p99 |  tokens/s | floor ms  x floor | "
             "host prep ms"]
    for r in results["runs"]:
        head = (f"{r['layout']:>6} {r['context_len']:>8} {r['batch_size']:>6} {r['graphs']:>7} "
                f"{r.get('scheduling', 'sync'):>6} |")
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}")
            continue
        f = r["floor"]
        prep = r.get("host_prepare_ms")
        lines.append(f"{head} {r['step_ms']['median']:>15.2f} {r['step_ms']['p99']:>6.2f} | "
                     f"{r['tokens_per_s']:>9.1f} | {f['floor_ms']:>8.3f} {r['floor_ratio']:>8.1f} | "
                     f"{'-' if prep is None else f'{prep:.3f}':>12}")
    for a in results.get("graphs_agreement", []):
        verdict = "identical" if a["identical"] else f"DIFFER from step {a['first_difference']['step']}"
        other = f"scheduling {a['scheduling']}" if "scheduling" in a else f"graphs {a.get('graphs')}"
        lines.append(f"greedy tokens, {a['compared']} ({other}), {a['layout']} ctx {a['context_len']} B "
                     f"{a['batch_size']}: {verdict} ({a['steps']} steps x {a['batch_size']} requests)")
    return "\n".join(lines)


# ---- the bench -------------------------------------------------------------------------------------------
class DecodeBench:
    """Runs every (layout, graphs mode) engine and its measurements; ``results`` is the JSON."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.monotonic()
        self.model_path = args.model or args.config
        if not os.path.exists(self.model_path):
            raise FileNotFoundError(f"--config/--model {self.model_path!r} does not exist")
        self.batches = sorted(set(R.parse_int_list(args.batch_size, "--batch-size")))
        self.contexts = sorted(set(R.parse_int_list(args.context_len, "--context-len")))
        self.layouts = R.parse_layouts(args.layouts)
        if args.steps < 1 or args.warmup_steps < 0:
            raise ValueError("--steps must be >= 1 and --warmup-steps >= 0")
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no GPU; use --device cpu")
        modes = args.graphs or ("on,off" if self.device.startswith("cuda") else "off")
        self.modes = [m.strip() for m in modes.split(",") if m.strip()]
        if not self.modes or any(m not in ("on", "off") for m in self.modes):
            raise ValueError(f"--graphs must be on, off or on,off, got {modes!r}")
        self.schedulings = [m.strip() for m in args.scheduling.split(",") if m.strip()]
        if not self.schedulings or any(m not in ("async", "sync") for m in self.schedulings):
            raise ValueError(f"--scheduling must be async, sync or async,sync, got {args.scheduling!r}")
        self.dtype = args.dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        from dsaserve.config import read_model_config

        self.load_format = "random" if os.path.isfile(self.model_path) else "auto"
        self.cfg = read_model_config(self.model_path, self.load_format)
        self.elem_bytes = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        self.results: dict = {"meta": self._meta(), "copy_bandwidth_gbps": None, "runs": []}

    def _meta(self) -> dict:
        a = self.args
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": command_line(), "config": self.model_path, "device": self.device, "dtype": self.dtype,
                "torch": torch.__version__, "batch_sizes": self.batches, "context_lens": self.contexts,
                "steps": a.steps, "warmup_steps": a.warmup_steps, "layouts": [R.layout_name(*lc) for lc in self.layouts],
                "graphs": self.modes, "scheduling": self.schedulings, "attention_backend": a.attention_backend, "indexer_mode": a.indexer_mode,
                "quantization": a.quantization, "moe_backend": a.moe_backend, "weights_seed": a.weights_seed}
        if self.device.startswith("cuda"):
            props = torch.cuda.get_device_properties(0)
            meta.update(card=props.name, gpus=torch.cuda.device_count(),
                        gpu_mem_gib=round(props.total_memory / 2**30, 1))
        else:
            meta.update(card="CPU", gpus=0)
        return meta

    def _log(self, msg: str) -> None:
        print(f"[bench decode {time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    def _save(self) -> None:
        if self.args.out:
            save_json_atomic(self.args.out, self.results)

    def _over_deadline(self) -> bool:
        d = self.args.deadline_s
        return d is not None and time.monotonic() - self.t0 > d

    # ---- engines ----------------------------------------------------------------------------------------
    def _page_size(self) -> int:
        return 64

    def _contexts_in_pages(self) -> list[int]:
        ps = self._page_size()
        return sorted({max(ps, c // ps * ps) for c in self.contexts})

    def _make_engine(self, pp: int, cp: int, graphs: str):
        from dsaserve.engine.engine import LLMEngine

        a, ps = self.args, self._page_size()
        steps = a.steps + a.warmup_steps + 2
        ctx = max(self._contexts_in_pages())
        own = -(-(steps + 1) // ps) + 1                        # pages of its own per request
        kv_tokens = ctx + max(self.batches) * own * ps + 4 * ps
        opts = dict(load_format=self.load_format, weights_seed=a.weights_seed, max_num_seqs=max(self.batches),
                    max_model_len=ctx + steps + ps, kv_cache_tokens=kv_tokens, page_size=ps,
                    attention_backend=a.attention_backend, indexer_mode=a.indexer_mode,
                    quantization=a.quantization, moe_backend=a.moe_backend, comm_timeout_s=a.comm_timeout_s,
                    enforce_eager=(graphs == "off"), skip_warmup=True)
        return LLMEngine(self.model_path, pp_size=pp, cp_size=cp, device=self.device, dtype=self.dtype, **opts)

    def run(self) -> dict:
        dev = torch.device(self.device)
        self.results["copy_bandwidth_gbps"] = round(measure_copy_bandwidth(dev), 1)
        self._log(f"copy bandwidth {self.results['copy_bandwidth_gbps']} GB/s on {self.results['meta']['card']}")
        self._weights = self._weight_bytes()
        for pp, cp in self.layouts:
            for graphs in self.modes:
                self.run_engine(pp, cp, graphs)
        self.results["graphs_agreement"] = graphs_agreement(self.results["runs"])
        self._save()
        print(format_report(self.results), flush=True)
        return self.results

    def _weight_bytes(self) -> dict | None:
        """Weight bytes from the whole model on the meta device with the run's weight format and experts backend
        (or, when one of them cannot be built there, unquantized with the loop experts: the same bytes unless
        the weights are fp8)."""
        from dsaserve.model.backends import resolve_quantization, select_backends
        from dsaserve.model.deepseek_v32 import DSAModel

        a = self.args
        dtype = getattr(torch, self.dtype)
        tries = [(resolve_quantization(a.quantization, self.cfg), a.moe_backend), ("none", "loop")]
        for i, (quantization, experts) in enumerate(tries):
            try:
                backends = select_backends(attention=a.attention_backend, indexer=a.indexer_mode,
                                           quantization=quantization, experts=experts, device=self.device,
                                           dtype=dtype)
                model = DSAModel(self.cfg, backends=backends, dtype=dtype, device="meta")
            except Exception as e:  # a backend that cannot be built on meta: try the plain ones
                self._log(f"weights not countable with quantization={quantization}, experts={experts} on the "
                          f"meta device ({type(e).__name__}: {e})")
                continue
            self._index_fp8 = backends.indexer.fp8
            self.results["meta"]["floor_weights_counted_with"] = {"quantization": quantization,
                                                                  "experts": backends.experts.name, "exact": i == 0}
            return weight_bytes(model)
        self._index_fp8 = self.device.startswith("cuda")
        return None

    def run_engine(self, pp: int, cp: int, graphs: str) -> None:
        layout = R.layout_name(pp, cp)
        if self.device.startswith("cuda") and pp * cp > torch.cuda.device_count():
            for c in self._contexts_in_pages():
                for b in self.batches:
                    for sched in self.schedulings:
                        self._record(layout, c, b, graphs, f"skipped ({pp * cp} GPUs needed)", scheduling=sched)
            return
        engine = None
        try:
            self._log(f"{layout} graphs {graphs}: starting engine")
            engine = self._make_engine(pp, cp, graphs)
            for c in self._contexts_in_pages():
                self.run_context(engine, layout, c, graphs)
        except Exception as e:
            status = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            self._log(f"{layout} graphs {graphs}: {status}")
            if not is_oom(e):
                traceback.print_exc()
            done = {(r["context_len"], r["batch_size"], r["scheduling"]) for r in self.results["runs"]
                    if r["layout"] == layout and r["graphs"] == graphs}
            for c in self._contexts_in_pages():
                for b in self.batches:
                    for sched in self.schedulings:
                        if (c, b, sched) not in done:
                            self._record(layout, c, b, graphs, status, scheduling=sched)
        finally:
            shutdown_llm(engine)

    def run_context(self, engine, layout: str, context: int, graphs: str) -> None:
        from dsaserve.runtime.plan import PlanEntry, StepPlan

        alloc, ps = engine.scheduler.allocator, engine.args.page_size
        prefix: list[int] = []
        alloc.grow(prefix, context)
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + context)
        prompt = torch.randint(2, self.cfg.vocab_size, (context,), generator=g).tolist()
        try:
            chunk = engine.args.chunked_prefill_size
            for s in range(0, context, chunk):
                e = min(context, s + chunk)
                plan = StepPlan(self._next_step(), False, [PlanEntry(_REQ_BASE, prompt[s:e], s, prefix[: -(-e // ps)])])
                engine.executor.wait(engine.executor.submit(plan))
            for b in self.batches:
                for sched in self.schedulings:
                    if self._over_deadline():
                        self._record(layout, context, b, graphs, "skipped (deadline)", scheduling=sched)
                        continue
                    if sched == "async" and not getattr(engine.executor, "feeds_tokens", False):
                        self._record(layout, context, b, graphs, "skipped (multi-process layouts run sync)",
                                     scheduling=sched)
                        continue
                    try:
                        self.measure(engine, layout, context, b, graphs, sched, prefix, prompt[-1])
                    except Exception as e:
                        if not is_oom(e):
                            raise
                        self._record(layout, context, b, graphs, "OOM", scheduling=sched)
        finally:
            alloc.free(prefix)

    def _next_step(self) -> int:
        self._step = getattr(self, "_step", _STEP_BASE) + 1
        return self._step

    def measure(self, engine, layout: str, context: int, batch: int, graphs: str, scheduling: str, prefix: list[int],
                first_token: int) -> None:
        from dsaserve.runtime.plan import FED_TOKEN, PlanEntry, SampleSpec, StepPlan

        a, alloc, ps = self.args, engine.scheduler.allocator, engine.args.page_size
        total = a.warmup_steps + a.steps + 1
        tables = []
        for _ in range(batch):
            own: list[int] = []
            alloc.grow(own, total + ps)
            tables.append(list(prefix) + own)
        # each request its own first token (the last prompt token, shifted), so the rows of a batch decode
        # different sequences and route to different experts, as real requests do
        tokens = [(first_token + 7919 * i) % self.cfg.vocab_size for i in range(batch)]
        greedy: list[list[int]] = []                             # [step][request]: graphs on / off compared
        ex = engine.executor
        runner = getattr(ex, "runner", None)                    # single process: the runner is reachable
        distinct, routing = None, "expected (uniform routing)"
        times: list[float] = []
        prep: list[float] = []
        inputs = getattr(runner, "decode_inputs", None)
        ahead0 = (inputs.ahead_hits, inputs.ahead_misses) if inputs is not None else None
        profiler = cProfile.Profile() if a.host_profile else None
        fed = scheduling == "async"
        inflight: deque = deque()            # (step index, handle) submitted, tokens not back yet
        last_back: float | None = None       # when the latest step's tokens reached the host
        prev_step: int | None = None         # the latest submitted plan: the source of a fed plan's tokens

        def take(out) -> None:                  # a step's sampled tokens feed the next unfed plan; kept per step
            nonlocal tokens
            got = {tok.req_id: tok.token_id for tok in out}
            tokens = [got.get(_REQ_BASE + i, tokens[i]) for i in range(batch)]
            greedy.append(list(tokens))

        def collect() -> None:
            nonlocal last_back
            t_done, handle = inflight.popleft()
            out = ex.wait(handle)
            now = time.perf_counter()
            if t_done > a.warmup_steps and last_back is not None:
                times.append(now - last_back)
                if runner is not None and runner.host_prepare_s:
                    prep.append(runner.host_prepare_s[-1])
            last_back = now
            take(out)

        try:
            for t in range(total):
                pos = context + t
                feed = fed and prev_step is not None
                plan = StepPlan(self._next_step(), True, [
                    PlanEntry(_REQ_BASE + i, [FED_TOKEN if feed else tokens[i]], pos, tables[i][: pos // ps + 1],
                              SampleSpec(0.0, 1.0, -1, i, t, None)) for i in range(batch)],
                    fed_from=prev_step if feed else None)
                prev_step = plan.step_id
                if t == 0 and runner is not None:                # untimed: eager, with hooks on the routers
                    distinct, out = self._probe_routing(runner, plan)
                    routing = "measured (probe step)"
                    take(out)
                    continue
                if profiler is not None and t == a.warmup_steps + 1:
                    profiler.enable()
                inflight.append((t, ex.submit(plan)))
                if not fed or len(inflight) == 2:    # async: one step queued behind the running one
                    collect()
            while inflight:
                collect()
        finally:
            if profiler is not None:
                profiler.disable()
            while inflight:                          # an error: let the queued steps end before the pages go
                try:
                    collect()
                except Exception:
                    inflight.clear()
            for tb in tables:
                own = tb[len(prefix):]
                alloc.free(own)
        if profiler is not None:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
            with open(a.host_profile, "a") as f:
                f.write(f"==== {layout} ctx {context} B {batch} graphs {graphs} {scheduling}: {len(times)} steps\n"
                        f"{text.getvalue()}\n")
        ahead = None
        if ahead0 is not None:     # steps whose inputs were staged while the step before ran (see DecodeInputs)
            ahead = {"hits": inputs.ahead_hits - ahead0[0], "misses": inputs.ahead_misses - ahead0[1]}
        self._record(layout, context, batch, graphs, "ok", scheduling=scheduling, times=times, prep=prep,
                     distinct=distinct, routing=routing, runner=runner, greedy=greedy, ahead=ahead)

    def _probe_routing(self, runner, plan):
        """Run ``plan`` eagerly with hooks on the routers -> (distinct routed experts per layer, its tokens)."""
        seen: dict[int, set] = {}
        hooks = []
        for idx, layer in runner.model.layers.items():
            if layer.is_moe:
                def hook(module, inputs, output, idx=int(idx)):
                    ids = output[0][: len(plan.entries)]
                    seen.setdefault(idx, set()).update(ids.flatten().tolist())
                hooks.append(layer.mlp.gate.register_forward_hook(hook))
        use = runner.use_graphs
        runner.use_graphs = False
        try:
            out = runner.execute_local(plan)
        finally:
            runner.use_graphs = use
            for h in hooks:
                h.remove()
        return [float(len(seen.get(i, ()))) for i in range(self.cfg.num_hidden_layers)], out

    def _record(self, layout: str, context: int, batch: int, graphs: str, status: str, *, scheduling: str = "sync",
                times=None, prep=None, distinct=None, routing=None, runner=None, greedy=None, ahead=None) -> dict:
        entry = {"layout": layout, "context_len": context, "batch_size": batch, "graphs": graphs,
                 "scheduling": scheduling, "status": status}
        if status == "ok":
            med = statistics.median(times)
            entry["step_ms"] = {"median": round(med * 1e3, 4), "p99": round(R.percentile(times, 99) * 1e3, 4),
                                "mean": round(statistics.fmean(times) * 1e3, 4),
                                "min": round(min(times) * 1e3, 4), "max": round(max(times) * 1e3, 4),
                                "count": len(times)}
            entry["tokens_per_s"] = round(batch / med, 3)
            entry["greedy_tokens"] = greedy                       # [step][request], every step incl. warm-up
            entry["host_prepare_ms"] = round(statistics.median(prep) * 1e3, 4) if prep else None
            entry["staged_ahead"] = ahead
            if runner is not None and runner.graphs is not None:
                entry["graph_bucket"] = runner.graphs.bucket_for(batch) if runner.use_graphs else None
                entry["graph_capture"] = runner.graphs.report
            else:
                entry["graph_bucket"] = None
            entry["floor"] = self._floor(layout, context, batch, distinct, routing)
            fl = entry["floor"]["floor_ms"]
            entry["floor_ratio"] = round(med * 1e3 / fl, 2) if fl else None
            self._log(f"{layout} ctx {context} B {batch} graphs {graphs} {scheduling}: {med * 1e3:.2f} ms/step "
                      f"(p99 {entry['step_ms']['p99']:.2f}), floor {fl} ms")
        self.results["runs"].append(entry)
        self._save()
        return entry

    def _floor(self, layout: str, context: int, batch: int, distinct, routing: str) -> dict:
        w, bw = self._weights, self.results["copy_bandwidth_gbps"]
        if w is None:
            return {"floor_ms": None, "reason": "weights not countable on the meta device"}
        cp = int(layout.split("x")[1])
        if distinct is None:
            k = self.cfg.num_experts_per_tok
            distinct = [expected_distinct_experts(w["n_experts"], k, batch) if e else 0.0
                        for e in w["routed_experts_each"]]
        parts = step_bytes(self.cfg, w, batch=batch, context=context + 1, elem_bytes=self.elem_bytes,
                           index_fp8=self._index_fp8, cp=cp, distinct=distinct)
        return {"bytes_per_step": {k: int(v) for k, v in parts.items()}, "distinct_experts_per_layer": distinct,
                "routing": routing, "bandwidth_gbps": bw,
                "floor_ms": round(parts["total"] / (bw * 1e9) * 1e3, 4) if bw else None}
