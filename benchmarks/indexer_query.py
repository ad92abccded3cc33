"""The fp8 indexer's query path (RoPE, Hadamard, e4m3 per head, the head weights times the scales): the Triton kernel
(``key_path``, the default) beside the Gluon one (``key_path_gluon``, one row a thread), same run, same inputs.

    PYTHONPATH=. python3 benchmarks/indexer_query.py --out OUT.json     (one GPU, ~10 s)

Shape: one 16K-token prefill chunk of the 8-layer bench model's indexer (64 heads x 128, 64 rope dims), q the wq_b
block of the fused q_b | wq_b output (its token stride), both rope layouts. Times are ``triton.testing.do_bench``
medians (ms); GB/s counts the bytes moved at least (q read, e4m3 written, cos / sin and the weights).
"""

from __future__ import annotations

import argparse
import json

import torch

from dsaserve.bench.common import gpu_rows_record, save_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens of the chunk")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("indexer_query.py measures GPU kernels: run it on a CUDA machine")
    from triton.testing import do_bench

    from dsaserve import kernels as K

    n, h, d = args.tokens, 64, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    qf = (torch.randn(n, 2 * h * d, device="cuda", generator=gen) * 2).bfloat16()
    q = qf[:, h * d:].view(n, h, d)
    ang = torch.randn(n, 32, device="cuda", generator=gen) * 3
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    w = torch.randn(n, h, device="cuda", generator=gen)
    moved = n * h * d * 3 + n * h * 4 * 2 + n * 32 * 2 * 2
    rows = []
    for interleaved in (False, True):
        tq, tw = K.indexer_query(q, cos, sin, interleaved, w)
        gq, gw = K.indexer_query(q, cos, sin, interleaved, w, kernel="gluon")
        row = {"tokens": n, "heads": h, "dim": d, "interleaved": interleaved,
               "same_bits": torch.equal(tq.view(torch.uint8), gq.view(torch.uint8)) and torch.equal(tw, gw),
               "ms_triton": do_bench(lambda: K.indexer_query(q, cos, sin, interleaved, w)),
               "ms_gluon": do_bench(lambda: K.indexer_query(q, cos, sin, interleaved, w, kernel="gluon")),
               "bytes": moved}
        row["speedup"] = row["ms_triton"] / row["ms_gluon"]
        row["gbps_triton"], row["gbps_gluon"] = moved / row["ms_triton"] / 1e6, moved / row["ms_gluon"] / 1e6
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        save_json_atomic(args.out, gpu_rows_record(rows))


if __name__ == "__main__":
    main()
