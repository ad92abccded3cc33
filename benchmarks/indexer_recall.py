"""Top-k recall of the fp8 indexer against the exact one, on the same layer inputs.

The model runs in exact indexer mode. Inside every indexer call, the same inputs (x, qr and the cached
keys) are also pushed through the fp8 path (Hadamard rotation + e4m3 with per-token / per-token-head
scales), and the two top-k sets are compared row by row:

    recall(row) = |topk_fp8(row) ∩ topk_exact(row)| / |topk_exact(row)|

over rows (queries) that see more keys than top-k (the others keep every key in both modes). Each prompt
runs as one prefill of one request, so the step's keys are exactly the request's keys 0..T-1.

    python benchmarks/indexer_recall.py [--model DIR] [--lengths 128,512] [--seed 0]

With no ``--model`` it builds the tiny DeepSeek-V3.2 checkpoint (cached). Prints per-layer and mean recall.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsaserve.model.indexer import Fp8Indexer, Indexer  # noqa: E402

FP8 = Fp8Indexer()


def _instrument(indexer: Indexer, layer: int, stats: dict[int, list[float]]) -> None:
    """Patch one indexer instance: every exact ``select`` is repeated in fp8 on the same inputs."""
    orig_project, orig_select = indexer.project, indexer.select
    state: dict = {}

    def project(x, qr, cos, sin, **projections):
        if indexer.numerics.fp8:
            raise RuntimeError("indexer_recall: run the model in indexer_mode='exact'")
        q, w, k, _ = exact = orig_project(x, qr, cos, sin, **projections)
        state["fp8"] = FP8.quantize(q, w, k, indexer.head_dim)                  # (q8, w8, k8, k_scale)
        return exact

    def select(q, w, keys, key_scale, q_pos):
        exact = orig_select(q, w, keys, key_scale, q_pos)                       # [t, topk]
        q8, w8, k8, k_scale = state["fp8"]
        if q8.shape[0] != q.shape[0] or k8.shape[0] != keys.shape[0]:
            raise RuntimeError("indexer_recall: expects one request prefilled in one chunk "
                               f"(queries {q.shape[0]} vs {q8.shape[0]}, keys {keys.shape[0]} vs {k8.shape[0]})")
        approx = orig_select(q8, w8, k8, k_scale, q_pos)
        rows = (q_pos + 1) > indexer.topk                                       # rows that really select
        for e_row, a_row in zip(exact[rows].tolist(), approx[rows].tolist()):
            e_set = {i for i in e_row if i >= 0}
            a_set = {i for i in a_row if i >= 0}
            stats[layer].append(len(e_set & a_set) / len(e_set))
        return exact

    indexer.project, indexer.select = project, select


def measure_recall(model_dir: str, lengths: list[int], seed: int = 0, dtype: str = "float32",
                   llm=None) -> dict:
    """Run one random prompt of each length; return {"mean": float, "per_layer": {layer: mean}, "rows": n}.

    ``llm``: an exact-mode ``LLM`` to reuse (its indexers are patched for the call and restored after).
    """
    from dsaserve import LLM, SamplingParams

    own = llm is None
    if own:
        llm = LLM(model_dir, dtype=dtype, indexer_mode="exact", chunked_prefill_size=max(lengths))
    runner = llm.engine.executor.runner
    if runner.backends.indexer.fp8:
        raise ValueError("measure_recall needs an LLM in indexer_mode='exact'")
    if llm.engine.args.chunked_prefill_size < max(lengths):
        raise ValueError("measure_recall needs chunked_prefill_size >= the longest prompt (one-chunk prefill)")
    indexers = {int(name.split(".")[1]): mod for name, mod in runner.model.named_modules()
                if isinstance(mod, Indexer)}
    stats: dict[int, list[float]] = defaultdict(list)
    try:
        for ix_layer, ix in indexers.items():
            _instrument(ix, ix_layer, stats)
        gen = torch.Generator().manual_seed(seed)
        vocab = llm.engine.cfg.vocab_size
        hi = min(vocab, llm.tokenizer.vocab_size) if llm.tokenizer is not None else vocab
        for n in lengths:
            prompt = torch.randint(0, hi, (n,), generator=gen).tolist()
            llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    finally:
        for ix in indexers.values():                                            # drop the instance patches
            ix.__dict__.pop("project", None)
            ix.__dict__.pop("select", None)
        if own:
            llm.shutdown()
    all_rows = [r for v in stats.values() for r in v]
    if not all_rows:
        raise ValueError(f"no query saw more than index_topk keys: use prompts longer than "
                         f"{llm.engine.cfg.index_topk} tokens")
    return {"mean": sum(all_rows) / len(all_rows),
            "per_layer": {layer: sum(v) / len(v) for layer, v in sorted(stats.items())},
            "min_row": min(all_rows), "rows": len(all_rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the cached tiny DeepSeek-V3.2)")
    parser.add_argument("--lengths", default="128,512", help="comma-separated prompt lengths (default: 128,512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    model_dir = args.model
    if model_dir is None:
        from dsaserve.checkpoint.tiny import default_tiny_dir

        model_dir = default_tiny_dir("deepseek_v32")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    res = measure_recall(model_dir, lengths, seed=args.seed, dtype=args.dtype)
    for layer, r in res["per_layer"].items():
        print(f"layer {layer}: recall {r:.4f}")
    print(f"fp8 vs exact indexer top-k recall: mean {res['mean']:.4f} (min row {res['min_row']:.3f}, "
          f"{res['rows']} rows, lengths {lengths}, {model_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
