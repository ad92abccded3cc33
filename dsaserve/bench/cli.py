"""``dsaserve bench <name>``: one subcommand per benchmark module.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (like the top-level
subcommands) and a module docstring that becomes its ``--help`` description. Add a benchmark by adding
its module to ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "prefill": ("dsaserve.bench.prefill", "TTFT per PP x CP layout, per-phase breakdown, traces, ablations"),
    "decode": ("dsaserve.bench.decode", "decode step time per batch size and context, CUDA graphs on/off, "
                                        "beside the same-run weight-read floor"),
    "serve": ("dsaserve.bench.serve", "load generator against a running OpenAI-compatible server: TTFT, ITL, throughput"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    bench_run = getattr(args, "_bench_run", None)
    if bench_run is None:
        print(f"usage: dsaserve bench {{{','.join(BENCHMARKS)}}} [options]  (see --help)", file=sys.stderr)
        return 2
    return bench_run(args)
