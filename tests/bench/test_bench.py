"""``dsaserve bench prefill`` on CPU: the report's arithmetic, OOM handling, and one end-to-end run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from dsaserve.bench import cli as bench_cli
from dsaserve.bench import prefill as B
from dsaserve.bench import report as R
from dsaserve.checkpoint.tiny import tiny_config_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- pure helpers ------------------------------------------------------------------------------------
def test_parse_layouts_and_lengths():
    assert R.parse_layouts("1x1, 2x2,1x4,2x2") == [(1, 1), (2, 2), (1, 4)]
    assert R.parse_int_list("16384,49664", "--input-len") == [16384, 49664]
    for bad in ("2by2", "0x2", ""):
        with pytest.raises(ValueError, match="layout|--layouts"):
            R.parse_layouts(bad)
    with pytest.raises(ValueError, match="--input-len"):
        R.parse_int_list("16k", "--input-len")


def test_breakdown_critical_path_mean_and_idle():
    stats = {
        0: {"phases_ms": {"indexer_logits": 10.0, "moe": 30.0, "pp_send": 1.0, "dense_gemm": 5.0}},
        1: {"phases_ms": {"indexer_logits": 20.0, "moe": 10.0, "pp_recv_wait": 40.0, "new_phase": 2.0}},
    }
    bd = R.breakdown(stats, ttft_ms=100.0)
    rows = bd["rows"]
    assert rows["indexer logits"]["max"] == 20.0 and rows["indexer logits"]["argmax_rank"] == 1
    assert rows["indexer logits"]["mean"] == 15.0
    assert rows["MoE experts"]["max"] == 30.0 and rows["MoE experts"]["argmax_rank"] == 0
    assert rows["PP transfer"]["max"] == 1.0 and rows["PP wait"]["max"] == 40.0
    assert rows["new_phase"]["max"] == 2.0                         # unknown phases are not dropped
    # idle = TTFT - everything marked on that rank (PP wait counts as marked, not idle)
    assert bd["per_rank"][0][R.IDLE_ROW] == pytest.approx(100 - 46)
    assert bd["per_rank"][1][R.IDLE_ROW] == pytest.approx(100 - 72)
    assert bd["busy_ms"][1] == pytest.approx(32.0)                  # no PP wait, no idle


def test_scaling_loss_names_the_phase_that_does_not_scale():
    base = {"MoE experts": {"max": 400.0}, "indexer logits": {"max": 200.0}}
    got = {"MoE experts": {"max": 100.0}, "indexer logits": {"max": 50.0}, "PP wait": {"max": 60.0}}
    loss = R.scaling_loss(base, got, world=4)
    assert loss[0][0] == "PP wait" and loss[0][3] == 60.0
    assert dict((n, x) for n, _, _, x in loss)["MoE experts"] == 0.0


def test_cost_model_counts_the_fused_indexer_phase_as_quadratic():
    """With the fused top-k (the default) the indexer's cost sits in one row; it grows with the causal pairs."""
    n = 1000
    split = {"dense GEMMs": {"max": 100.0}, "indexer logits": {"max": 30.0}, "top-k": {"max": 20.0},
             R.IDLE_ROW: {"max": 7.0}}
    fused = {"dense GEMMs": {"max": 100.0}, "fused indexer + top-k": {"max": 50.0}, R.IDLE_ROW: {"max": 7.0}}
    for rows in (split, fused):
        per_token, per_pair = R.fit_cost_model(rows, n)
        assert per_token == pytest.approx(100.0 / n)
        assert per_pair == pytest.approx(50.0 / R.causal_pairs(n))


def test_pipeline_makespan_and_bound():
    # equal chunks: (chunks + P - 1) stage slots of cost/P each
    assert R.pipeline_makespan([4.0] * 4, 2) == pytest.approx(5 * 2.0)
    assert R.pipeline_makespan([4.0] * 4, 1) == pytest.approx(16.0)
    # growing chunks: the last (most expensive) chunk's tail on stage 2 is the bubble
    assert R.pipeline_makespan([1.0, 3.0], 2) == pytest.approx(0.5 + 1.5 + 1.5)
    assert R.pp_bound_speedup(4096, 1024, 2, 1.0, 0.0) == pytest.approx(4096 / (5 * 512))
    assert R.pp_bound_speedup(4096, 4096, 2, 1.0, 0.0) == pytest.approx(1.0)
    costs = R.chunk_costs(10, 4, per_token_ms=0.0, per_pair_ms=1.0)
    assert costs == [10.0, 26.0, 19.0] and sum(costs) == R.causal_pairs(10)


