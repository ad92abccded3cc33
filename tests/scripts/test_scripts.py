"""Issue 14 items 13-14: the README's set-up scripts work from any folder and skip pip when nothing changed.

The scripts run for real (bash), against a copy of the repo's scripts/ and pyproject.toml, with stand-ins
for the commands they call: ``$PYTHON -m venv`` makes a stub venv whose ``python`` logs ``-m pip`` /
``-m pytest`` (and runs anything else with this interpreter: the scripts compute a hash and read the
installed torch version with it), and whose ``dsaserve`` / ``lint-imports`` only log. Nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PYTHON_STUB = """#!/usr/bin/env bash
# stand-in for python3: "-m venv DIR" makes a stub venv
echo "python3 $* (cwd $PWD)" >> "{log}"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  venv="$(cd "$3" && pwd)"
  printf 'export PATH="%s/bin:$PATH"\\n' "$venv" > "$venv/bin/activate"
  cp "{stubs}/venv-python" "$venv/bin/python"
  cp "{stubs}/logger" "$venv/bin/dsaserve"
  cp "{stubs}/logger" "$venv/bin/lint-imports"
  exit 0
fi
exit 3
"""
VENV_PYTHON_STUB = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && {{ [ "$2" = "pip" ] || [ "$2" = "pytest" ]; }}; then
  echo "python $* (cwd $PWD)" >> "{log}"
  exit 0
fi
exec "{real}" "$@"
"""
LOGGER_STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $* (cwd $PWD)" >> "{log}"
"""


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake_repo(tmp_path):
    repo = tmp_path / "checkout" / "dsaserve"
    shutil.copytree(REPO / "scripts", repo / "scripts")
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    stubs, log = tmp_path / "stubs", tmp_path / "calls.log"
    stubs.mkdir()
    _write(stubs / "python3", PYTHON_STUB.format(log=log, stubs=stubs))
    _write(stubs / "venv-python", VENV_PYTHON_STUB.format(log=log, real=sys.executable))
    _write(stubs / "logger", LOGGER_STUB.format(log=log))
    log.touch()
    return repo, stubs, log


def _run(script: Path, cwd: Path, stubs: Path, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "DSASERVE_REINSTALL")}
    full_env.update(PYTHON=str(stubs / "python3"), **env)
    proc = subprocess.run(["bash", str(script)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _calls(log: Path) -> list[str]:
    lines = log.read_text().splitlines()
    log.write_text("")
    return lines


def test_scripts_work_from_any_folder_and_skip_pip_when_unchanged(fake_repo):
    repo, stubs, log = fake_repo
    # 13: from inside scripts/ (before: created ../.venv next to the repo and pip failed there)
    _run(Path("demo.sh"), repo / "scripts", stubs)
    calls = _calls(log)
    assert (repo / ".venv" / "bin" / "python").exists()
    assert not (repo.parent / ".venv").exists(), "a .venv was created outside the repo"
    assert calls[0] == f"python3 -m venv .venv (cwd {repo})", calls
    pips = [c for c in calls if c.startswith("python -m pip")]
    assert len(pips) == 3 and all(c.endswith(f"(cwd {repo})") for c in pips), calls
    assert "torch==2.13.0" in pips[1] and '-e .[serve,test]' in pips[2], pips
    assert calls[-1] == f"dsaserve demo (cwd {repo})", calls

    # 14: nothing changed -> no pip; test.sh from an unrelated folder still runs lint-imports, then pytest
    proc = _run(repo / "scripts" / "test.sh", repo.parent.parent, stubs)
    calls = _calls(log)
    assert not any("pip" in c for c in calls), calls
    assert calls == [f"lint-imports --no-cache (cwd {repo})", f"python -m pytest -q -p no:cacheprovider (cwd {repo})"]
    assert "skipping pip" in proc.stdout

    # a change to pyproject.toml (new dependency) -> pip again; the forced reinstall too
    with open(repo / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    _run(repo / "scripts" / "setup.sh", Path("/"), stubs)
    assert sum(c.startswith("python -m pip") for c in _calls(log)) == 3
    _run(repo / "scripts" / "setup.sh", repo, stubs)
    assert not any("pip" in c for c in _calls(log))
    _run(repo / "scripts" / "setup.sh", repo, stubs, DSASERVE_REINSTALL="1")
    assert sum(c.startswith("python -m pip") for c in _calls(log)) == 3


def test_the_readme_commands_and_ci_use_these_scripts():
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
    assert "lint-imports" in (REPO / "scripts" / "test.sh").read_text()
