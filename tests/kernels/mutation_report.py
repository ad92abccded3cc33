"""Show that the kernel tests catch wrong math: run them once per mutated function (7 * x + 3, see _mutation.py).

    PYTHONPATH=. python -m tests.kernels.mutation_report [--jobs 2] [--out mutation_report.md]

For every target in ``_mutation.TARGETS`` the whole tests/kernels suite runs with that one function's
outputs mutated. The report lists, per target, the tests that failed, and checks two things:
  * every test marked ``@pytest.mark.checks(T, ...)`` failed under the mutation of each T it names;
  * every target made at least one test fail.
An unmutated run must pass completely. Exit status 1 if any check fails. Tests without a ``checks`` mark
are listed (they check errors, shapes or dispatch, not values).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from ._mutation import ENV, LOG_ENV, TARGETS

HERE = os.path.dirname(os.path.abspath(__file__))


def run_suite(target: str | None) -> tuple[str | None, list[dict], float]:
    """One pytest run of tests/kernels with ``target`` mutated (None: unmutated) -> per-test records."""
    fd, log = tempfile.mkstemp(suffix=".jsonl")
    os.close(fd)
    env = dict(os.environ, **{LOG_ENV: log})
    env.pop(ENV, None)
    if target:
        env[ENV] = target
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", HERE],
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    with open(log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    os.unlink(log)
    return target, records, time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1, help="pytest runs at a time")
    ap.add_argument("--targets", default="all", help="comma list of targets (default: all)")
    ap.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = ap.parse_args()
    targets = list(TARGETS) if args.targets == "all" else args.targets.split(",")
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(run_suite, [None] + targets))
    lines, problems = [], []
    _, base, secs = results[0]
    base_failed = [r["test"] for r in base if r["outcome"] != "passed"]
    lines.append(f"Unmutated: {len(base)} tests, {len(base) - len(base_failed)} passed ({secs:.0f} s)")
    if not base or base_failed:
        problems.append(f"unmutated run not green: {base_failed or 'no tests ran'}")
    checks = {r["test"]: set(r["checks"]) for r in base}
    failed_under: dict[str, set] = {t: set() for t in checks}
    lines.append("")
    lines.append("| mutated function (7x+3) | tests failing | of which declare it |")
    lines.append("|---|---|---|")
    for target, records, secs in results[1:]:
        failed = {r["test"] for r in records if r["outcome"] != "passed"}
        declared = {t for t, c in checks.items() if target in c}
        for t in failed:
            failed_under.setdefault(t, set()).add(target)
        lines.append(f"| {target} | {len(failed)} | {len(failed & declared)} / {len(declared)} |")
        if not failed:
            problems.append(f"{target}: no test fails under its mutation")
        for t in sorted(declared - failed):
            problems.append(f"{t} declares {target} but passes under its mutation")
    lines.append("")
    lines.append("Per test: the mutations it fails under (declared targets marked *):")
    for t in sorted(checks):
        got = sorted(failed_under.get(t, ()))
        marks = ", ".join(g + ("*" if g in checks[t] else "") for g in got) or "-"
        lines.append(f"  {t}: {marks}")
    unmarked = sorted(t for t, c in checks.items() if not c)
    lines.append("")
    lines.append(f"Tests without a checks mark (errors, shapes, dispatch): {len(unmarked)}")
    for t in unmarked:
        lines.append(f"  {t}")
    lines.append("")
    lines.append("RESULT: " + ("OK, every declared check fails under its mutation" if not problems
                               else f"{len(problems)} problem(s):\n  " + "\n  ".join(problems)))
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
