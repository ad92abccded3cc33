"""Same-run A/B of the threshold filter (the Gluon logits kernel with FILTER): this tree's group prefix with two
outputs vs 1e9e118's packed one (scratch/ilh_prev.py, loaded as a sibling module), filter alone and whole path,
interleaved, 8K x 64K causal."""
import importlib.util, json, sys, torch, triton
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from kernels import logits_inputs
from dsaserve import kernels as K
from dsaserve.kernels import indexer_logits_hopper as G
from dsaserve.kernels import threshold_topk as TT
from dsaserve.kernels.indexer_logits import LogitsConfig

spec = importlib.util.spec_from_file_location("dsaserve.kernels._ilh_prev", "scratch/ilh_prev.py")
old = importlib.util.module_from_spec(spec); sys.modules[spec.name] = old; spec.loader.exec_module(old)
NEW = G.mqa_threshold_candidates
out = {}
for h in (64, 32):
    ins = logits_inputs(8192, 65536, h, 128, True, seed=21)
    cfg = TT.ThresholdTopkConfig()
    thr = TT.sample_thresholds(*ins, 2048, cfg)
    cn, nn = NEW(*ins, thr, cfg.caps)
    co, no = old.mqa_threshold_candidates(*ins, thr, cfg.caps)
    res = {"same_candidates": torch.equal(cn, co) and torch.equal(nn, no)}
    for _ in range(3):
        for name, fn in (("new", NEW), ("old", old.mqa_threshold_candidates)):
            res.setdefault(f"filter_{name}", []).append(triton.testing.do_bench(lambda: fn(*ins, thr, cfg.caps), rep=200))
            G.mqa_threshold_candidates = fn
            res.setdefault(f"whole_{name}", []).append(triton.testing.do_bench(lambda: TT.mqa_topk_threshold(*ins, 2048), rep=200))
            G.mqa_threshold_candidates = NEW
    res["logits_triton"] = triton.testing.do_bench(lambda: K.mqa_logits(*ins, config=LogitsConfig(4 if h == 64 else 8, 64, 4, 3, 2)), rep=200)
    res["logits_gluon"] = triton.testing.do_bench(lambda: K.mqa_logits(*ins, kernel="gluon"), rep=200)
    out[h] = res
    print(h, json.dumps(res), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
