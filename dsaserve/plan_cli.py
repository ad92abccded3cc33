"""``dsaserve plan``: will a model fit a PP x CP deployment? Per-rank GPU memory from the config alone.

    dsaserve plan --model DIR_OR_CONFIG_JSON --pp-size 2 --cp-size 8 --gpu-memory-gb 140.4
                  [--max-model-len 131072] [--chunked-prefill-size 8192] [--quantization auto|fp8|none]
                  [--dtype auto|bfloat16|float16|float32] [--moe-split expert|intermediate]
                  [--indexer-topk fused|fused-triton|unfused] [--indexer-mode fp8|exact] [--pp-layer-partition 30,31]
                  [--headroom-gb 4] [--json]

Prints, per rank, the weight bytes by kind, the KV + indexer-key cache of one ``--max-model-len`` sequence,
the largest transient buffers of a prefill step, the headroom kept for what no tensor accounts for, and
whether it all fits. Ranks of one stage with identical numbers share a column. Exit status: 0 when every
rank fits (or no ``--gpu-memory-gb`` was given), 1 when one does not, 2 on bad input. The accounting and
its sharding model are documented in ``dsaserve.model.memory_plan``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dsaserve.args import INDEXER_TOPK, QUANTIZATIONS, EngineArgs
from dsaserve.config import ConfigError, ModelConfig
from dsaserve.model import memory_plan as mp
from dsaserve.parallel.layout import Layout

KIND_LABELS = {
    "attention": "attention (MLA)", "indexer": "indexer", "moe_routed": "MoE routed experts",
    "moe_shared": "MoE shared expert", "dense_mlp": "dense MLP", "embedding": "embedding", "lm_head": "lm_head",
    "norms_router": "norms + router + rope",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR_OR_CONFIG_JSON",
                        help="checkpoint folder (its config.json is read; no weight is loaded) or a config.json file")
    layout = parser.add_argument_group("layout")
    layout.add_argument("--pp-size", type=int, default=1, help="pipeline stages (default: %(default)s)")
    layout.add_argument("--cp-size", type=int, default=1,
                        help="context-parallel ranks per stage (default: %(default)s)")
    layout.add_argument("--pp-layer-partition", default=None, metavar="N0,N1,...",
                        help="layers per stage, e.g. 30,31 (default: even split, remainder on the later stages)")
    layout.add_argument("--moe-split", choices=mp.MOE_SPLITS, default="expert",
                        help="how a stage's CP ranks share the MoE: 'expert' = whole experts per rank (expert "
                             "parallelism, shared expert replicated: what the engine does); 'intermediate' = every "
                             "expert's intermediate dim split over the ranks (the engine before issue 11, for "
                             "comparison) (default: %(default)s)")
    fmt = parser.add_argument_group("formats")
    fmt.add_argument("--quantization", choices=QUANTIZATIONS, default="auto",
                     help="linear weights: 'fp8' = e4m3 + fp32 scale per 128x128 block, 'none' = the model dtype, "
                          "'auto' = the checkpoint's quantization_config (default: %(default)s)")
    fmt.add_argument("--dtype", choices=("auto", *mp.DTYPE_BYTES), default="auto",
                     help="model (activation, KV, unquantized weight) dtype; 'auto' = the config's torch_dtype "
                          "(default: %(default)s)")
    fmt.add_argument("--indexer-mode", choices=("fp8", "exact"), default="fp8",
                     help="indexer key cache: 'fp8' = 128 e4m3 bytes + fp32 scale per token, 'exact' = model dtype "
                          "(default: %(default)s, the CUDA path)")
    work = parser.add_argument_group("workload")
    work.add_argument("--max-model-len", type=int, default=None,
                      help="tokens of the sequence whose KV cache is counted, and the context of the prefill step "
                           "(default: the model's max_position_embeddings)")
    work.add_argument("--chunked-prefill-size", type=int, default=EngineArgs.chunked_prefill_size,
                      help="prompt tokens per prefill step, split over the CP ranks (default: %(default)s)")
    work.add_argument("--page-size", type=int, default=EngineArgs.page_size,
                      help="KV cache page size in tokens (default: %(default)s)")
    work.add_argument("--indexer-topk", choices=INDEXER_TOPK, default=EngineArgs.indexer_topk,
                      help="the fp8 indexer's prefill top-k, as the engine's flag: 'fused' = one kernel with a fixed "
                           "workspace, no [queries x context] fp32 logits buffer; 'unfused' = the logits block is "
                           "counted (default: %(default)s)")
    gpu = parser.add_argument_group("GPU")
    gpu.add_argument("--gpu-memory-gb", type=float, default=None,
                     help="memory per GPU in GiB (2^30 bytes) as torch reports it: H200 '141 GB' = 140.4, "
                          "H20 '96 GB' = 95.6, H100 '80 GB' = 79.6 (default: no fit verdict)")
    gpu.add_argument("--headroom-gb", type=float, default=mp.DEFAULT_HEADROOM_GIB,
                     help="GiB per GPU kept for what no tensor accounts for: CUDA context, NCCL buffers, cuBLAS/"
                          "Triton workspaces, allocator fragmentation (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes) instead of a table")


def load_model_config(path: str) -> ModelConfig:
    """A checkpoint folder (its config.json) or a config.json file -> ModelConfig."""
    if os.path.isdir(path):
        return ModelConfig.from_hf(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--model {path!r} is neither a checkpoint folder nor a config.json file")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return ModelConfig.from_dict(raw, source=path)


def build_plan(args: argparse.Namespace) -> tuple[ModelConfig, mp.MemoryPlan]:
    """Parse and check the options, then compute the plan (raises ConfigError on bad input)."""
    cfg = load_model_config(args.model)
    for name in ("pp_size", "cp_size", "chunked_prefill_size", "page_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ConfigError(f"--max-model-len must be >= 1, got {args.max_model_len}")
    if args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0:
        raise ConfigError(f"--gpu-memory-gb must be > 0, got {args.gpu_memory_gb}")
    if args.headroom_gb < 0:
        raise ConfigError(f"--headroom-gb must be >= 0, got {args.headroom_gb}")
    layout = Layout.build(cfg, args.pp_size, args.cp_size, args.pp_layer_partition)
    dtype = cfg.torch_dtype if args.dtype == "auto" else args.dtype
    if dtype not in mp.DTYPE_BYTES:
        raise ConfigError(f"the config's torch_dtype {dtype!r} is not supported; pass --dtype "
                          f"({', '.join(mp.DTYPE_BYTES)})")
    if args.quantization == "auto":
        fp8_block = cfg.fp8.block_size if cfg.fp8 is not None else None
    elif args.quantization == "fp8":
        fp8_block = cfg.fp8.block_size if cfg.fp8 is not None else (128, 128)
    else:
        fp8_block = None
    plan = mp.plan_memory(
        cfg, layout.stage_layers, args.cp_size, dtype=dtype, fp8_block=fp8_block, moe_split=args.moe_split,
        indexer_fp8=args.indexer_mode == "fp8", max_model_len=args.max_model_len,
        chunk_tokens=args.chunked_prefill_size, page_size=args.page_size, fused_topk=args.indexer_topk != "unfused",
        gpu_memory_bytes=None if args.gpu_memory_gb is None else int(args.gpu_memory_gb * mp.GIB),
        headroom_bytes=int(args.headroom_gb * mp.GIB))
    plan.options["dtype"] = dtype
    plan.options["model"] = args.model
    return cfg, plan


def _ranks_label(group: list[mp.RankPlan]) -> str:
    a, b = group[0].rank, group[-1].rank
    return f"rank {a}" if a == b else f"ranks {a}-{b}"


def _describe(cfg: ModelConfig, plan: mp.MemoryPlan) -> list[str]:
    o = plan.options
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    n_shared = sum(not cfg.has_indexer(i) for i in range(cfg.num_hidden_layers))
    sharing = f", {n_shared} sharing an earlier indexer" if n_shared else ""
    model = (f"{cfg.model_type}: {cfg.num_hidden_layers} layers ({cfg.num_hidden_layers - n_moe} dense + {n_moe} MoE"
             f"{sharing}), {cfg.n_routed_experts} routed experts")
    if o["fp8_block"]:
        bo, bi = o["fp8_block"]
        weights = (f"linear weights fp8 e4m3 + fp32 scale per {bo}x{bi} block; embedding, lm_head, kv_b, norms in "
                   f"{o['dtype']}; router and indexer weights_proj fp32")
    else:
        weights = f"weights in {o['dtype']} (router and indexer weights_proj fp32)"
    moe = ("MoE split by expert over the CP ranks (shared expert replicated)" if o["moe_split"] == "expert"
           else "MoE split along every expert's intermediate dim over the CP ranks (the engine before issue 11)")
    topk = ("fused top-k (no logits buffer)" if o["fused_topk"] and o["indexer_fp8"]
            else "unfused top-k (fp32 logits block counted)")
    gpu = ("no GPU size given (--gpu-memory-gb): no fit verdict" if o["gpu_memory_bytes"] is None
           else f"GPU {mp.gib(o['gpu_memory_bytes']):.1f} GiB")
    return [
        f"dsaserve plan  {model}",
        f"  PP {o['pp_size']} x CP {o['cp_size']} = {o['pp_size'] * o['cp_size']} ranks; {weights}",
        f"  {moe}; indexer keys {'fp8' if o['indexer_fp8'] else 'exact'}, {topk}",
        f"  KV cache of one {o['max_model_len']}-token sequence; prefill chunk {o['chunk_tokens']} tokens at context "
        f"{o['max_model_len']}; {gpu}; headroom {mp.gib(o['headroom_bytes']):.1f} GiB (CUDA context, NCCL buffers, "
        "workspaces, allocator fragmentation)",
    ]


def format_plan(cfg: ModelConfig, plan: mp.MemoryPlan) -> str:
    """The plan as a table: one column per group of ranks with identical numbers, values in GiB."""
    groups = plan.groups()
    cols = [g[0] for g in groups]
    page = plan.options["page_size"]
    rows: list[tuple[str, list[str]]] = [
        ("", [f"stage {r.stage}" for r in cols]),
        ("", [_ranks_label(g) for g in groups]),
        ("", [f"layers {r.layers.start}-{r.layers.stop - 1}" for r in cols]),
        ("weights (GiB)", ["" for _ in cols]),
    ]
    for kind in mp.WEIGHT_KINDS:
        label = KIND_LABELS[kind]
        if kind == "moe_routed" and plan.options["moe_split"] == "expert":
            counts = {len(mp.local_experts(cfg.n_routed_experts, r.cp_rank, plan.options["cp_size"])) for r in cols}
            label += f" ({'/'.join(str(c) for c in sorted(counts))} of {cfg.n_routed_experts})"
        rows.append((f"  {label}", [mp.fmt_gib(r.weights[kind]) if r.weights[kind] else "-" for r in cols]))
    rows.append(("  total weights", [mp.fmt_gib(r.weights_total) for r in cols]))
    rows.append((f"KV cache @ {plan.options['max_model_len']} tokens", ["" for _ in cols]))
    rows.append(("  MLA latent + k_pe", [mp.fmt_gib(r.kv["latent"]) for r in cols]))
    rows.append(("  indexer keys", [mp.fmt_gib(r.kv["indexer_keys"]) for r in cols]))
    rows.append(("prefill step transients", ["" for _ in cols]))
    phases = list(dict.fromkeys(p for r in cols for p in r.transients))
    for p in phases:
        rows.append((f"  {p}", [mp.fmt_gib(sum(r.transients[p].values())) if p in r.transients else "-"
                                for r in cols]))
    rows.append(("  peak (residual + largest phase)", [mp.fmt_gib(r.transient_peak) for r in cols]))
    rows.append(("headroom", [mp.fmt_gib(r.headroom) for r in cols]))
    rows.append(("TOTAL", [mp.fmt_gib(r.total) for r in cols]))
    if plan.options["gpu_memory_bytes"] is not None:
        rows.append(("free", [mp.fmt_gib(r.free) for r in cols]))
        rows.append(("more KV tokens that fit in free", [f"{r.extra_kv_tokens(page):,}" for r in cols]))
        rows.append(("fits", ["yes" if r.fits else "NO" for r in cols]))
    width = max(len(label) for label, _ in rows) + 2
    colw = [max(len(vals[i]) for _, vals in rows) + 2 for i in range(len(cols))]
    lines = _describe(cfg, plan) + [""]
    for label, vals in rows:
        lines.append(label.ljust(width) + "".join(v.rjust(w) for v, w in zip(vals, colw)))
    if any(len(g) > 1 for g in groups):
        lines.append("(ranks sharing a column have identical numbers)")
    lines.append("")
    for g, r in zip(groups, cols):
        bufs = sorted(((b, v, p) for p, d in r.transients.items() for b, v in d.items()), key=lambda t: -t[1])[:6]
        lines.append(f"largest transient buffers, stage {r.stage} {_ranks_label(g)} "
                     f"(peak phase: {r.transient_peak_phase}):")
        lines.extend(f"  {mp.fmt_gib(v):>7} GiB  {b}  ({p})" for b, v, p in bufs)
    if plan.fits is not None:
        bad = [r.rank for r in plan.ranks if not r.fits]
        lines.append("")
        lines.append("FITS on every rank" if not bad else f"DOES NOT FIT on ranks {bad}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        cfg, plan = build_plan(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print(format_plan(cfg, plan))
    return 1 if plan.fits is False else 0
