"""Same-run A/B of the threshold top-k's sample: keys read in place by the Triton logits kernel (key_stride, this
tree) vs 29d65d8's gathered keys and range arithmetic (monkeypatched in), whole path and sample alone, interleaved."""
import json, sys, torch, triton
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from kernels import logits_inputs
from dsaserve import kernels as K
from dsaserve.kernels import threshold_topk as TT

NEW = TT.sample_thresholds


def old_sample(q_fp8, k_fp8, k_scale, weights, ks, ke, k, cfg, num_sms=None):  # 29d65d8's sample_thresholds
    s, skv = q_fp8.shape[0], k_fp8.shape[0]
    r = TT.sample_ranks(k, cfg)
    cols = torch.arange(0, skv, cfg.stride, device=q_fp8.device)
    thr = torch.full((s,), float("-inf"), dtype=torch.float32, device=q_fp8.device)
    if cols.numel() < r:
        return thr
    k_s, ksc_s = k_fp8[cols].contiguous(), k_scale[cols].contiguous()
    ks_s = ((ks.clamp(0, skv) + cfg.stride - 1) // cfg.stride).to(torch.int32)
    ke_s = ((ke.clamp(0, skv) + cfg.stride - 1) // cfg.stride).to(torch.int32)
    rows_kernel = "gluon" if TT.use_gluon_rows(cfg.select, q_fp8) else "triton"
    for r0 in range(0, s, cfg.rows):
        r1 = min(s, r0 + cfg.rows)
        sample = K.mqa_logits(q_fp8[r0:r1], k_s, ksc_s, weights[r0:r1], ks_s[r0:r1], ke_s[r0:r1], num_sms=num_sms)
        TT.row_thresholds(sample, r, out=thr[r0:r1], kernel=rows_kernel)
    return thr


out = {}
for h in (64, 32):
    ins = logits_inputs(8192, 65536, h, 128, True, seed=21)
    cfg = TT.ThresholdTopkConfig()
    t_new, t_old = NEW(*ins, 2048, cfg), old_sample(*ins, 2048, cfg)
    same_thr = torch.equal(t_new, t_old)
    TT.sample_thresholds = NEW
    r_new = TT.mqa_topk_threshold(*ins, 2048)
    TT.sample_thresholds = old_sample
    r_old = TT.mqa_topk_threshold(*ins, 2048)
    same_rows = torch.equal(r_new, r_old)
    res = {"same_thresholds": same_thr, "same_rows": same_rows, "whole_new": [], "whole_old": [], "sample_new": [],
           "sample_old": []}
    for _ in range(3):
        for name, fn in (("new", NEW), ("old", old_sample)):
            TT.sample_thresholds = fn
            res[f"whole_{name}"].append(triton.testing.do_bench(lambda: TT.mqa_topk_threshold(*ins, 2048), rep=200))
            res[f"sample_{name}"].append(triton.testing.do_bench(lambda: fn(*ins, 2048, cfg), rep=100))
    TT.sample_thresholds = NEW
    from dsaserve.kernels.indexer_logits import LogitsConfig
    lcfg = LogitsConfig(4 if h == 64 else 8, 64, 4, 3, 2)
    res["logits_triton"] = triton.testing.do_bench(lambda: K.mqa_logits(*ins, config=lcfg), rep=200)
    res["logits_gluon"] = triton.testing.do_bench(lambda: K.mqa_logits(*ins, kernel="gluon"), rep=200)
    out[h] = res
    print(h, json.dumps(res), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
