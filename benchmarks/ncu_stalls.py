"""Where a kernel's warps stall, instruction by instruction, from ncu's source page (PC sampling).

    ncu --kernel-name regex:NAME --launch-count 1 --section SourceCounters --section WarpStateStats -o REP ...
    ncu -i REP.ncu-rep --page source --csv --print-source sass > SRC.csv      # part ncu_src of run_device_parts
    python3 benchmarks/ncu_stalls.py SRC.csv [--top 25] [--reason long_sb]

Prints the share of every stall reason over all samples, then the instructions with the most samples (offset
in the kernel, share, executions, SASS, top three reasons). Samples are per warp: a producer partition that
waits on its ``empty`` barrier shows up as much as a consumer that waits on its MMA, so read the rows by the
partition their offsets belong to (the SASS dump of benchmarks/compile_report.py --dump has the same offsets).
Reads .csv or .csv.gz.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip


def load(path: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of ncu's source-page CSV (its first line names the kernel)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(f))
    return rows[1], [r for r in rows[2:] if len(r) == len(rows[1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="ncu -i REP --page source --csv --print-source sass output (.csv or .csv.gz)")
    ap.add_argument("--top", type=int, default=25, help="instructions to list")
    ap.add_argument("--reason", default=None, help="rank by one stall reason (e.g. long_sb, barrier, lg, wait)")
    args = ap.parse_args()
    hdr, data = load(args.csv)
    addr, src = hdr.index("Address"), hdr.index("Source")
    samples, executed = hdr.index("Warp Stall Sampling (All Samples)"), hdr.index("Instructions Executed")
    reasons = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(int(r[samples] or 0) for r in data) or 1
    by_reason = collections.Counter()
    for r in data:
        for i in reasons:
            by_reason[hdr[i][6:]] += int(r[i] or 0)
    print(f"{total} samples; by reason: " + ", ".join(f"{k} {v / total:.3f}" for k, v in by_reason.most_common(10)))
    key = samples if args.reason is None else hdr.index("stall_" + args.reason)
    base = int(data[0][addr], 16)
    for r in sorted(data, key=lambda r: -int(r[key] or 0))[: args.top]:
        top3 = sorted(((int(r[i] or 0), hdr[i][6:]) for i in reasons), reverse=True)[:3]
        print(f"{int(r[addr], 16) - base:6x} {int(r[key] or 0) / total:6.3f} ex={r[executed]:>9} "
              f"{r[src].strip()[:60]:60s} {', '.join(f'{n} {c}' for c, n in top3)}")


if __name__ == "__main__":
    main()
