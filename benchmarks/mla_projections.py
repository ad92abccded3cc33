"""The absorbed MLA projections around the sparse attention, the engine's default (torch's bmm and a second pass)
beside one Triton kernel each, same run, same inputs:
  * query: q_nope @ W_UK per head + RoPE of q_pe into the [t, H, 576] buffer (bmm + the RoPE kernel, vs
    ``kernels.mla_query.query_proj_rope``; its (BM, BN, warps, stages) configs swept);
  * value: out_lat @ W_UV^T per head + o_proj's act_quant (bmm + act_quant, vs ``kernels.mla_value.value_proj_fp8``).

    PYTHONPATH=. python3 benchmarks/mla_projections.py --out OUT.json     (one GPU, ~30 s)

Shapes: one attention block of the engine's prefill (``TritonAttention._block``: 3640 tokens at 128 heads x 576,
DeepSeek-V3.2, v = 128; 7281 at 64 heads, GLM-5, v = 256; the query side at V3.2's nope 128 / rope 64 for both).
Times are ``triton.testing.do_bench`` medians (ms); GB/s counts the bytes each path must move at least.
"""

from __future__ import annotations

import argparse
import json

import torch

from dsaserve.bench.common import gpu_rows_record, save_json_atomic

QUERY_CONFIGS = [(64, 128, 4, 2), (64, 128, 4, 3), (128, 128, 8, 2), (64, 256, 8, 2), (32, 128, 4, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("mla_projections.py measures GPU paths: run it on a CUDA machine")
    from triton.testing import do_bench

    from dsaserve.kernels import act_quant, rope
    from dsaserve.kernels import mla_query as MQ
    from dsaserve.kernels import mla_value as MV

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for what, t, h, v in (("DeepSeek-V3.2 block", 3640, 128, 128), ("GLM-5 block", 7281, 64, 256)):
        # query side: q rows of 192 (nope 128 | rope 64), W_UK the key rows of kv_b
        q = torch.randn(t, h, 192, device="cuda", generator=gen).bfloat16()
        kv_b = (torch.randn(h, 128 + v, 512, device="cuda", generator=gen) * 0.05).bfloat16()
        w_uk, w_uv = kv_b[:, :128], kv_b[:, 128:]
        ang = torch.randn(t, 32, device="cuda", generator=gen) * 3
        cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
        q_abs, q_ref = (torch.empty(t, h, 576, device="cuda", dtype=torch.bfloat16) for _ in range(2))

        def query_two_pass():
            torch.bmm(q[..., :128].transpose(0, 1), w_uk, out=q_ref[..., :512].transpose(0, 1))
            rope(q[..., 128:], cos, sin, True, out=q_ref[..., 512:])

        query_two_pass()
        MQ.query_proj_rope(q, w_uk, cos, sin, q_abs)
        q_bytes = t * h * (192 + 576) * 2 + w_uk.numel() * 2
        row = {"what": what, "t": t, "heads": h, "v": v,
               "query": {"ms_two_pass": do_bench(query_two_pass),
                         "ms_fused": do_bench(lambda: MQ.query_proj_rope(q, w_uk, cos, sin, q_abs)),
                         "bytes": q_bytes, "rope_equal": torch.equal(q_abs[..., 512:], q_ref[..., 512:]),
                         "latent_equal_fraction": (q_abs[..., :512] == q_ref[..., :512]).float().mean().item()}}
        configs = {}
        for cfg in QUERY_CONFIGS:
            try:
                MQ.query_proj_rope(q, w_uk, cos, sin, q_abs, config=cfg)
                ms = do_bench(lambda: MQ.query_proj_rope(q, w_uk, cos, sin, q_abs, config=cfg))
                same = (q_abs[..., :512] == q_ref[..., :512]).float().mean().item()
                configs[str(cfg)] = {"ms": ms, "latent_equal_fraction": same}
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                configs[str(cfg)] = {"error": str(e)[:200]}
        row["query"]["configs"] = configs
        row["query"]["speedup"] = row["query"]["ms_two_pass"] / row["query"]["ms_fused"]
        # value side: out_lat [t, H, 512] -> o_proj's e4m3 input and scales
        out_lat = torch.randn(t, h, 512, device="cuda", generator=gen).bfloat16()
        out = torch.empty(t, h, v, device="cuda", dtype=torch.bfloat16)

        def value_two_pass():
            torch.bmm(out_lat.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
            return act_quant(out.view(t, h * v), 128)

        fq, fs = MV.value_proj_fp8(out_lat, w_uv)
        rq, rs = value_two_pass()
        v_bytes = (out_lat.numel() + w_uv.numel()) * 2 + t * h * v + t * h * v // 128 * 4
        row["value"] = {"ms_two_pass": do_bench(value_two_pass),
                        "ms_bmm_alone": do_bench(lambda: torch.bmm(out_lat.transpose(0, 1), w_uv.transpose(1, 2),
                                                                   out=out.transpose(0, 1))),
                        "ms_fused": do_bench(lambda: MV.value_proj_fp8(out_lat, w_uv)), "bytes": v_bytes,
                        "bytes_equal_fraction": (fq.view(torch.uint8) == rq.view(torch.uint8)).float().mean().item(),
                        "scales_equal_fraction": (fs == rs).float().mean().item()}
        row["value"]["speedup"] = row["value"]["ms_two_pass"] / row["value"]["ms_fused"]
        for side in ("query", "value"):
            row[side]["gbps_fused"] = row[side]["bytes"] / row[side]["ms_fused"] / 1e6
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        save_json_atomic(args.out, gpu_rows_record(rows))


if __name__ == "__main__":
    main()
