"""A/B of the Gluon sparse MLA prefill kernel's variants and the Triton kernel at the issue's shapes (H200).

    PYTHONPATH=. python3 benchmarks/sparse_mla_hopper_ab.py [--out FILE.json] [--only triton,hopper_ws,hopper_seesaw]

Shapes: t = 4096 queries, 128 / 64 heads, 576 / 512, top-k 2048 over a 64K-slot pool; indices random (the
issue's benchmark), "local" (neighbouring queries share 75% of their keys, as causal prefill does) and "l2"
(every row among 4096 slots: the gathers hit L2).
Each variant is checked against the Triton kernel on every row before it is timed; the probes (no softmax,
no gathers, neither: wrong results on purpose) bound where the Gluon kernel's time goes. The "roles" kernel's
probes, ``probe_roles_N`` (N a bit sum: 1 no softmax, 2 no gathers, 4 no P V, 8 no S), and the "pair" kernel's,
``probe_pair_N`` (2 no gathers after the first pair, 4 no P V, 6 neither), run only when named in --only.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

from dsaserve.kernels.sparse_attention import SparseMLAConfig, sparse_mla_triton
from dsaserve.kernels.sparse_mla_hopper import sparse_mla_prefill_hopper


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None,
                    help="comma list of variants to run (e.g. triton,hopper_ws,hopper_seesaw); default: all")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    dv, dr, topk, slots, t = 512, 64, 2048, 65536, 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv = torch.randn(slots, dv + dr, device="cuda", dtype=torch.bfloat16, generator=gen)
    rows = []
    for h in (128, 64):
        q = torch.randn(t, h, dv + dr, device="cuda", dtype=torch.bfloat16, generator=gen)
        rnd = torch.randint(0, slots, (t, topk), device="cuda", dtype=torch.int32, generator=gen)
        loc = rnd[:1].expand(t, topk).clone()
        swap = torch.rand(t, topk, device="cuda", generator=gen) < 0.25
        loc[swap] = rnd[swap]
        flops = 2 * t * topk * h * (dv + dr + dv)
        l2 = torch.randint(0, 4096, (t, topk), device="cuda", dtype=torch.int32, generator=gen)  # 4.7 MB of rows
        for name, idx in (("random", rnd), ("local", loc), ("l2", l2)):
            ref, rlse = sparse_mla_triton(q, kv, idx, 0.1, dv, config=SparseMLAConfig(), num_splits=1)
            # the one-partition kernel's flags and probes need variant="one_partition" (the default is "ws")
            variants = {"triton": lambda: sparse_mla_triton(q, kv, idx, 0.1, dv, config=SparseMLAConfig(), num_splits=1),
                        "hopper": lambda: sparse_mla_prefill_hopper(q, kv, idx, 0.1, dv, variant="one_partition"),
                        "hopper_ws": lambda: sparse_mla_prefill_hopper(q, kv, idx, 0.1, dv, variant="ws"),
                        "hopper_seesaw": lambda: sparse_mla_prefill_hopper(q, kv, idx, 0.1, dv, variant="seesaw"),
                        "hopper_roles": lambda: sparse_mla_prefill_hopper(q, kv, idx, 0.1, dv, variant="roles"),
                        "hopper_pair": lambda: sparse_mla_prefill_hopper(q, kv, idx, 0.1, dv, variant="pair"),
                        "hopper_pair_late_s": lambda: sparse_mla_prefill_hopper(q, kv, idx, 0.1, dv, variant="pair",
                                                                                early_s=False),
                        "hopper_ws_bk32": lambda: sparse_mla_prefill_hopper(q, kv, idx, 0.1, dv, variant="ws_bk32"),
                        "hopper_late_pv_noprefetch": lambda: sparse_mla_prefill_hopper(
                            q, kv, idx, 0.1, dv, prefetch_ids=False, early_pv=False, variant="one_partition")}
            for probe, what in ((1, "probe_no_softmax"), (2, "probe_no_gather"), (3, "probe_neither")):
                variants[what] = lambda probe=probe: sparse_mla_prefill_hopper(q, kv, idx, 0.1, dv, probe=probe,
                                                                               variant="one_partition")
            for probe in range(1, 16):  # the roles kernel: 1 no softmax, 2 no gathers, 4 no P V, 8 no S (bit sums)
                variants[f"probe_roles_{probe}"] = lambda probe=probe: sparse_mla_prefill_hopper(
                    q, kv, idx, 0.1, dv, probe=probe, variant="roles")
            for probe in (2, 4, 6):  # the pair kernel: 2 no gathers after the first pair, 4 no P V
                variants[f"probe_pair_{probe}"] = lambda probe=probe: sparse_mla_prefill_hopper(
                    q, kv, idx, 0.1, dv, probe=probe, variant="pair")
            for var, fn in variants.items():
                if (only is not None and var not in only) or (only is None and var.startswith(("probe_roles",
                                                                                                 "probe_pair"))):
                    continue  # the roles and pair probes run only when named
                if var.startswith("probe"):  # timing probes compute wrong results on purpose
                    fn()
                    ms = triton.testing.do_bench(fn, rep=200)
                    rows.append({"h": h, "indices": name, "variant": var, "ms": ms, "tflops": flops / ms / 1e9})
                    print(f"h={h:3d} {name:6s} {var:18s} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOPS  (probe)", flush=True)
                    continue
                out, lse = fn()
                err = float(((out.double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1)).max())
                lerr = float((lse - rlse).abs().max())
                ok = err < 1e-2 and lerr < 1e-4
                ms = triton.testing.do_bench(fn, rep=200) if ok else float("nan")
                row = {"h": h, "indices": name, "variant": var, "ms": ms, "tflops": flops / ms / 1e9,
                       "worst_row_rel_err_vs_triton": err, "lse_maxabs_vs_triton": lerr, "ok": ok}
                rows.append(row)
                print(f"h={h:3d} {name:6s} {var:18s} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOPS  err {err:.1e} "
                      f"lse {lerr:.1e} {'OK' if ok else 'WRONG'}", flush=True)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a, rep=200)
    ceiling = 2 * 8192**3 / ms / 1e9
    print(f"bf16 mm 8192^3 ceiling: {ceiling:.0f} TFLOPS", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M"),
                       "bf16_ceiling_tflops": ceiling, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
