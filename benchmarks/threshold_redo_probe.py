"""Why does the engine's threshold top-k redo rows? (device diagnostic, issue 12)

`bench prefill` counts the rows the threshold top-k redoes (`threshold_redo_rows`): 256 per 64K prompt on the
8-layer bench model (32 a layer; 128 on the 4-layer model), each redone query block costing one program of the
fused Triton kernel over the row's keys. This runs that prompt with `mqa_topk_threshold` wrapped: per call it
records the flagged rows (position, keys, candidates passed, the fullest stream, the threshold), keeps the inputs
of the first calls that redid rows, and then replays those inputs under other `ThresholdTopkConfig`s (caps,
margin, stride) and looks at the flagged rows' own logits (how many keys tie with the threshold, how many are 0).

    PYTHONPATH=. python3 benchmarks/threshold_redo_probe.py --out OUT.json [--config CFG] [--len 65536]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "benchmarks", "configs", "dsv32_8layer_32e.json"),
                   help="bench model config.json (random fp8 weights)")
    p.add_argument("--len", type=int, default=65536, help="prompt tokens")
    p.add_argument("--chunk-size", type=int, default=16384, help="chunked_prefill_size")
    p.add_argument("--keep", type=int, default=3, help="calls with redone rows whose inputs are replayed")
    p.add_argument("--out", required=True, help="JSON output")
    args = p.parse_args()

    from dsaserve.engine.llm import LLM
    from dsaserve.engine.types import SamplingParams
    from dsaserve.kernels import mqa_logits
    from dsaserve.kernels import threshold_topk as TT

    original = TT.mqa_topk_threshold
    calls: list[dict] = []
    kept: list[tuple] = []

    def wrapped(q_fp8, k_fp8, k_scale, weights, ks, ke, k, offset=0, num_sms=None, config=None, stats=None,
                mark=None, redo_rows=None):
        st: dict = {}
        out = original(q_fp8, k_fp8, k_scale, weights, ks, ke, k, offset, num_sms=num_sms, config=config, stats=st,
                       mark=mark, redo_rows=redo_rows)
        redo = st["redo"]
        n = int(redo.sum())
        entry = {"call": len(calls), "rows": q_fp8.shape[0], "keys": k_fp8.shape[0], "redo": n}
        if n:
            idx = redo.nonzero().flatten()
            entry["redo_rows"] = idx[:64].tolist()
            entry["redo_ke"] = ke[idx[:64]].tolist()
            if len(kept) < args.keep:
                kept.append((len(calls), *(t.detach().clone() for t in (q_fp8, k_fp8, k_scale, weights, ks, ke)), k))
        calls.append(entry)
        return out

    TT.mqa_topk_threshold = wrapped
    cache = -(-(args.len + 256) // 64) * 64
    llm = LLM(args.config, device="cuda", dtype="bfloat16", load_format="random", quantization="fp8",
              chunked_prefill_size=args.chunk_size, kv_cache_tokens=cache, max_model_len=cache, max_num_seqs=1)
    seed = 0  # bench prefill's default --seed: its prompt of this length (PrefillBench.prompt)
    g = torch.Generator().manual_seed(seed * 1_000_003 + args.len)
    with open(args.config) as f:
        vocab = json.load(f)["vocab_size"]
    tokens = torch.randint(2, vocab, (args.len,), generator=g).tolist()
    t0 = time.time()
    llm.generate([tokens], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    result: dict = {"len": args.len, "config": args.config, "prefill_s": time.time() - t0, "calls": calls,
                    "total_redo": sum(c["redo"] for c in calls), "replays": []}
    print(f"[probe] {len(calls)} threshold calls, {result['total_redo']} redone rows", flush=True)
    for c in calls:
        if c["redo"]:
            print(f"  call {c['call']}: rows {c['rows']} keys {c['keys']} redo {c['redo']} rows {c['redo_rows'][:16]} "
                  f"ke {c['redo_ke'][:16]}", flush=True)

    TT.mqa_topk_threshold = original
    base = TT.ThresholdTopkConfig()
    variants = {"default": base, "caps1024": TT.ThresholdTopkConfig(caps=1024),
                "margin3": TT.ThresholdTopkConfig(margin=3.0, caps=768),
                "stride16": TT.ThresholdTopkConfig(stride=16), "margin1.5": TT.ThresholdTopkConfig(margin=1.5)}
    for call, q, kf, ksc, w, ks, ke, k in kept:
        rep: dict = {"call": call, "by_config": {}}
        for name, cfg in variants.items():
            st: dict = {}
            torch.cuda.synchronize()
            t = time.time()
            TT.mqa_topk_threshold(q, kf, ksc, w, ks, ke, k, config=cfg, stats=st)
            torch.cuda.synchronize()
            redo = st["redo"]
            rep["by_config"][name] = {"redo": int(redo.sum()), "ms": (time.time() - t) * 1e3}
        # the default's flagged rows: their candidate counts per stream, the threshold, and their own logits
        st = {}
        thr = TT.sample_thresholds(q, kf, ksc, w, ks, ke, k, base)
        TT.mqa_topk_threshold(q, kf, ksc, w, ks, ke, k, config=base, stats=st)
        idx = st["redo"].nonzero().flatten()[:16]
        rows = []
        from dsaserve.kernels.indexer_logits_hopper import mqa_threshold_candidates

        _, counts = mqa_threshold_candidates(q, kf, ksc, w, ks, ke, thr, base.caps)
        for i in idx.tolist():
            lg = mqa_logits(q[i:i + 1].contiguous(), kf, ksc, w[i:i + 1].contiguous(), ks[i:i + 1].contiguous(),
                            ke[i:i + 1].contiguous())[0]
            n = int(ke[i]) - int(ks[i])
            row = lg[int(ks[i]):int(ke[i])]
            t_i = float(thr[i])
            srt = torch.sort(row, descending=True).values
            kth = float(srt[min(k, n) - 1])
            rows.append({"row": i, "keys": n, "thr": t_i, "kth": kth, "max": float(srt[0]), "min": float(srt[-1]),
                         "passed": int((row >= t_i).sum()), "equal_thr": int((row == t_i).sum()),
                         "zeros": int((row == 0).sum()), "equal_kth": int((row == kth).sum()),
                         "stream_counts": counts[i].tolist(),
                         "sampled_rank_of_thr": int((row[::base.stride] >= t_i).sum()),
                         "r": math.ceil(base.margin * k / base.stride)})
        rep["flagged_rows"] = rows
        result["replays"].append(rep)
        print(f"[replay] call {call}: " + ", ".join(f"{n} redo {v['redo']} ({v['ms']:.2f} ms)"
                                                     for n, v in rep["by_config"].items()), flush=True)
        for r in rows[:8]:
            print(f"   row {r['row']}: keys {r['keys']} thr {r['thr']:.4g} kth {r['kth']:.4g} passed {r['passed']} "
                  f"=thr {r['equal_thr']} zeros {r['zeros']} =kth {r['equal_kth']} max stream "
                  f"{max(r['stream_counts'])} sampled>=thr {r['sampled_rank_of_thr']}", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    llm.shutdown()


if __name__ == "__main__":
    main()
