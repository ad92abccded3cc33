"""benchmarks/bubble_model.py: the bubble model reproduces its fit run, and its pipeline arithmetic holds on
cases worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from dsaserve.engine.chunking import ChunkCostModel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(REPO, "benchmarks", "results", "prefill_h200x4_dispatch_ahead_2026-11-28.json")


def load():
    spec = importlib.util.spec_from_file_location("bubble_model", os.path.join(REPO, "benchmarks", "bubble_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_predict_by_hand():
    bm = load()
    flat = ChunkCostModel(per_token_ms=1.0, per_key_ms=0.0, per_attended_ms=0.0, index_topk=8)
    # 4 equal chunks of 10 ms on 2 stages of 5 ms: 5 stage-slots = 25 ms; CP 2 halves it
    assert bm.predict_ms(40, 2, 1, [10] * 4, flat, 0.0) == pytest.approx(25.0)
    assert bm.predict_ms(40, 2, 2, [10] * 4, flat, 0.0) == pytest.approx(12.5)
    assert bm.predict_ms(40, 1, 4, [10] * 4, flat, 0.0) == pytest.approx(10.0)
    # a per-step overhead of 1 ms per stage and chunk: every slot is 6 ms
    assert bm.predict_ms(40, 2, 1, [10] * 4, flat, 1.0) == pytest.approx(30.0)


def test_reproduces_the_fit_run_and_writes_its_command(tmp_path, capsys):
    bm = load()
    out = tmp_path / "bm.json"
    assert bm.main(["--breakdown", SOURCE, "--fit-len", "65536", "--lengths", "65536",
                    "--layouts", "1x1,2x2,1x4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    with open(SOURCE) as f:
        fit_run = next(r for r in json.load(f)["runs"] if r["layout"] == "1x1" and r["input_len"] == 65536)
    rows = {r["layout"]: r for r in res["predictions"]}
    # the fit includes idle time per token, so 1x1 at the fit length is the run's profiled TTFT ...
    profiled = sum(v["max"] for k, v in fit_run["breakdown"]["rows"].items() if k != "PP wait")
    assert rows["1x1"]["fixed"]["ttft_s"] * 1e3 == pytest.approx(profiled, rel=1e-9)
    # ... 1x4 is a perfect quarter, and 2x2 with 4 fixed chunks is bounded by the bubble
    assert rows["1x4"]["fixed"]["speedup"] == pytest.approx(4.0)
    assert 2.0 < rows["2x2"]["fixed"]["speedup"] < rows["2x2"]["dynamic"]["speedup"] < 4.0
    assert res["meta"]["command"].startswith("PYTHONPATH=. python3 benchmarks/bubble_model.py --breakdown")
    assert "| 2x2 | 4 | 65536 |" in capsys.readouterr().out
