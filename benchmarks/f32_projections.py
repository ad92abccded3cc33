"""The prefill fp32 projections (router logits, the indexer's head weights) on the GPU: the previous path (x cast
to fp32, then cuBLAS's fp32 GEMM) beside the exact bf16 split of the weight with the Triton split GEMM
(``kernels.f32_linear.linear_f32``) and with one cuBLAS bf16 GEMM over the three parts (fp32 output, the tensor
core accumulating all of K), with each one's error against the exact (fp64) product. Then the same weight rounded
to bf16 (how DeepSeek's checkpoints store these two): the split GEMM over its one nonzero part (``parts=1``, what
the engine runs after ``DSAModel.weights_loaded``) beside the three-part one, which must give the same bits.

    PYTHONPATH=. python3 benchmarks/f32_projections.py --out OUT.json     (one GPU, ~20 s)

Shapes: 16384 rows (one prefill chunk) x hidden 7168 -> 32 / 256 experts (the two bench models' routers) and
64 index heads. Times are ``triton.testing.do_bench`` medians (ms); errors are max |y - exact| / max |exact|.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


SPLIT_CONFIGS = [(128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 128, 8, 3, True), (64, 128, 4, 3, True),
                 (64, 256, 8, 3, True), (128, 256, 8, 3, True), (128, 128, 8, 4, True), (64, 64, 4, 3, True),
                 (64, 32, 4, 3, True), (128, 32, 4, 3, True), (128, 64, 4, 4, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--rows", type=int, default=16384, help="rows of x (tokens of a prefill chunk)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("f32_projections.py measures GPU paths: run it on a CUDA machine")
    from triton.testing import do_bench

    from dsaserve.kernels import f32_linear as F32

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for n, what in ((32, "router, 32 experts"), (256, "router, 256 experts"), (64, "indexer head weights")):
        x = torch.randn(args.rows, 7168, device="cuda", generator=gen).to(torch.bfloat16)
        w = torch.randn(n, 7168, device="cuda", generator=gen) * 0.02
        exact = x.double() @ w.double().t()
        scale = exact.abs().max().item()
        xf = F32.to_f32(x)
        old = F.linear(xf, w)
        new = F32.linear_f32(x, w)
        parts = F32.bf16_split3(w).view(3 * n, -1)

        def one_gemm():
            y3 = torch.mm(x, parts.t(), out_dtype=torch.float32)
            return y3[:, :n] + (y3[:, n:2 * n] + y3[:, 2 * n:])

        row = {"what": what, "m": args.rows, "k": 7168, "n": n,
               "ms_cast_then_fp32_gemm": do_bench(lambda: F.linear(F32.to_f32(x), w)),
               "ms_fp32_gemm_alone": do_bench(lambda: F.linear(xf, w)),
               "ms_bf16_split": do_bench(lambda: F32.linear_f32(x, w)),
               "ms_split_weight_alone": do_bench(lambda: F32.bf16_split3(w)),
               "ms_one_cublas_bf16_gemm": do_bench(one_gemm),
               "err_one_cublas_bf16_gemm": (one_gemm().double() - exact).abs().max().item() / scale,
               "err_cast_then_fp32_gemm": (old.double() - exact).abs().max().item() / scale,
               "err_bf16_split": (new.double() - exact).abs().max().item() / scale}
        row["speedup"] = row["ms_cast_then_fp32_gemm"] / row["ms_bf16_split"]
        # the split GEMM's tiles and grid order (BM, BN, warps, stages, column tiles fastest), each checked
        # against the exact product like the default
        variants = {}
        for cfg in SPLIT_CONFIGS:
            if cfg[1] > 2 * n:
                continue
            try:
                y = F32.linear_f32_split(x, w, config=cfg)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                variants[str(cfg)] = {"error": str(e)[:200]}
                continue
            variants[str(cfg)] = {"ms": do_bench(lambda: F32.linear_f32_split(x, w, config=cfg)),
                                  "err": (y.double() - exact).abs().max().item() / scale}
        row["split_default_config"] = str(F32.split_gemm_config(n))
        row["split_variants"] = variants
        # a weight stored as bf16: one part (the engine's path for such checkpoints) vs three, same bits
        w1 = w.bfloat16().float()
        one, three = F32.linear_f32(x, w1, parts=1), F32.linear_f32(x, w1)
        row["bf16_weight"] = {"parts_needed": F32.bf16_parts_needed(w1), "one_part_equals_three": torch.equal(one, three),
                              "ms_three_parts": do_bench(lambda: F32.linear_f32(x, w1)),
                              "ms_one_part": do_bench(lambda: F32.linear_f32(x, w1, parts=1)),
                              "ms_split_weight_alone_one_part": do_bench(lambda: F32.bf16_split3(w1, parts=1))}
        row["bf16_weight"]["speedup"] = row["bf16_weight"]["ms_three_parts"] / row["bf16_weight"]["ms_one_part"]
        one_variants = {}
        for cfg in SPLIT_CONFIGS:
            if cfg[1] > 2 * n:
                continue
            try:  # against the same tiles over three parts: the tiles may change the sums' order, the parts may not
                y1, y3 = (F32.linear_f32_split(x, w1, config=cfg, parts=p) for p in (1, 3))
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                one_variants[str(cfg)] = {"error": str(e)[:200]}
                continue
            one_variants[str(cfg)] = {"ms": do_bench(lambda: F32.linear_f32_split(x, w1, config=cfg, parts=1)),
                                      "equals_three_parts": torch.equal(y1, y3)}
        row["bf16_weight"]["one_part_variants"] = one_variants
        print(json.dumps(row), flush=True)
        rows.append(row)
        del xf
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