def test_floor_and_bytes_arithmetic():
    assert R.causal_pairs(4) == 10
    # 2 * pairs * 64 * 128 * 8 layers at 1000 TFLOPS
    assert R.indexer_floor_ms(65536, 64, 128, 8, 1000.0) == pytest.approx(2 * 65536 * 65537 / 2 * 64 * 128 * 8 / 1e15 * 1e3)
    # 200 tokens in chunks of 64 over CP 2: shards 32, 32, 32, 4 rows of (hidden, residual)
    assert R.expected_pp_bytes(200, 64, 2, hidden=128, elem_bytes=4) == 2 * (32 + 32 + 32 + 4) * 128 * 4
    assert R.pp_bytes_per_rank({0: {"bytes": {"pp_send": 10, "cp_kv_gather": 5}}, 2: {"bytes": {}}}) == {0: 10}


# ---- the bench with a fake engine (OOM handling, no processes) --------------------------------------
def _args(tmp_path, **over) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_config_dict()))
    argv = ["prefill", "--config", str(cfg), "--device", "cpu", "--input-len", "64,128", "--layouts", "1x1",
            "--repeats", "2", "--ablations", "none", "--out", str(tmp_path / "r.json")]
    for k, v in over.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return parser.parse_args(argv)


class _FakeEngine:
    def __init__(self):
        self.ops = []

    def control(self, op):
        self.ops.append(op)
        return [{"rank": 0}]


class _FakeLLM:
    """Generates instantly, but runs out of memory above ``oom_above`` prompt tokens."""

    def __init__(self, oom_above):
        self.engine, self.oom_above, self.closed = _FakeEngine(), oom_above, False

    def generate(self, prompts, params, use_tqdm=False):
        if len(prompts[0]) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

        class Out:
            token_ids = [7]
        return [Out()]

    def stats(self):
        return {0: {"comm": {"bytes": {}, "calls": {}}, "phases_ms": {"moe": 1.0}, "regions": [("moe", 0, 0.0, 1.0)]}}

    def shutdown(self):
        self.closed = True


def test_oom_is_reported_per_length_and_the_bench_goes_on(tmp_path, monkeypatch, capsys):
    bench = B.PrefillBench(_args(tmp_path))
    made = []

    def fake_make(job, max_len):
        made.append(max_len)
        llm = _FakeLLM(oom_above=100)
        return llm
    monkeypatch.setattr(bench, "_make_llm", fake_make)
    bench.run()
    runs = {(r["input_len"], r["status"]) for r in bench.results["runs"]}
    assert (64, "ok") in runs and (128, "OOM") in runs
    table = capsys.readouterr().out.rstrip().splitlines()
    assert table[-1].startswith("| 1x1 | 1 |") and "OOM" in table[-1]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["status"] for r in saved["runs"]] == ["ok", "OOM"]


class _CompilingLLM(_FakeLLM):
    """Compiles (per the engine's compile watch) the first time it meets a prompt longer than ``new_above``."""

    def __init__(self, new_above):
        super().__init__(oom_above=10**9)
        self.new_above, self.compiles, self.seconds = new_above, 3, 1.5  # the engine's start-up compiled 3

    def generate(self, prompts, params, use_tqdm=False):
        if len(prompts[0]) > self.new_above:
            self.new_above = 10**9
            self.compiles, self.seconds = self.compiles + 2, self.seconds + 0.75
        return super().generate(prompts, params, use_tqdm)

    def stats(self):
        snap = {"compiles": self.compiles, "seconds": self.seconds, "warm": False, "after_warmup": 0}
        return {0: {**super().stats()[0], "triton_compiles": snap}}


def test_compiles_inside_the_timed_runs_are_counted_and_named(tmp_path, monkeypatch, capsys):
    """A Triton compile during a timed prompt is part of its TTFT (session 13: 2.208 s timed vs 1.837 s profiled
    at 64K after a 16K warm-up on a cold Triton cache): each length records the compiles of its timed runs, and
    the log warns; --warmup each moves them into the length's warm-up prompt."""
    monkeypatch.setattr(B.PrefillBench, "_make_llm", lambda self, job, max_len: _CompilingLLM(new_above=64))
    bench = B.PrefillBench(_args(tmp_path, warmup="once", warmup_len=64))
    bench.run()
    got = {r["input_len"]: r["triton_compiles_timed"] for r in bench.results["runs"]}
    assert got == {64: {"count": 0, "seconds": 0.0}, 128: {"count": 2, "seconds": 0.75}}
    log = capsys.readouterr().out
    assert "n=128: WARNING: the timed runs include 2 Triton compile(s), 0.75 s" in log and "n=64: WARNING" not in log
    bench = B.PrefillBench(_args(tmp_path, warmup="each"))
    bench.run()
    assert all(r["triton_compiles_timed"]["count"] == 0 for r in bench.results["runs"])


