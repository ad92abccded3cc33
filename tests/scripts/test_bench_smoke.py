"""The GPU benchmark scripts written while no device was lent, run end to end on the CPU (``benchmarks/cpu_smoke.py``:
the interpreter, small shapes, one call per timing): their own code must not crash on the device. No figure is
checked; the rows' equality fields are (the kernels against their baselines, as the device run will report them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMALL_MLA = ('("DeepSeek-V3.2 block", 3640, 128, 128), ("GLM-5 block", 7281, 64, 256)'
             '=>("small", 70, 2, 128), ("small v256", 33, 2, 256)')


def _smoke(script: str, args: list[str], tmp_path, replace: str = "") -> dict:
    out = str(tmp_path / "out.json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=ROOT, REPLACE=replace)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "cpu_smoke.py"),
                        os.path.join(ROOT, "benchmarks", script), *args, "--out", out],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.load(open(out))


@pytest.mark.timeout(300)
def test_mla_projections_script(tmp_path):
    d = _smoke("mla_projections.py", [], tmp_path, SMALL_MLA)
    assert [r["what"] for r in d["rows"]] == ["small", "small v256"]
    for r in d["rows"]:
        assert r["query"]["rope_equal"] and r["query"]["latent_equal_fraction"] > 0.99
        assert r["value"]["bytes_equal_fraction"] > 0.99 and "error" not in str(r["query"]["configs"])


@pytest.mark.timeout(300)
def test_indexer_query_script(tmp_path):
    d = _smoke("indexer_query.py", ["--tokens", "70"], tmp_path)
    assert [r["interleaved"] for r in d["rows"]] == [False, True] and all(r["same_bits"] for r in d["rows"])
