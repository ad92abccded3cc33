"""``dsaserve plan`` vs the memory the engine really allocates on one GPU (1x1, random weights, bf16 or fp8).

    python benchmarks/plan_check.py --config benchmarks/configs/dsv32_8layer_32e.json \\
        --chunk 16384 --context 65536,131072 [--quantization fp8] --out benchmarks/results/plan_check_h200.json

Builds the engine at 1x1 (every expert whole on the one rank), then compares
  * resident bytes (weights + KV cache of --context's largest value) after start-up with the plan's
    weights + KV (should agree to the allocator's rounding),
  * the peak of one prefill of a prompt reaching each context, above the resident bytes
    (``torch.cuda.max_memory_allocated``, second run of each length so kernel autotuning is not counted),
    with the plan's transient peak (the grouped MoE path sizes its buffers by tokens x top-k whatever the
    routing); the plan's largest phase other than MoE is printed too.
Writes every number as JSON to --out and prints a short table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from dsaserve.config import ModelConfig  # noqa: E402
from dsaserve.engine.llm import LLM  # noqa: E402
from dsaserve.engine.types import SamplingParams  # noqa: E402
from dsaserve.model import memory_plan as mp  # noqa: E402

PAGE = 64


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "benchmarks", "configs", "dsv32_8layer_32e.json"),
                   help="model config .json (random weights are drawn on the GPU)")
    p.add_argument("--chunk", type=int, default=16384, help="chunked_prefill_size (default: %(default)s)")
    p.add_argument("--context", default="65536,131072", help="prompt lengths to prefill, comma-separated")
    p.add_argument("--quantization", default="none", choices=("none", "fp8"),
                   help="weights in the model dtype or fp8 128x128 blocks (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("plan_check needs a CUDA GPU (it measures torch.cuda allocations)", file=sys.stderr)
        return 2
    with open(args.config) as f:
        cfg = ModelConfig.from_dict(json.load(f), source=args.config)
    contexts = sorted(int(x) for x in args.context.split(",") if x.strip())
    cache_tokens = -(-(contexts[-1] + PAGE) // PAGE) * PAGE
    layers = range(cfg.num_hidden_layers)

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    llm = LLM(args.config, device="cuda", dtype="bfloat16", load_format="random", kv_cache_tokens=cache_tokens,
              max_model_len=cache_tokens, chunked_prefill_size=args.chunk, indexer_mode="fp8", max_num_seqs=1,
              quantization=args.quantization)
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() - base
    fp8_block = (128, 128) if args.quantization == "fp8" else None
    plan = mp.plan_memory(cfg, [layers], 1, dtype="bfloat16", fp8_block=fp8_block,
                          indexer_fp8=True,
                          max_model_len=cache_tokens, chunk_tokens=args.chunk, page_size=PAGE)
    planned_resident = plan.ranks[0].weights_total + plan.ranks[0].kv["total"]
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "config": os.path.basename(args.config), "chunk": args.chunk,
              "cache_tokens": cache_tokens, "resident_measured": resident, "resident_planned": planned_resident,
              "weights_planned": plan.ranks[0].weights, "kv_planned": plan.ranks[0].kv, "prefill": []}
    gen = torch.Generator().manual_seed(0)
    try:
        for n in contexts:
            prompt = torch.randint(2, cfg.vocab_size, (n - 1,), generator=gen).tolist()
            measured = []
            for _ in range(2):  # the first run compiles / autotunes kernels; the second is the steady state
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
                torch.cuda.synchronize()
                measured.append(torch.cuda.max_memory_allocated() - before)
            phases = mp.prefill_transients(cfg, layers, chunk_tokens=min(args.chunk, n), context_tokens=n,
                                           dtype="bfloat16", indexer_fp8=True,
                                           fp8_experts=args.quantization == "fp8")
            peak, phase = mp.transient_peak(phases)
            resid = sum(phases["residual"].values())
            non_moe = max((sum(b.values()), ph) for ph, b in phases.items()
                          if ph != "residual" and not ph.startswith("MoE"))
            result["prefill"].append({"context": n, "measured_peak_first": measured[0], "measured_peak": measured[1],
                                      "planned_peak": peak, "planned_peak_phase": phase,
                                      "planned_non_moe_peak": resid + non_moe[0], "planned_non_moe_phase": non_moe[1],
                                      "phases": {ph: sum(b.values()) for ph, b in phases.items()}})
    finally:
        llm.shutdown()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    g = mp.fmt_gib
    print(f"{result['device']}  {result['config']}  chunk {args.chunk}  (GiB)")
    print(f"resident (weights + KV @ {cache_tokens}): measured {g(resident)}  planned {g(planned_resident)}  "
          f"diff {resident - planned_resident:+,d} B")
    print(f"{'context':>8} {'measured peak':>14} {'plan peak (phase)':>32} {'plan non-MoE peak (phase)':>36}")
    for r in result["prefill"]:
        plan_peak = f"{g(r['planned_peak'])} ({r['planned_peak_phase']})"
        non_moe = f"{g(r['planned_non_moe_peak'])} ({r['planned_non_moe_phase']})"
        print(f"{r['context']:>8} {g(r['measured_peak']):>14} {plan_peak:>32} {non_moe:>36}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