def test_every_measurement_failing_exits_1(tmp_path, monkeypatch, capsys):
    """Issue 14 item 19: before, the bench exited 0 when every (layout, length) had failed (e.g. all OOM)."""
    monkeypatch.setattr(B.PrefillBench, "_make_llm", lambda self, job, max_len: _FakeLLM(oom_above=0))
    assert bench_cli.run(_args(tmp_path)) == 1
    assert "no measurement succeeded (2 attempted: OOM)" in capsys.readouterr().err
    monkeypatch.setattr(B.PrefillBench, "_make_llm", lambda self, job, max_len: _FakeLLM(oom_above=100))
    assert bench_cli.run(_args(tmp_path)) == 0                     # one of two succeeded


def test_warns_before_a_run_that_cannot_fit(tmp_path, monkeypatch, capsys):
    """The 8-layer bench model at 65536 tokens needs ~60 GiB in fp32: say so before starting, from the memory
    planner (model/memory_plan.py), naming the layout and the tiny CPU config."""
    monkeypatch.setattr(B, "_available_host_memory", lambda: 16 << 30)
    monkeypatch.setattr(B.PrefillBench, "_make_llm", lambda self, job, max_len: _FakeLLM(oom_above=0))
    args = _args(tmp_path, config=os.path.join(REPO, "benchmarks", "configs", "dsv32_8layer_32e.json"),
                 input_len="65536", layouts="1x1,1x2")
    assert bench_cli.run(args) == 1
    out = capsys.readouterr().out
    for layout in ("1x1", "1x2"):
        line = next(ln for ln in out.splitlines() if f"warning: layout {layout} at 65536 tokens needs about" in ln)
        assert "16.0 GiB available" in line and "tiny_dsv32.json" in line, line
    est = json.loads((tmp_path / "r.json").read_text())["meta"]["memory_estimates"]
    assert est["1x1"]["need_bytes"] > 40 << 30 and est["1x1"]["have_bytes"] == 16 << 30
    # the tiny config fits: no warning
    monkeypatch.setattr(B, "_available_host_memory", lambda: 2 << 30)
    bench = B.PrefillBench(_args(tmp_path, config=os.path.join(REPO, "benchmarks", "configs", "tiny_dsv32.json")))
    assert bench.memory_estimates() == []


