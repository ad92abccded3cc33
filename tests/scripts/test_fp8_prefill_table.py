"""benchmarks/fp8_prefill_table.py: the issue-11 target lines from synthetic ``bench prefill`` JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import fp8_prefill_table as table  # noqa: E402


def _write(out: Path, model: str, quant: str, dense_ms: float, moe_ms: float, ttft_s: float,
           name: str | None = None) -> None:
    run = {"variant": "baseline", "input_len": 65536, "status": "ok", "ttft_median_s": ttft_s,
           "breakdown": {"rows": {"dense GEMMs": {"max": dense_ms}, "MoE experts": {"max": moe_ms}}}}
    cfg = json.loads((REPO / "benchmarks" / "configs" / f"{model}.json").read_text())
    meta = {"config": f"benchmarks/configs/{model}.json",
            "model": {"layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
                      "active_experts": cfg["num_experts_per_tok"]}}
    (out / (name or f"prefill_{model}_{quant}.json")).write_text(
        json.dumps({"meta": meta, "ceilings": {"fp8_tflops": 1000.0}, "runs": [run]}))


def test_targets_from_the_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)                           # the JSON names its config relative to the repo
    _write(tmp_path, "dsv32_8layer_32e", "fp8", dense_ms=300, moe_ms=320, ttft_s=2.5)
    _write(tmp_path, "dsv32_4layer_256e", "fp8", dense_ms=100, moe_ms=150, ttft_s=1.2)
    measured: dict = {}
    table.prefill_table(str(tmp_path), measured)
    assert list(measured) == ["prefill_fp8"]
    lines = table.targets_table(measured["prefill_fp8"])
    assert "8-layer dense GEMMs + MoE <= 650 ms: 620 ms (before 1803 ms) -> MET" in lines[1]
    # 7 MoE layers at 320 ms = 45.7 ms/layer; 3 at 150 ms = 50.0 ms/layer -> 1.09x
    assert "50.0 / 45.7 ms = 1.09x -> MET" in lines[4]
    # MoE floor, 8-layer: 7 layers x 65536 tokens x 6 x 7168 x 2048 x (8 routed + 1 shared) at 1000 TFLOPS
    floor_ms = 7 * 65536 * 6 * 7168 * 2048 * 9 / 1e15 * 1e3
    assert f"{320 / floor_ms:.2f}x" in lines[2]
    _write(tmp_path, "dsv32_8layer_32e", "fp8", dense_ms=400, moe_ms=320, ttft_s=2.5)
    measured.clear()
    table.prefill_table(str(tmp_path), measured)
    assert table.targets_table(measured["prefill_fp8"])[1].endswith("720 ms (before 1803 ms) -> missed")


def test_ab_sides_get_their_own_targets(tmp_path, monkeypatch, capsys):
    """run_device_parts' A/B files (order_ab_<8l|256e>_<side><i>.json): one target block per side, the model from
    the JSON's config and the quantization from its meta."""
    monkeypatch.chdir(REPO)
    for side, moe8, moe256 in (("default1", 330, 160), ("knobs1", 310, 145)):
        _write(tmp_path, "dsv32_8layer_32e", "fp8", 300, moe8, 2.5, name=f"order_ab_8l_{side}.json")
        _write(tmp_path, "dsv32_4layer_256e", "fp8", 100, moe256, 1.2, name=f"order_ab_256e_{side}.json")
    for path in tmp_path.glob("*.json"):  # as bench prefill writes it
        d = json.loads(path.read_text())
        d["meta"]["quantization"] = "fp8"
        path.write_text(json.dumps(d))
    assert table.side_of("order_ab_256e_knobs1") == "order_ab_knobs1"
    assert table.side_of("prefill_dsv32_8layer_32e_fp8") == "prefill_fp8"
    assert table.main([str(tmp_path), "order_ab_*.json"]) == 0
    out = capsys.readouterr().out
    assert "targets at 64K (order_ab_default1)" in out and "targets at 64K (order_ab_knobs1)" in out
    knobs = out[out.index("(order_ab_knobs1)"):]
    assert "8-layer dense GEMMs + MoE <= 650 ms: 610 ms" in knobs
    assert "48.3 / 44.3 ms = 1.09x -> MET" in knobs  # 145 / 3 vs 310 / 7
