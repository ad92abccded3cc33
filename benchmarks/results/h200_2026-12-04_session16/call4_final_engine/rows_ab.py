"""Same-run A/B of ThresholdTopkConfig.rows (queries a sample block): 4096 (default) vs 8192, whole threshold path at
8K x 64K causal, interleaved; the logits kernels alone for the ratio."""
import json, sys, torch, triton
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from kernels import logits_inputs
from dsaserve import kernels as K
from dsaserve.kernels import threshold_topk as TT
from dsaserve.kernels.indexer_logits import LogitsConfig

out = {}
for h in (64, 32):
    ins = logits_inputs(8192, 65536, h, 128, True, seed=21)
    cfgs = {"rows4096": TT.ThresholdTopkConfig(), "rows8192": TT.ThresholdTopkConfig(rows=8192)}
    res = {"same_rows": torch.equal(TT.mqa_topk_threshold(*ins, 2048, config=cfgs["rows4096"]),
                                    TT.mqa_topk_threshold(*ins, 2048, config=cfgs["rows8192"]))}
    for _ in range(3):
        for name, cfg in cfgs.items():
            res.setdefault(name, []).append(
                triton.testing.do_bench(lambda: TT.mqa_topk_threshold(*ins, 2048, config=cfg), rep=200))
    lcfg = LogitsConfig(4 if h == 64 else 8, 64, 4, 3, 2)
    res["logits_triton"] = triton.testing.do_bench(lambda: K.mqa_logits(*ins, config=lcfg), rep=200)
    res["logits_gluon"] = triton.testing.do_bench(lambda: K.mqa_logits(*ins, kernel="gluon"), rep=200)
    out[h] = res
    print(h, json.dumps(res), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
