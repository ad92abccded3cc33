"""The user-facing entry points of the runtime: ``dsaserve demo`` and a ``torchrun`` launch of
``dsaserve generate`` (the multi-node path, env:// rendezvous) agree with one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsaserve.cli import main as cli_main
from tests.parallel._util import LOGPROB_TOL, free_port, prompt_ids
from tests.parallel.conftest import venv_bin

pytestmark = pytest.mark.timeout(300)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo(pool):
    """The README's first command, as a user runs it (tiny checkpoint built into the user cache, or reused)."""
    pool.shutdown()                         # free the cores: the demo spawns 4 processes of its own
    proc = subprocess.run([sys.executable, "-m", "dsaserve", "demo", "--prompt-len", "600", "--max-tokens", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "identical : True" in out, out
    assert "OK: PP x CP output equals the single-process output" in out
    # the bytes table: each stage-0 rank sent exactly half of the gather-then-send volume
    rows = [line.split() for line in out.splitlines() if line.strip().endswith("0.500")]
    assert len(rows) == 2 and {r[0] for r in rows} == {"0", "1"}, out
    assert all(int(r[3].replace(",", "")) == 600 // 2 * 128 * 2 * 4 for r in rows), out


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_torchrun_generate_matches_single_process_cli(ds_ckpt, pool, capsys):
    pool.shutdown()
    prompts = [",".join(map(str, prompt_ids(n))) for n in (45, 3)]
    args = ["generate", "--model", ds_ckpt, "--max-tokens", "4", "--ignore-eos", "--logprobs", "5", "--json",
            "--kv-cache-tokens", "4096", "--max-model-len", "2048"]
    for p in prompts:
        args += ["--prompt-ids", p]
    cmd = [venv_bin("torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "dsaserve", *args, "--cp-size", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    par = _json_lines(proc.stdout)

    assert cli_main(args) == 0                                   # the single-process CLI, in this process
    ref = _json_lines(capsys.readouterr().out)
    assert len(par) == len(ref) == 2, proc.stdout
    for p, r in zip(par, ref):
        assert p["token_ids"] == r["token_ids"] and p["text"] == r["text"], (p, r)
        for lp, lr in zip(p["logprobs"], r["logprobs"]):
            assert lp.keys() == lr.keys()
            assert max(abs(lp[k] - lr[k]) for k in lr) < LOGPROB_TOL
