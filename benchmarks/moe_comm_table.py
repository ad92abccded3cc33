"""MoE bytes each CP rank moves per prompt: before issue 11 (experts split by intermediate dim, bf16 tokens
all-gathered and partials reduce-scattered) and after (experts split by expert: tokens gathered as the experts
take them, bf16 or e4m3 + scales, plus ids and weights). From the config alone
(``memory_plan.moe_comm_bytes``, the formula the engine's ``llm.stats()`` counters are tested against in
tests/parallel/test_expert_parallel.py).

    python benchmarks/moe_comm_table.py --config benchmarks/configs/deepseek_v32.json --prompt 65536 \\
        --layouts 2x8,1x8 --out benchmarks/results/moe_comm_v32_64k.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from dsaserve.plan_cli import load_model_config  # noqa: E402
from dsaserve.model import memory_plan as mp  # noqa: E402
from dsaserve.parallel.layout import Layout  # noqa: E402

VARIANTS = {  # name -> (moe_split, fp8 experts)
    "before (intermediate split, bf16)": ("intermediate", False),
    "after (expert split, bf16)": ("expert", False),
    "after (expert split, fp8)": ("expert", True),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "benchmarks", "configs", "deepseek_v32.json"),
                   help="a config.json or a checkpoint folder")
    p.add_argument("--prompt", type=int, default=65536, help="prompt tokens (default %(default)s)")
    p.add_argument("--chunk", type=int, default=8192, help="chunked prefill size (default %(default)s)")
    p.add_argument("--layouts", default="2x8,1x8", help="PPxCP layouts, comma-separated (default %(default)s)")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    a = p.parse_args(argv)
    cfg = load_model_config(a.config)
    rows = []
    for lay in a.layouts.split(","):
        pp, cp = (int(v) for v in lay.lower().split("x"))
        layout = Layout.build(cfg, pp, cp)
        for stage, layers in enumerate(layout.stage_layers):
            for name, (split, fp8) in VARIANTS.items():
                b = mp.moe_comm_bytes(cfg, layers, prompt_tokens=a.prompt, chunk_tokens=a.chunk, cp_size=cp,
                                      dtype="bfloat16", moe_split=split, fp8_experts=fp8)
                rows.append({"layout": lay, "stage": stage, "layers": [layers.start, layers.stop],
                             "variant": name, "bytes": b, "total": sum(b.values())})
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "command": "python benchmarks/moe_comm_table.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "config": os.path.relpath(os.path.abspath(a.config), REPO), "prompt": a.prompt, "chunk": a.chunk}
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"MoE bytes per CP rank per {a.prompt}-token prompt ({meta['config']}, chunks of {a.chunk}, GB = 1e9)")
    print(f"{'layout':>6} {'stage':>5} {'variant':<36} {'gather':>8} {'routing':>8} {'scatter':>8} {'total':>8}")
    for r in rows:
        b = r["bytes"]
        print(f"{r['layout']:>6} {r['stage']:>5} {r['variant']:<36} {b['moe_gather'] / 1e9:8.2f} "
              f"{b.get('moe_route_gather', 0) / 1e9:8.2f} {b['moe_scatter'] / 1e9:8.2f} {r['total'] / 1e9:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
