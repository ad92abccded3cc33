"""Fingerprint of the engine's outputs on a tiny checkpoint: greedy tokens + top-k logprobs, written as JSON.

Use it to show that a change which must not alter behaviour (a refactor) leaves every output bit-identical
on CPU: run it before and after, then compare the two files (``--compare``: floats with ==).

    python benchmarks/output_fingerprint.py --out /tmp/fp_before.json
    ... change the code ...
    python benchmarks/output_fingerprint.py --out /tmp/fp_after.json --compare /tmp/fp_before.json

Cases: the tiny DeepSeek-V3.2 checkpoint on layouts 1x1, 2x2, 3x1, 1x3 (chunked prefill of 64 tokens,
prompts shorter than, around and far above index_topk = 32), the zigzag split, the fp8 indexer, the
kernel attention path (the kernels' PyTorch references on CPU), and GLM-5 (shared indexer layers) on 1x1
and 1x3. Each LLM is shut down before the next one starts (one process group per process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsaserve import LLM, SamplingParams  # noqa: E402
from dsaserve.checkpoint.tiny import make_tiny_checkpoint  # noqa: E402

PROMPT_LENS = (1, 7, 33, 100, 300)
MAX_TOKENS = 6
TOPK_LOGPROBS = 5
BASE = dict(kv_cache_tokens=4096, max_model_len=2048, chunked_prefill_size=64, indexer_mode="exact")

# name -> (arch, engine options)
CASES: dict[str, tuple[str, dict]] = {
    "ds-1x1": ("deepseek_v32", dict(pp_size=1, cp_size=1)),
    "ds-2x2": ("deepseek_v32", dict(pp_size=2, cp_size=2)),
    "ds-3x1": ("deepseek_v32", dict(pp_size=3, cp_size=1)),
    "ds-1x3": ("deepseek_v32", dict(pp_size=1, cp_size=3)),
    "ds-2x2-zigzag": ("deepseek_v32", dict(pp_size=2, cp_size=2, cp_split="zigzag")),
    "ds-1x1-fp8": ("deepseek_v32", dict(pp_size=1, cp_size=1, indexer_mode="fp8")),
    "ds-2x2-fp8": ("deepseek_v32", dict(pp_size=2, cp_size=2, indexer_mode="fp8")),
    "ds-1x1-kernels": ("deepseek_v32", dict(pp_size=1, cp_size=1, attention="kernels")),
    "ds-1x3-kernels-fp8": ("deepseek_v32", dict(pp_size=1, cp_size=3, attention="kernels", indexer_mode="fp8")),
    "glm-1x1": ("glm_moe_dsa", dict(pp_size=1, cp_size=1)),
    "glm-1x3": ("glm_moe_dsa", dict(pp_size=1, cp_size=3)),
}


def prompt_ids(length: int) -> list[int]:
    gen = torch.Generator().manual_seed(1_000_003 + length)
    return torch.randint(5, 480, (length,), generator=gen).tolist()


def _engine_options(options: dict) -> dict:
    """The case's options as ``LLM`` keywords. ``attention`` names the attention implementation: the
    ``attention_backend`` engine option ("kernels" is called "triton" there)."""
    opts = dict(options)
    attention = opts.pop("attention", None)
    if attention is not None:
        opts["attention_backend"] = {"kernels": "triton"}.get(attention, attention)
    return opts


def run_case(ckpt: str, options: dict) -> list[dict]:
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOPK_LOGPROBS)
    llm = LLM(ckpt, **{**BASE, **_engine_options(options)})
    try:
        outs = llm.generate([prompt_ids(n) for n in PROMPT_LENS], params, use_tqdm=False)
    finally:
        llm.shutdown()
    return [{"prompt_len": len(o.prompt_token_ids), "tokens": o.token_ids, "text": o.text,
             "finish_reason": o.finish_reason,
             "logprobs": [[[int(t), float(v)] for t, v in sorted(lp.items())] for lp in o.logprobs]}
            for o in outs]


def compare(old: dict, new: dict) -> list[str]:
    """Every difference of the cases in ``new`` from ``old`` (exact: == on floats)."""
    diffs = []
    a, b = old, new
    for case in sorted(b):
        if case not in a:
            diffs.append(f"{case}: not in the old file")
            continue
        for i, (x, y) in enumerate(zip(a[case], b[case])):
            for key in x:
                if x[key] != y.get(key):
                    diffs.append(f"{case} prompt {i} ({x['prompt_len']} tokens): {key} differs")
    return diffs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--ckpt-dir", default="/tmp/dsaserve_fingerprint_ckpt",
                   help="where the tiny checkpoints are built (default: %(default)s)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--compare", default=None, help="an earlier fingerprint JSON to compare with (exit 1 if different)")
    args = p.parse_args()
    torch.set_num_threads(1)
    ckpts: dict[str, str] = {}
    result: dict[str, list] = {}
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        arch, options = CASES[name]
        if arch not in ckpts:
            ckpts[arch] = make_tiny_checkpoint(os.path.join(args.ckpt_dir, arch), arch=arch)
        t = time.monotonic()
        result[name] = run_case(ckpts[arch], options)
        print(f"{name:22s} {time.monotonic() - t:6.1f} s  tokens of the {PROMPT_LENS[-1]}-token prompt: "
              f"{result[name][-1]['tokens']}", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)
        diffs = compare(old, result)
        for d in diffs:
            print("DIFF", d)
        print(f"compared {len(result)} cases with {args.compare}: " + ("IDENTICAL" if not diffs else f"{len(diffs)} differences"))
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
