"""``dsaserve bench prefill``: TTFT of one long prompt per PP x CP layout, where the time goes, and ablations.

    dsaserve bench prefill --config benchmarks/configs/dsv32_8layer_32e.json \\
        --input-len 16384,49664,65536 --layouts 1x1,1x2,2x1,2x2,1x4 --out results.json --trace-dir traces

One process runs every layout in turn (each ``LLM`` spawns its workers; shut down before the next).
Per layout: one warm-up prompt, then per input length ``--repeats`` timed prompts (TTFT = wall time of
``generate([prompt], max_tokens=1)``, median reported) and one extra profiled prompt whose per-rank phase
times give the breakdown and the Chrome/Perfetto traces (profiling adds CUDA events, so the headline TTFT
is the un-profiled one). The speedup is against 1x1 measured in the same run.
Ablations (on ``--ablation-layout`` at ``--ablation-len``): PP transfer gathered-then-sent vs scattered,
the indexer's SM reservation off vs auto, other chunk sizes, and fixed chunks vs the default dynamic ones.
An OOM (or any failure) of one (layout, length) is reported as such and the bench goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from dsaserve.args import (CP_SPLITS, INDEXER_FILTER_REGS, INDEXER_QUERY_KERNELS, INDEXER_SELECTS, INDEXER_TOPK,
                           MLA_FUSED_PROJECTIONS, MMA_ORDERS, MOE_BACKENDS, MOE_GEMM, MOE_SCHEDULES, QUANTIZATIONS,
                           SPARSE_MLA_PREFILL)
from dsaserve.bench import report as R
from dsaserve.bench.common import (REPO_ROOT, command_line, is_oom, load_plotter, measure_matmul_ceilings,
                                    save_json_atomic, shutdown_llm)

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "benchmarks", "configs", "dsv32_8layer_32e.json")
ABLATIONS = ("pp_transfer", "sm_reserve", "chunk", "dynamic_chunking")


@dataclass
class Job:
    """One engine instance: a layout, a variant of the engine options, and the lengths it measures."""

    pp: int
    cp: int
    variant: str                       # "baseline" or an ablation label such as "pp_transfer=gathered"
    lengths: list[int]
    options: dict = field(default_factory=dict)   # EngineArgs overrides of this variant

    @property
    def layout(self) -> str:
        return R.layout_name(self.pp, self.cp)


# ---- CLI -------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="model config .json (random weights) or a checkpoint folder (default: the 8-layer DSV3.2 bench model)")
    p.add_argument("--input-len", default="16384,49664,65536", help="prompt lengths, comma-separated")
    p.add_argument("--layouts", default="1x1,1x2,2x1,2x2,1x4", help="PPxCP layouts, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="timed prompts per (layout, length); median reported")
    p.add_argument("--warmup", default="each", choices=("each", "once", "none"),
                   help="each: one untimed prompt at every length before timing it (kernels compiled for every "
                        "key-count bucket the length reaches); once: one --warmup-len prompt per engine (a longer "
                        "length may then compile kernels inside its timed runs: counted per length in the JSON, "
                        "'triton_compiles_timed', with a warning)")
    p.add_argument("--warmup-len", type=int, default=None, help="warm-up prompt length of --warmup once (default: shortest input)")
    p.add_argument("--chunk-size", type=int, default=16384, help="chunked_prefill_size of the baseline")
    p.add_argument("--breakdown-len", default="all",
                   help="lengths that get a profiled run (breakdown + trace): 'all', 'none' or a list")
    p.add_argument("--trace-len", type=int, default=None,
                   help="length whose profiled run is written as traces (default: 65536 if measured, else the longest)")
    p.add_argument("--ablations", default=",".join(ABLATIONS),
                   help="which ablations to run: pp_transfer, sm_reserve, chunk, dynamic_chunking (fixed chunks "
                        "where the baseline resizes them: --dynamic-chunking is on with PP > 1) (comma-separated) "
                        "or 'none'")
    p.add_argument("--ablation-layout", default=None, help="layout of the ablations (default: the largest PP>1 x CP>1)")
    p.add_argument("--ablation-len", type=int, default=None, help="length of the ablations (default: 65536 if measured, else the longest)")
    p.add_argument("--ablation-chunks", default="8192,32768", help="chunk sizes of the chunk ablation")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--indexer-mode", default="auto", help="exact | fp8 | auto (fp8 on cuda)")
    p.add_argument("--sparse-mla-prefill", default="auto", choices=SPARSE_MLA_PREFILL,
                   help="sparse MLA prefill kernel: auto (the Gluon kernel on Hopper where it applies) or triton "
                        "(the Triton kernel; the A/B baseline) (default: %(default)s)")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="linear and routed-expert weights: fp8 = e4m3 128x128 blocks (random weights drawn and "
                        "quantized on the device), none = the model dtype, auto = the config's quantization_config "
                        "(default: %(default)s)")
    p.add_argument("--moe-backend", default="auto", choices=MOE_BACKENDS,
                   help="routed experts: grouped GEMMs (the CUDA default) or the per-expert loop "
                        "(default: %(default)s)")
    p.add_argument("--indexer-topk", default="fused", choices=INDEXER_TOPK,
                   help="fp8 indexer prefill top-k: fused (the threshold top-k on Hopper where it applies, the fused "
                        "Triton kernel elsewhere), fused-triton (the fused Triton kernel; the A/B baseline) or "
                        "unfused (logits then top-k) (default: %(default)s)")
    p.add_argument("--indexer-select", default="auto", choices=INDEXER_SELECTS,
                   help="the threshold top-k's row kernels (sample thresholds, select): auto (gluon where it runs), "
                        "gluon, or triton (the A/B baseline; same results) (default: %(default)s)")
    p.add_argument("--moe-gemm", default="auto", choices=MOE_GEMM,
                   help="fp8 grouped expert GEMM at prefill sizes: auto (the Gluon kernel on Hopper where it "
                        "applies) or triton (the Triton kernel; the A/B baseline) (default: %(default)s)")
    p.add_argument("--moe-schedule", default="auto", choices=MOE_SCHEDULES,
                   help="how the Gluon MoE GEMM's programs take work items: auto (queue, the measured default), "
                        "or static / per_item / queue for both GEMMs (the A/B) (default: %(default)s)")
    p.add_argument("--moe-group-m", type=int, default=0,
                   help="row tiles of an expert sweeping the MoE GEMM's columns together: 0 = the default (8), "
                        "else that many (the A/B) (default: %(default)s)")
    p.add_argument("--moe-mma-order", default="auto", choices=MMA_ORDERS,
                   help="the Gluon MoE GEMMs' consumer warpgroups: ordered (MMAs issued in turn), free, or auto (the "
                        "kernels' default) (the A/B; same outputs) (default: %(default)s)")
    p.add_argument("--indexer-mma-order", default="auto", choices=MMA_ORDERS,
                   help="the same for the Gluon indexer filter kernel (the A/B; same candidates) "
                        "(default: %(default)s)")
    p.add_argument("--indexer-filter-regs", type=int, default=0, choices=INDEXER_FILTER_REGS,
                   help="registers of each consumer warpgroup of the Gluon indexer filter kernel: 0 = the default "
                        "(240), 232 (the A/B) (default: %(default)s)")
    p.add_argument("--indexer-query-kernel", default="triton", choices=INDEXER_QUERY_KERNELS,
                   help="the fp8 indexer's query path: triton, or gluon (one row a thread where it applies; the A/B, "
                        "same bits) (default: %(default)s)")
    p.add_argument("--mla-fused-projections", default="off", choices=MLA_FUSED_PROJECTIONS,
                   help="on = one Triton kernel each side of the sparse attention (the query's W_UK product + "
                        "RoPE; the value's W_UV product + act_quant for an fp8 o_proj), off = torch's bmm and a "
                        "second pass each (the A/B) (default: %(default)s)")
    p.add_argument("--load-format", default="random", choices=("random", "auto"),
                   help="random = seeded random weights drawn on the device (--config may be a bare config.json); "
                        "auto = the checkpoint folder's safetensors (default: %(default)s)")
    p.add_argument("--cp-split", default="round-robin", choices=CP_SPLITS,
                   help="how a prefill chunk's tokens are split over the CP ranks (default: %(default)s)")
    p.add_argument("--pp-comm-ctas", type=int, default=1, help="CTAs of the NCCL PP communicator")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    p.add_argument("--comm-timeout-s", type=float, default=600.0, help="engine collective timeout")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no new measurement after this many seconds (what is done is still reported)")
    p.add_argument("--out", default=None, help="write every number as JSON here (rewritten after each measurement)")
    p.add_argument("--trace-dir", default=None, help="write Chrome/Perfetto traces (one per rank + one combined) here")
    p.add_argument("--plot", default=None, help="write a TTFT-vs-length PNG here (needs matplotlib)")



def run(args: argparse.Namespace) -> int:
    try:
        bench = PrefillBench(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = bench.run()
    statuses = [r["status"] for r in results["runs"]]
    if "ok" not in statuses:
        print(f"error: no measurement succeeded ({len(statuses)} attempted: "
              f"{', '.join(sorted(set(statuses))) or 'none'}); see the log above", file=sys.stderr)
        return 1
    return 0


def _available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no estimate then)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# ---- the bench -------------------------------------------------------------------------------------------
class PrefillBench:
    """Runs the jobs, keeps every result in ``self.results`` (the JSON), prints the report."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.monotonic()
        self.lengths = sorted(set(R.parse_int_list(args.input_len, "--input-len")))
        self.layouts = R.parse_layouts(args.layouts)
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no GPU; use --device cpu")
        self.dtype = args.dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        if not os.path.exists(args.config):
            raise FileNotFoundError(f"--config {args.config!r} does not exist")
        self.cfg = self._read_config(args.config)
        self.elem_bytes = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        self.key_len = 65536 if 65536 in self.lengths else self.lengths[-1]
        self.trace_len = args.trace_len or self.key_len
        bl = str(args.breakdown_len).strip().lower()
        self.breakdown_lens = (set(self.lengths) if bl == "all" else set() if bl == "none"
                               else set(R.parse_int_list(bl, "--breakdown-len")))
        self.breakdown_lens.add(self.trace_len)
        self.warmup_len = args.warmup_len or self.lengths[0]
        self.ablations = [] if args.ablations.strip().lower() in ("", "none") else \
            [a.strip() for a in args.ablations.split(",") if a.strip()]
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ValueError(f"unknown ablation {bad[0]!r}: use {', '.join(ABLATIONS)} or 'none'")
        self.ablation_len = args.ablation_len or self.key_len
        self.ablation_layout = self._pick_ablation_layout(args.ablation_layout)
        self.results: dict = {
            "meta": self._meta(),
            "ceilings": {},
            "runs": [],            # one entry per (job, length)
            "indexer_floor": {},
        }

    # ---- setup ----------------------------------------------------------------------------------------
    @staticmethod
    def _read_config(path: str):
        from dsaserve.config import ModelConfig

        if os.path.isdir(path):
            return ModelConfig.from_hf(path)
        with open(path) as f:
            return ModelConfig.from_dict(json.load(f), source=path)

    def _pick_ablation_layout(self, text: str | None) -> tuple[int, int] | None:
        if text:
            return R.parse_layouts(text)[0]
        both = [lc for lc in self.layouts if lc[0] > 1 and lc[1] > 1]
        return max(both, key=lambda lc: lc[0] * lc[1]) if both else None

    def _meta(self) -> dict:
        a = self.args
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command_line(),
            "config": a.config, "device": self.device, "dtype": self.dtype, "torch": torch.__version__,
            "chunk_size": a.chunk_size, "dynamic_chunking": "auto (baseline: on with PP > 1)", "repeats": a.repeats, "warmup": a.warmup, "cp_split": a.cp_split,
            "pp_comm_ctas": a.pp_comm_ctas, "indexer_mode": a.indexer_mode, "weights_seed": a.weights_seed,
            "sparse_mla_prefill": a.sparse_mla_prefill, "moe_gemm": a.moe_gemm,
            "moe_schedule": a.moe_schedule, "moe_group_m": a.moe_group_m, "indexer_topk": a.indexer_topk,
            "indexer_select": a.indexer_select, "moe_mma_order": a.moe_mma_order,
            "indexer_mma_order": a.indexer_mma_order, "indexer_filter_regs": a.indexer_filter_regs,
            "mla_fused_projections": a.mla_fused_projections, "indexer_query_kernel": a.indexer_query_kernel,
            "quantization": a.quantization, "moe_backend": a.moe_backend, "load_format": a.load_format,
            "prompt_seed": a.seed, "layouts": [R.layout_name(*lc) for lc in self.layouts], "lengths": self.lengths,
            "model": {"layers": self.cfg.num_hidden_layers, "hidden": self.cfg.hidden_size,
                      "heads": self.cfg.num_attention_heads, "experts": self.cfg.n_routed_experts,
                      "active_experts": self.cfg.num_experts_per_tok, "index_heads": self.cfg.index_n_heads,
                      "index_dim": self.cfg.index_head_dim, "index_topk": self.cfg.index_topk},
        }
        if self.device.startswith("cuda"):
            props = torch.cuda.get_device_properties(0)
            meta.update(card=props.name, sms=props.multi_processor_count, gpus=torch.cuda.device_count(),
                        gpu_mem_gib=round(props.total_memory / 2**30, 1))
        else:
            meta.update(card="CPU", gpus=0, cpu_cores=os.cpu_count(), cpu_name=_cpu_name())
        return meta

    # ---- memory ---------------------------------------------------------------------------------------
    def memory_estimates(self) -> list[str]:
        """Warnings for the layouts whose estimated memory (model/memory_plan.py: weights, KV cache of the
        longest prompt, prefill transients) exceeds what this machine has: GPU memory per rank, or the
        host's available memory for all CPU ranks together. Recorded in the JSON's meta too."""
        from dsaserve.model.backends import FP8_KERNEL_BLOCK, resolve_quantization
        from dsaserve.model.memory_plan import gib, plan_memory
        from dsaserve.parallel.layout import Layout

        cuda = self.device.startswith("cuda")
        have = torch.cuda.get_device_properties(0).total_memory if cuda else _available_host_memory()
        if have is None:
            return []
        indexer_fp8 = self.args.indexer_mode == "fp8" or (self.args.indexer_mode == "auto" and cuda)
        fp8_weights = resolve_quantization(self.args.quantization, self.cfg) == "fp8"
        warnings, estimates = [], {}
        for pp, cp in self.layouts:
            try:
                stages = Layout.build(self.cfg, pp, cp).stage_layers
                # as the engine runs it: whole experts per CP rank, the bench's CP split, the fused fp8 top-k
                # (the engine's default on CUDA); no CUDA-context headroom on CPU
                plan = plan_memory(self.cfg, stages, cp, dtype=self.dtype, moe_split="expert",
                                   cp_split=self.args.cp_split, fused_topk=cuda,
                                   fp8_block=FP8_KERNEL_BLOCK if fp8_weights else None,
                                   indexer_fp8=indexer_fp8, max_model_len=max(self.lengths) + 256,
                                   chunk_tokens=self.args.chunk_size, **({} if cuda else {"headroom_bytes": 0}))
            except Exception as e:  # noqa: BLE001 - an estimate must never stop the bench
                print(f"[bench] no memory estimate for {pp}x{cp}: {e}", file=sys.stderr)
                continue
            worst = max(plan.ranks, key=lambda r: r.total)
            need = worst.total if cuda else sum(r.total for r in plan.ranks)
            estimates[R.layout_name(pp, cp)] = {"need_bytes": need, "have_bytes": have}
            if need > have:
                where = "per GPU" if cuda else f"for {len(plan.ranks)} CPU rank(s) together"
                warnings.append(
                    f"warning: layout {pp}x{cp} at {max(self.lengths)} tokens needs about {gib(need):.1f} GiB {where} "
                    f"(largest rank: weights {gib(worst.weights_total):.1f} + KV {gib(worst.kv['total']):.1f} + "
                    f"transients {gib(worst.transient_peak):.1f} GiB, {self.dtype}) but "
                    f"{'the GPU has' if cuda else 'this machine has'} {gib(have):.1f} GiB"
                    f"{'' if cuda else ' available'}: expect it to fail (OOM); try a smaller --config "
                    "(benchmarks/configs/tiny_dsv32.json on CPU) or shorter --input-len")
        self.results["meta"]["memory_estimates"] = estimates
        return warnings

    def _jobs(self) -> list[Job]:
        jobs = [Job(pp, cp, "baseline", list(self.lengths)) for pp, cp in self.layouts]
        if self.ablation_layout and self.ablations:
            pp, cp = self.ablation_layout
            n = [self.ablation_len]
            if self.ablation_layout not in self.layouts or self.ablation_len not in self.lengths:
                jobs.append(Job(pp, cp, "baseline", n))
            if "pp_transfer" in self.ablations:
                jobs.append(Job(pp, cp, "pp_transfer=gathered", n, {"pp_transfer": "gathered"}))
            if "sm_reserve" in self.ablations:
                jobs.append(Job(pp, cp, "indexer_num_sms=off", n, {"indexer_num_sms": "off"}))
            if "dynamic_chunking" in self.ablations:
                jobs.append(Job(pp, cp, "dynamic_chunking=off", n, {"dynamic_chunking": "off"}))
            if "chunk" in self.ablations:
                for c in R.parse_int_list(self.args.ablation_chunks, "--ablation-chunks"):
                    if c != self.args.chunk_size:
                        jobs.append(Job(pp, cp, f"chunk={c}", n, {"chunked_prefill_size": c}))

        # What a deadline cuts last matters least: 1x1 (the speedup's reference), the ablation layout (the
        # headline), its PP-transfer ablation (the bytes claim), the other layouts, then the other ablations.
        def priority(j: Job) -> tuple:
            if j.variant == "baseline":
                return (0 if j.pp * j.cp == 1 else 1 if (j.pp, j.cp) == self.ablation_layout else 3, j.pp * j.cp)
            return (2 if j.variant.startswith("pp_transfer") else 4, 0)
        return sorted(jobs, key=priority)          # stable: ablations keep their listed order

    def _over_deadline(self) -> bool:
        d = self.args.deadline_s
        return d is not None and time.monotonic() - self.t0 > d

    def _log(self, msg: str) -> None:
        print(f"[bench {time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    def _save(self) -> None:
        if self.args.out:
            save_json_atomic(self.args.out, self.results)

    # ---- ceilings -------------------------------------------------------------------------------------
    def measure_ceilings(self) -> None:
        """fp8 (torch._scaled_mm) and bf16 matmul TFLOPS on GPU 0, in this run (skipped on CPU)."""
        if not self.device.startswith("cuda"):
            return
        self.results["ceilings"] = measure_matmul_ceilings()
        self._log(f"ceilings: {self.results['ceilings']}")

    def indexer_floors(self) -> None:
        fp8 = self.results["ceilings"].get("fp8_tflops")
        if not fp8:
            return
        c = self.cfg
        layers = sum(1 for t in c.indexer_types if t == "full")
        for n in self.lengths:
            self.results["indexer_floor"][str(n)] = {
                "pairs": R.causal_pairs(n), "layers": layers,
                "floor_ms_1gpu": R.indexer_floor_ms(n, c.index_n_heads, c.index_head_dim, layers, fp8)}

    # ---- measuring ------------------------------------------------------------------------------------
    def prompt(self, n: int) -> list[int]:
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + n)
        return torch.randint(2, self.cfg.vocab_size, (n,), generator=g).tolist()

    def _make_llm(self, job: Job, max_len: int):
        from dsaserve.engine.llm import LLM

        cache = -(-(max_len + 256) // 64) * 64
        opts = dict(load_format=self.args.load_format, weights_seed=self.args.weights_seed,
                    quantization=self.args.quantization, moe_backend=self.args.moe_backend,
                    chunked_prefill_size=self.args.chunk_size, kv_cache_tokens=cache, max_model_len=cache,
                    indexer_mode=self.args.indexer_mode, cp_split=self.args.cp_split,
                    sparse_mla_prefill=self.args.sparse_mla_prefill, moe_gemm=self.args.moe_gemm,
                    moe_schedule=self.args.moe_schedule, moe_group_m=self.args.moe_group_m,
                    indexer_topk=self.args.indexer_topk, indexer_select=self.args.indexer_select,
                    moe_mma_order=self.args.moe_mma_order, indexer_mma_order=self.args.indexer_mma_order,
                    indexer_filter_regs=self.args.indexer_filter_regs,
                    mla_fused_projections=self.args.mla_fused_projections,
                    indexer_query_kernel=self.args.indexer_query_kernel,
                    pp_comm_ctas=self.args.pp_comm_ctas,
                    comm_timeout_s=self.args.comm_timeout_s, max_num_seqs=1,
                    skip_warmup=True)             # the bench warms up per length itself (--warmup)
        opts.update(job.options)
        return LLM(self.args.config, pp_size=job.pp, cp_size=job.cp, device=self.device, dtype=self.dtype, **opts)

    @staticmethod
    def _compiles(llm) -> tuple[int, float]:
        """Triton compiles so far and their seconds, summed over ranks (``runtime.compile_watch``: zero where
        it is not installed, e.g. on the CPU)."""
        snaps = [s.get("triton_compiles") or {} for s in llm.stats().values()]
        return sum(c.get("compiles", 0) for c in snaps), sum(c.get("seconds", 0.0) for c in snaps)

    def _generate(self, llm, n: int) -> float:
        from dsaserve.engine.types import SamplingParams

        tokens = self.prompt(n)
        t = time.perf_counter()
        out = llm.generate([tokens], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
        dt = time.perf_counter() - t
        if len(out[0].token_ids) != 1:
            raise RuntimeError(f"expected 1 generated token, got {len(out[0].token_ids)}")
        return dt

    def run_job(self, job: Job) -> None:
        if self.device == "cpu":
            # the runtime gives each CPU rank cores // world threads; do the same for 1x1 (and undo what a
            # previous multi-rank job left on this process)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // (job.pp * job.cp)))
        llm = None
        lengths = list(job.lengths)
        while lengths:
            if self._over_deadline():
                for n in lengths:
                    self._record(job, n, status="skipped (deadline)")
                return
            n = lengths[0]
            try:
                if llm is None:
                    self._log(f"{job.layout} {job.variant}: starting engine (max length {max(lengths)})")
                    t = time.monotonic()
                    llm = self._make_llm(job, max(lengths))
                    self._log(f"{job.layout} {job.variant}: engine up in {time.monotonic() - t:.1f}s")
                    if self.args.warmup == "once":
                        self._generate(llm, min(self.warmup_len, max(lengths)))
                self.measure_length(llm, job, n)
                lengths.pop(0)
            except Exception as e:  # OOM or a dead worker: report it, rebuild the engine for the next length
                status = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                self._log(f"{job.layout} {job.variant} n={n}: {status}")
                if not is_oom(e):
                    traceback.print_exc()
                self._record(job, n, status=status)
                lengths.pop(0)
                shutdown_llm(llm)
                llm = None
                del e
        shutdown_llm(llm)

    def measure_length(self, llm, job: Job, n: int) -> None:
        if self.args.warmup == "each":
            # a first prompt of a new length can compile kernels for a new key-count bucket (seen on H200:
            # 5.0 s then 2.9 s at 49664 tokens after a 16384-token warm-up)
            self._generate(llm, n)
        llm.engine.control("reset")
        compiled_before = self._compiles(llm)
        times = [self._generate(llm, n)]
        stats = llm.stats()          # comm bytes of exactly one prompt
        for _ in range(self.args.repeats - 1):
            times.append(self._generate(llm, n))
        count, seconds = (a - b for a, b in zip(self._compiles(llm), compiled_before))
        entry = self._record(job, n, status="ok", ttft_s=times, comm={r: s["comm"] for r, s in stats.items()},
                             weights={r: s.get("weights") for r, s in stats.items()},
                             triton_compiles_timed={"count": count, "seconds": round(seconds, 3)},
                             threshold_redo_rows={r: (s.get("indexer_sm_budget") or {}).get("threshold_redo_rows")
                                                  for r, s in stats.items()})
        if self.device.startswith("cuda"):  # this process is rank 0 (all of a 1x1 engine)
            entry["rank0_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        self._log(f"{job.layout} {job.variant} n={n}: TTFT {R.median(times):.3f}s (runs {', '.join(f'{t:.3f}' for t in times)})")
        if count:
            self._log(f"{job.layout} {job.variant} n={n}: WARNING: the timed runs include {count} Triton compile(s), "
                      f"{seconds:.2f} s summed over ranks (kernel variants the warm-up did not reach); "
                      "--warmup each compiles them before timing")
        if n in self.breakdown_lens:
            llm.engine.control("reset")
            llm.engine.control("profile_on")
            try:
                t = self._generate(llm, n)
                stats = llm.stats()
            finally:
                llm.engine.control("profile_off")
            bd = R.breakdown(stats, t * 1e3)
            entry["profiled_ttft_s"] = t
            entry["breakdown"] = {"rows": bd["rows"], "per_rank": bd["per_rank"], "busy_ms": bd["busy_ms"]}
            if self.args.trace_dir and n == self.trace_len:
                entry["traces"] = self.write_traces(job, n, stats)
        self._save()

    def write_traces(self, job: Job, n: int, stats: dict) -> list[str]:
        from dsaserve.profiling import chrome_trace

        os.makedirs(self.args.trace_dir, exist_ok=True)
        stem = f"trace_{job.layout}_{job.variant.replace('=', '-')}_{n}"
        regions = {int(r): s.get("regions", []) for r, s in stats.items()}
        paths = [os.path.join(self.args.trace_dir, f"{stem}.json")]
        chrome_trace(regions, paths[0])
        for r, reg in regions.items():
            paths.append(os.path.join(self.args.trace_dir, f"{stem}_rank{r}.json"))
            chrome_trace({r: reg}, paths[-1])
        return paths

    def _record(self, job: Job, n: int, status: str, **fields) -> dict:
        entry = {"layout": job.layout, "pp": job.pp, "cp": job.cp, "variant": job.variant, "input_len": n,
                 "options": job.options, "status": status}
        if "ttft_s" in fields:
            entry["ttft_median_s"] = R.median(fields["ttft_s"])
        entry.update(fields)
        self.results["runs"].append(entry)
        self._save()
        return entry

    # ---- the whole thing ------------------------------------------------------------------------------
    def run(self) -> dict:
        self._log(f"device {R.device_label(self.results['meta'])}, layouts {self.args.layouts}, lengths {self.lengths}")
        for warning in self.memory_estimates():
            self._log(warning)
        self.measure_ceilings()
        self.indexer_floors()
        need = max(pp * cp for pp, cp in self.layouts)
        if self.device.startswith("cuda") and need > torch.cuda.device_count():
            self._log(f"only {torch.cuda.device_count()} GPUs: layouts needing more are skipped")
        for job in self._jobs():
            if self.device.startswith("cuda") and job.pp * job.cp > torch.cuda.device_count():
                for n in job.lengths:
                    self._record(job, n, status=f"skipped ({job.pp * job.cp} GPUs needed)")
                continue
            self.run_job(job)
        self.results["summary"] = self.summarize()
        self._save()
        print(self.report(), flush=True)
        if self.args.plot:
            plot_results = load_plotter()
            if plot_results is not None:
                try:
                    plot_results(self.results, self.args.plot)
                    print(f"plot: {self.args.plot}")
                except ImportError as e:
                    print(f"plot skipped: {e}")
        return self.results

    # ---- analysis --------------------------------------------------------------------------------------
    @property
    def setup(self) -> R.PrefillSetup:
        return R.PrefillSetup(
            layouts=self.layouts, lengths=self.lengths, key_len=self.key_len, chunk_size=self.args.chunk_size,
            ablation_chunks=R.parse_int_list(self.args.ablation_chunks, "chunks"),
            ablation_layout=self.ablation_layout, ablation_len=self.ablation_len, hidden_size=self.cfg.hidden_size,
            elem_bytes=self.elem_bytes, index_n_heads=self.cfg.index_n_heads, index_head_dim=self.cfg.index_head_dim)

    def summarize(self) -> dict:
        return R.summarize_prefill(self.results, self.setup)

    def report(self) -> str:
        return R.format_prefill_report(self.results, self.setup)
