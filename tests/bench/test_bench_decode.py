"""``dsaserve bench decode`` on CPU: the floor's arithmetic, and an end-to-end run on the tiny config whose JSON
carries every field the device runs are read by."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from dsaserve.bench import cli as bench_cli
from dsaserve.bench import decode as D
from dsaserve.config import ModelConfig
from dsaserve.model.backends import select_backends
from dsaserve.model.deepseek_v32 import DSAModel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "benchmarks", "configs", "tiny_dsv32.json")

pytestmark = pytest.mark.timeout(300)


def _cfg() -> ModelConfig:
    with open(TINY) as f:
        return ModelConfig.from_dict(json.load(f), source=TINY)


def test_weight_bytes_cover_every_parameter_once():
    """All experts routed: the parts add up to the whole model's parameters (the embedding aside, whose one
    row per token is not counted as a weight read)."""
    cfg = _cfg()
    model = DSAModel(cfg, backends=select_backends(device="cpu"), dtype=torch.bfloat16, device="meta")
    w = D.weight_bytes(model)
    everything = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    embed = model.embed_tokens.weight.numel() * 2
    all_experts = [w["n_experts"] if e else 0 for e in w["routed_experts_each"]]
    parts = D.step_bytes(cfg, w, batch=1, context=1, elem_bytes=2, index_fp8=False, cp=1, distinct=all_experts)
    weights = sum(v for k, v in parts.items() if k.endswith("_weights"))
    assert weights == pytest.approx(everything - embed - model.rotary.inv_freq.numel() * 4)
    assert len(w["attention"]) == cfg.num_hidden_layers and w["n_experts"] == cfg.n_routed_experts
    assert w["dense_mlp"][0] > 0 and w["routed_experts_each"][0] == 0      # first_k_dense_replace = 1


def test_step_bytes_scale_with_batch_context_and_cp():
    cfg = _cfg()
    w = D.weight_bytes(DSAModel(cfg, backends=select_backends(device="cpu"), device="meta"))
    dist = [0.0] + [4.0] * (cfg.num_hidden_layers - 1)
    one = D.step_bytes(cfg, w, batch=1, context=100, elem_bytes=4, index_fp8=False, cp=1, distinct=dist)
    # latent rows: min(index_topk = 32, context) per request and layer; indexer keys: the whole context
    assert one["kv_latent_rows"] == cfg.num_hidden_layers * 32 * cfg.kv_cache_dim * 4
    assert one["indexer_key_rows"] == cfg.num_hidden_layers * 100 * cfg.index_head_dim * 4
    four = D.step_bytes(cfg, w, batch=4, context=100, elem_bytes=4, index_fp8=False, cp=1, distinct=dist)
    assert four["kv_latent_rows"] == 4 * one["kv_latent_rows"]
    assert four["attention_weights"] == one["attention_weights"]           # weights read once per step
    two = D.step_bytes(cfg, w, batch=1, context=100, elem_bytes=4, index_fp8=False, cp=2, distinct=dist)
    assert two["routed_expert_weights"] == one["routed_expert_weights"] / 2
    fp8 = D.step_bytes(cfg, w, batch=1, context=100, elem_bytes=4, index_fp8=True, cp=1, distinct=dist)
    assert fp8["indexer_key_rows"] == cfg.num_hidden_layers * 100 * (cfg.index_head_dim + 4)
    assert D.expected_distinct_experts(8, 2, 1) == pytest.approx(2.0)
    assert D.expected_distinct_experts(8, 2, 1000) == pytest.approx(8.0)


def test_bench_decode_end_to_end_on_cpu(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    out = tmp_path / "decode.json"
    args = parser.parse_args(["decode", "--config", TINY, "--device", "cpu", "--batch-size", "1,3",
                              "--context-len", "64,150", "--steps", "3", "--warmup-steps", "1",
                              "--attention-backend", "triton", "--scheduling", "async,sync", "--out", str(out)])
    assert bench_cli.run(args) == 0
    text = capsys.readouterr().out
    assert "ms/step median" in text and "x floor" in text
    res = json.loads(out.read_text())
    assert res["copy_bandwidth_gbps"] > 0
    assert res["meta"]["batch_sizes"] == [1, 3] and res["meta"]["graphs"] == ["off"]
    assert res["meta"]["scheduling"] == ["async", "sync"]
    runs = res["runs"]
    # 150 is rounded down to whole pages: 128 (index_topk = 32: sparse top-k)
    assert [(r["context_len"], r["batch_size"], r["scheduling"]) for r in runs] == [
        (c, b, s) for c in (64, 128) for b in (1, 3) for s in ("async", "sync")]
    for r in runs:
        assert r["status"] == "ok" and r["layout"] == "1x1" and r["graphs"] == "off"
        assert r["step_ms"]["count"] == 3 and 0 < r["step_ms"]["median"] <= r["step_ms"]["p99"]
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] / r["step_ms"]["median"] * 1e3, rel=1e-3)
        f = r["floor"]
        assert f["routing"] == "measured (probe step)" and f["floor_ms"] > 0
        assert f["bytes_per_step"]["total"] == sum(v for k, v in f["bytes_per_step"].items() if k != "total")
        assert all(0 < d <= 2 * r["batch_size"] for d in f["distinct_experts_per_layer"][1:])
        assert r["floor_ratio"] == pytest.approx(r["step_ms"]["median"] / f["floor_ms"], rel=1e-2)
        assert r["host_prepare_ms"] is not None and r["graph_bucket"] is None
        # every step's greedy tokens (probe + warm-up + timed), one per request
        assert len(r["greedy_tokens"]) == 1 + 1 + 3 and all(len(s) == r["batch_size"] for s in r["greedy_tokens"])
    # graphs off only: nothing to compare there; async (fed tokens) vs sync: the same greedy tokens
    agree = res["graphs_agreement"]
    assert [(a["compared"], a["context_len"], a["batch_size"], a["identical"]) for a in agree] == [
        ("scheduling async vs sync", c, b, True) for c in (64, 128) for b in (1, 3)]
    assert all(a["steps"] == 5 for a in agree)


def test_graphs_agreement_finds_the_first_difference():
    def run(graphs, b, toks, scheduling="async"):
        return {"layout": "1x1", "context_len": 64, "batch_size": b, "graphs": graphs, "scheduling": scheduling,
                "status": "ok", "greedy_tokens": toks}
    runs = [run("on", 2, [[1, 2], [3, 4]]), run("off", 2, [[1, 2], [3, 4]]),
            run("on", 3, [[1, 2, 3], [4, 5, 6]]), run("off", 3, [[1, 2, 3], [4, 9, 6]]),
            run("on", 7, [[1]]),                                        # no "off" run: not compared
            run("on", 2, [[1, 2], [3, 5]], "sync")]                     # graphs on, sync vs async
    got = D.graphs_agreement(runs)
    assert [(a["compared"], a["batch_size"], a["identical"], a["first_difference"]) for a in got] == [
        ("graphs on vs off", 2, True, None), ("graphs on vs off", 3, False, {"step": 1, "request": 1}),
        ("scheduling async vs sync", 2, False, {"step": 1, "request": 1})]
    text = D.format_report({"meta": {"card": "CPU", "gpus": 0, "dtype": "float32", "config": "x.json"},
                            "copy_bandwidth_gbps": 1.0, "runs": [], "graphs_agreement": got})
    assert "graphs on vs off (scheduling async), 1x1 ctx 64 B 2: identical" in text
    assert "B 3: DIFFER from step 1" in text
    assert "scheduling async vs sync (graphs on), 1x1 ctx 64 B 2: DIFFER" in text
