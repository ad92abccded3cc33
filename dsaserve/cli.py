"""The one command-line entry point: ``dsaserve <subcommand>`` (also ``python -m dsaserve``).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported lazily so ``dsaserve make-tiny`` never imports the server stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "make-tiny": ("dsaserve.checkpoint.tiny", "write a tiny random HF-format DSA checkpoint"),
    "generate": ("dsaserve.engine.cli_generate", "generate a completion for one or more prompts"),
    "demo": ("dsaserve.demo", "run the PP2 x CP2 CPU demo on a tiny model and check it against 1 process"),
    "serve": ("dsaserve.server.cli", "OpenAI-compatible HTTP server"),
    "bench": ("dsaserve.bench.cli", "benchmarks (prefill TTFT per parallel layout)"),
    "plan": ("dsaserve.plan_cli", "per-rank GPU memory of a PP x CP deployment, from the config alone"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsaserve", description="Long-context prefill for DSA models (PP x CP).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dsaserve.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ConfigError as e:          # a bad flag or config value: one line, like argparse's own errors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
