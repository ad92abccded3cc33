"""The attention's value up-projection feeding an fp8 o_proj: torch's bmm + act_quant (two passes, the engine's
default) beside ``kernels.mla_value.value_proj_fp8`` (one Triton kernel, act_quant in its epilogue), same run.

    PYTHONPATH=. python3 benchmarks/mla_value.py --out OUT.json     (one GPU, ~15 s)

Shapes: one attention block of the engine's prefill (``TritonAttention._block``: 3640 tokens at 128 heads x 576,
DeepSeek-V3.2 with v = 128; 7281 at 64 heads, GLM-5 with v = 256) and a 16K-token chunk's worth of those blocks.
Times are ``triton.testing.do_bench`` medians (ms); GB/s counts the bytes each path must move at least (out_lat
and W_UV read, the fp8 input and its scales written; the two-pass path also writes and reads back the bf16 output).
"""

from __future__ import annotations

import argparse
import json

import torch

from dsaserve.bench.common import gpu_rows_record, save_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("mla_value.py measures GPU paths: run it on a CUDA machine")
    from triton.testing import do_bench

    from dsaserve.kernels import act_quant
    from dsaserve.kernels import mla_value as MV

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for what, t, h, v in (("DeepSeek-V3.2 block", 3640, 128, 128), ("GLM-5 block", 7281, 64, 256)):
        out_lat = torch.randn(t, h, 512, device="cuda", generator=gen).bfloat16()
        w = (torch.randn(h, v, 512, device="cuda", generator=gen) * 0.05).bfloat16()
        out = torch.empty(t, h, v, device="cuda", dtype=torch.bfloat16)

        def two_pass():
            torch.bmm(out_lat.transpose(0, 1), w.transpose(1, 2), out=out.transpose(0, 1))
            return act_quant(out.view(t, h * v), 128)

        def bmm_alone():
            torch.bmm(out_lat.transpose(0, 1), w.transpose(1, 2), out=out.transpose(0, 1))

        fused = lambda: MV.value_proj_fp8(out_lat, w)  # noqa: E731
        q, s = fused()
        rq, rs = two_pass()
        base = (out_lat.numel() + w.numel()) * 2 + t * h * v + t * h * v // 128 * 4     # read + fp8 write
        row = {"what": what, "t": t, "heads": h, "v": v,
               "ms_two_pass": do_bench(two_pass), "ms_bmm_alone": do_bench(bmm_alone),
               "ms_act_quant_alone": do_bench(lambda: act_quant(out.view(t, h * v), 128)),
               "ms_fused": do_bench(fused),
               "bytes_fused": base, "bytes_two_pass": base + 2 * t * h * v * 2,
               "bytes_equal_fraction": (q.view(torch.uint8) == rq.view(torch.uint8)).float().mean().item(),
               "scales_equal_fraction": (s == rs).float().mean().item()}
        row["speedup"] = row["ms_two_pass"] / row["ms_fused"]
        row["gbps_fused"] = base / row["ms_fused"] / 1e6
        row["gbps_two_pass"] = row["bytes_two_pass"] / row["ms_two_pass"] / 1e6
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        save_json_atomic(args.out, gpu_rows_record(rows))


if __name__ == "__main__":
    main()
