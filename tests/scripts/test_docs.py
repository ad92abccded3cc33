"""Issue 14 item 16: every flag of every subcommand explains itself in --help, and the README lists every
engine flag, the server's flags, the trust model, and how long the test suite takes."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from dsaserve.args import EngineArgs
from dsaserve.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def _subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _subparsers(sub, f"{prefix}{name} ")


def test_every_flag_has_help_beyond_its_default():
    missing = []
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            text = re.sub(r"\(default: %\(default\)s\)", "", action.help or "").strip()
            if len(text) < 10:
                missing.append(f"dsaserve {name} {action.option_strings[-1]}: {action.help!r}")
    assert not missing, "flags without a real help text:\n" + "\n".join(missing)


def test_readme_lists_every_engine_flag_and_the_server_flags():
    readme = (REPO / "README.md").read_text()
    flags = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(EngineArgs)]
    flags += ["--api-key", "DSASERVE_API_KEY", "--max-request-bytes", "--shutdown-timeout", "--step-timeout"]
    missing = [f for f in flags if f"`{f}" not in readme]
    assert not missing, f"README does not mention: {missing}"
    assert re.search(r"test suite takes about \d+ min", readme), "README should say how long the tests take"
    assert "trusted network" in readme and "## Security" in readme


def test_benchmark_figures_name_their_raw_output():
    """Issue 14 item 20: every table in docs/BENCHMARKS.md either names its raw JSON under benchmarks/results/
    (which exists, and whose recorded command is the one shown, flag by flag) or says plainly that no raw
    output was committed."""
    import json
    import shlex

    doc = (REPO / "docs" / "BENCHMARKS.md").read_text()
    flat = re.sub(r"\\\n\s*", "", doc)                      # join wrapped command lines
    for path in sorted(set(re.findall(r"benchmarks/results/[\w.\-]+\.json", doc))):
        assert (REPO / path).is_file(), f"{path} is cited but not committed"
        meta = json.loads((REPO / path).read_text()).get("meta", {})
        if "command" not in meta:
            continue
        args = shlex.split(meta["command"])[3:]             # after "python3 -m dsaserve"
        pairs = [(a, b) for a, b in zip(args, args[1:] + [""]) if a.startswith("--") and a not in ("--out", "--trace-dir")]
        for flag, value in pairs:
            shown = f"{flag} {value}" if value and not value.startswith("--") else flag
            assert shown in flat, f"{path}: the command in BENCHMARKS.md lacks '{shown}' (recorded in its meta)"
    sections = re.split(r"\n(?=## )", doc)
    for sec in sections[1:]:
        title = sec.splitlines()[0]
        if "|---" not in sec or title.startswith("## Evidence"):
            continue
        assert "benchmarks/results/" in sec or "no raw output committed" in sec.lower(), \
            f"section {title!r} has tables but names no raw output"