def test_memory_estimate_plans_the_engines_sharding(tmp_path, monkeypatch):
    """The estimate must describe what the engine runs: whole experts per CP rank (expert parallelism, not the
    pre-issue-11 intermediate-dim split) and the bench's own --cp-split."""
    import dsaserve.model.memory_plan as MP

    seen = []
    real = MP.plan_memory
    monkeypatch.setattr(MP, "plan_memory", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    monkeypatch.setattr(B, "_available_host_memory", lambda: 16 << 30)
    bench = B.PrefillBench(_args(tmp_path, layouts="1x2", cp_split="zigzag"))
    assert bench.memory_estimates() == []
    assert [(kw["moe_split"], kw["cp_split"], kw["fp8_block"]) for kw in seen] == [("expert", "zigzag", None)]
    seen.clear()                                            # fp8 weights are planned at their fp8 size
    B.PrefillBench(_args(tmp_path, layouts="1x2", quantization="fp8")).memory_estimates()
    assert [kw["fp8_block"] for kw in seen] == [(128, 128)]


def test_report_header_names_the_device():
    assert R.device_label({"card": "NVIDIA H200", "gpus": 4}) == "NVIDIA H200 x4"
    assert R.device_label({"card": "CPU", "gpus": 0, "cpu_cores": 2, "cpu_name": "AMD EPYC"}) == "CPU (2 cores, AMD EPYC)"
    assert "x0" not in R.device_label({"card": "CPU", "gpus": 0})


def test_bad_arguments_give_a_clear_error(tmp_path, capsys):
    assert bench_cli.run(_args(tmp_path, layouts="2by2")) == 2
    assert "PPxCP" in capsys.readouterr().err
    assert bench_cli.run(_args(tmp_path, config=str(tmp_path / "missing.json"))) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- end to end on CPU: real engines, spawned ranks -------------------------------------------------
@pytest.mark.timeout(900)
def test_bench_end_to_end_cpu(tmp_path):
    # the shipped CPU bench config (the tiny test model's geometry with a 4096-token context)
    cfg = os.path.join(REPO, "benchmarks", "configs", "tiny_dsv32.json")
    assert json.load(open(cfg)) == tiny_config_dict(max_position_embeddings=4096)
    out, traces = tmp_path / "results.json", tmp_path / "traces"
    cmd = [sys.executable, "-m", "dsaserve", "bench", "prefill", "--config", str(cfg), "--device", "cpu",
           "--input-len", "72,150", "--layouts", "1x1,1x2,2x1", "--chunk-size", "64", "--repeats", "1",
           "--breakdown-len", "150", "--ablation-layout", "2x2", "--ablations", "pp_transfer",
           "--out", str(out), "--trace-dir", str(traces), "--comm-timeout-s", "120"]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())

    ok = {(r["layout"], r["variant"], r["input_len"]) for r in res["runs"] if r["status"] == "ok"}
    for lay in ("1x1", "1x2", "2x1"):
        for n in (72, 150):
            assert (lay, "baseline", n) in ok
    assert ("2x2", "baseline", 150) in ok and ("2x2", "pp_transfer=gathered", 150) in ok
    for r in res["runs"]:
        assert r["ttft_median_s"] > 0 and len(r["ttft_s"]) == 1
    # speedup vs 1x1 from the same run
    sp = res["summary"]["speedup"]
    base = next(r for r in res["runs"] if r["layout"] == "1x1" and r["input_len"] == 150)
    two = next(r for r in res["runs"] if r["layout"] == "2x1" and r["input_len"] == 150)
    assert sp["2x1"]["150"]["speedup"] == pytest.approx(base["ttft_median_s"] / two["ttft_median_s"])

    # breakdown only where asked; the marked phases are there and idle is never negative
    for r in res["runs"]:
        assert ("breakdown" in r) == (r["input_len"] == 150)
    bd = next(r for r in res["runs"] if r["layout"] == "2x1" and r["input_len"] == 150)["breakdown"]
    assert bd["rows"]["indexer logits"]["max"] > 0 and bd["rows"]["MoE experts"]["max"] > 0
    assert bd["rows"]["PP wait"]["max"] > 0                       # stage 1 waits for stage 0's first chunk
    assert all(v[R.IDLE_ROW] >= 0 for v in bd["per_rank"].values())
    assert set(bd["per_rank"]) == {"0", "1"}                      # JSON keys

    # traces: one combined file and one per rank, valid Chrome trace JSON with slices
    for lay, world in (("1x1", 1), ("1x2", 2), ("2x1", 2), ("2x2", 4)):
        combined = traces / f"trace_{lay}_baseline_150.json"
        ev = json.loads(combined.read_text())["traceEvents"]
        assert {e["pid"] for e in ev if e["ph"] == "X"} == set(range(world))
        for rank in range(world):
            per = json.loads((traces / f"trace_{lay}_baseline_150_rank{rank}.json").read_text())["traceEvents"]
            slices = [e for e in per if e["ph"] == "X"]
            assert slices and all(e["pid"] == rank and e["dur"] >= 0 for e in slices)

    # PP boundary: scattered sends exactly 1/C of gathered, and what the shard arithmetic predicts
    pb = res["summary"]["pp_bytes"]
    scat = {int(k): v for k, v in pb["scattered_per_rank"].items()}
    gath = {int(k): v for k, v in pb["gathered_per_rank"].items()}
    assert set(scat) == set(gath) == {0, 1}                       # the stage-0 ranks of 2x2
    for r in scat:
        assert scat[r] * 2 == gath[r]
        assert scat[r] == pb["expected_scattered"] == R.expected_pp_bytes(150, 64, 2, 128, 4)

    # the compact table is printed last, one row per layout
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-5].startswith("| layout | GPUs | 72 | 150 |")
    assert [ln.split("|")[1].strip() for ln in lines[-3:]] == ["1x1", "1x2", "2x1"]
    assert "PP boundary bytes per rank" in proc.stdout and "0.500" in proc.stdout


def test_equal_cost_chunks_shrink_towards_the_end():
    ends = R.equal_cost_bounds(65536, 4, per_token_ms=1e-3, per_pair_ms=1e-6)
    sizes = [b - a for a, b in zip([0] + ends[:-1], ends)]
    assert ends[-1] == 65536 and len(ends) == 4 and sizes == sorted(sizes, reverse=True)
    costs = [(b - a) * 1e-3 + (R.causal_pairs(b) - R.causal_pairs(a)) * 1e-6 for a, b in zip([0] + ends[:-1], ends)]
    assert max(costs) / min(costs) < 1.05
    # equal-cost chunks reach the (k + P - 1) / k bubble of equal chunks: 4 chunks on 2 stages -> 1.6x
    assert R.dynamic_pp_bound_speedup(65536, 16384, 2, 1e-3, 1e-6) == pytest.approx(1.6, rel=0.03)
    assert R.dynamic_pp_bound_speedup(65536, 16384, 2, 1e-3, 1e-6) > R.pp_bound_speedup(65536, 16384, 2, 1e-3, 1e-6)
