"""SM-budget benchmark: the indexer logits kernel on a rank whose PP recv is pending (data arrives late).

Run on a 2-GPU machine (rank 0 = the previous stage's sender, rank 1 = the measured receiver):

    NCCL_NVLS_ENABLE=0 PYTHONPATH=. python3 -m torch.distributed.run --nproc-per-node 2 \
        benchmarks/sm_budget.py --out $OUT/sm_budget.json

For each PP communicator (NCCL's default, and limited with max_ctas = 1 and 4 through
``make_pp_group_options``) rank 1 times mqa_logits (CUDA events around the kernel only):
  alone at the full grid, alone at the reduced grid, with the recv pending at the full grid, and with the
recv pending at the reduced grid num_sms = SMs - reservation (``indexer_num_sms``).
P1 = latency(recv pending, automatic reservation, PP comm limited to --pp-comm-ctas) / latency(alone, full grid).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from benchmarks.kernels import logits_inputs
from dsaserve import kernels as K
from dsaserve.kernels.indexer_logits import LogitsConfig
from dsaserve.parallel.sm_budget import indexer_num_sms, make_pp_group_options


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--s", type=int, default=8192, help="queries (a causal chunk at the end of the context)")
    ap.add_argument("--skv", type=int, default=65536)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--pp-comm-ctas", default="1,4", help="CTA limits of the limited PP communicators")
    ap.add_argument("--msg-mb", type=int, default=64)
    ap.add_argument("--config", default="", help="logits tile config 'bq,bk,warps,stages,ctas_per_sm' (default: the kernel's)")
    args = ap.parse_args()
    assert os.environ.get("NCCL_NVLS_ENABLE") == "0", "set NCCL_NVLS_ENABLE=0 (NVLink multicast must stay off)"
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=dev, timeout=__import__("datetime").timedelta(seconds=300))
    assert dist.get_world_size() == 2, "run with --nproc-per-node 2"
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    ins = logits_inputs(args.s, args.skv, 64, 128, True, seed=21, dev=f"cuda:{rank}")
    msg = torch.empty(args.msg_mb * 2**20 // 2, dtype=torch.bfloat16, device=dev)
    groups = [("nccl-default", None, None)]
    for c in [int(x) for x in args.pp_comm_ctas.split(",") if x]:
        groups.append((f"max_ctas={c}", c, make_pp_group_options(c)))
    cfg = LogitsConfig(*[int(x) for x in args.config.split(",")]) if args.config else None
    run = lambda grid=None: K.mqa_logits(*ins, num_sms=grid, config=cfg)  # noqa: E731
    results = []
    run()  # compile + warm up
    torch.cuda.synchronize()
    # the kernel alone, for sleeping long enough on the sender
    s_, e_ = torch.cuda.Event(True), torch.cuda.Event(True)
    s_.record(); run(); e_.record(); torch.cuda.synchronize()
    t_alone_rough = s_.elapsed_time(e_) if rank == 1 else 0.0
    tt = torch.tensor([t_alone_rough], device=dev)
    dist.all_reduce(tt)
    sleep_s = max(0.03, 4 * float(tt) / 1e3)
    for gname, ctas, opts in groups:
        group = dist.new_group([0, 1], backend="nccl", pg_options=opts) if opts is not None else None
        # warm the communicator (lazy init) with one exchange
        if rank == 0:
            dist.send(msg, 1, group=group)
        else:
            dist.recv(msg, 0, group=group)
        torch.cuda.synchronize()
        reserve = ctas if ctas is not None else 1
        settings = [(sms, False), (sms, True), (indexer_num_sms(sms, True, reserve), True),
                    (indexer_num_sms(sms, True, reserve), False)]
        if ctas is None:
            settings += [(sms - 16, True), (sms - 16, False)]
        settings = list(dict.fromkeys(settings))
        # interleaved rounds (every setting once per round) so clock or thermal drift hits all settings alike;
        # the first round is a warm-up and is dropped
        times = {st: [] for st in settings}
        for rnd in range(args.iters + 1):
            for grid, with_recv in settings:
                dist.barrier(group=group)
                torch.cuda.synchronize()
                if rank == 0:
                    if with_recv:
                        time.sleep(sleep_s)  # the data arrives late: rank 1's recv kernel waits on its SMs
                        dist.send(msg, 1, group=group)
                        torch.cuda.synchronize()
                    continue
                req = dist.irecv(msg, 0, group=group) if with_recv else None
                s, e = torch.cuda.Event(True), torch.cuda.Event(True)
                s.record()
                run(grid)
                e.record()
                if req is not None:
                    req.wait()
                torch.cuda.synchronize()
                if rnd > 0:
                    times[(grid, with_recv)].append(s.elapsed_time(e))
        if rank == 1:
            for (grid, with_recv), ts in times.items():
                med = sorted(ts)[len(ts) // 2]
                results.append({"group": gname, "grid": grid, "recv_pending": with_recv, "median_ms": med,
                                "all_ms": [round(x, 3) for x in ts]})
                print(f"[sm_budget] {gname:14s} grid={grid:4d} recv={with_recv!s:5} median={med:8.3f} ms "
                      f"all={[round(x, 2) for x in ts]}", flush=True)
    dist.barrier()
    if rank == 1:
        alone = next(r["median_ms"] for r in results if r["group"] == "nccl-default" and r["grid"] == sms
                     and not r["recv_pending"])
        summary = []
        for r in results:  # relative to the same communicator's alone-at-full-grid (interleaved with it)
            base = next(x["median_ms"] for x in results if x["group"] == r["group"] and x["grid"] == sms
                        and not x["recv_pending"])
            r["vs_alone_full_grid"] = r["median_ms"] / base
        for gname, ctas, _ in groups:
            auto = indexer_num_sms(sms, True, ctas if ctas is not None else 1)
            pend_full = next(r for r in results if r["group"] == gname and r["grid"] == sms and r["recv_pending"])
            pend_auto = next(r for r in results if r["group"] == gname and r["grid"] == auto and r["recv_pending"])
            summary.append({"group": gname, "auto_grid": auto, "ratio_pending_full": pend_full["vs_alone_full_grid"],
                            "P1_pending_auto": pend_auto["vs_alone_full_grid"]})
        out = {"device": torch.cuda.get_device_name(dev), "sms": sms, "config": str(cfg), "s": args.s, "skv": args.skv,
               "alone_full_ms": alone, "results": results, "summary": summary,
               "date": time.strftime("%Y-%m-%d")}
        print(f"\n=== SM budget on {out['device']} ({sms} SMs), mqa_logits {args.s}x{args.skv} causal, "
              f"alone at full grid {alone:.3f} ms")
        for s in summary:
            print(f"  {s['group']:14s} pending@full grid: x{s['ratio_pending_full']:.3f}   "
                  f"pending@grid {s['auto_grid']} (auto reservation): P1 = {s['P1_pending_auto']:.3f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
