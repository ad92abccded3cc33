"""One device run for issue 13 (decode at the bandwidth floor) and 14.7a (warm-up), in one call of <= 6 minutes.

    PYTHONPATH=. python3 benchmarks/run_decode.py OUTDIR            # one H200 (benchmarks/run_decode.sh)
    PYTHONPATH=. python3 benchmarks/run_decode.py OUTDIR --cpu      # dry run of this script on CPU (tiny model)

Parts, in order, each under its own time limit (and all under one overall deadline), each in its own try: a
failure is reported in the summary and the next part still runs.
  1. ``pytest tests/gpu`` (graphs on/off greedy equality, no host sync in a decode step, fallback reason)
     -> OUTDIR/gpu_tests.log
  2. ``dsaserve bench decode`` on the 8-layer bench model (random bf16 weights) at batch 1 and 32, context
     4096, CUDA graphs on and off, with the same-run floor -> OUTDIR/bench_decode.json
  3. the serving check: ``dsaserve serve`` on the bench model in the background (a model folder holding the
     config and a word-level tokenizer over the whole vocabulary, so every streamed token carries text),
     wait for /health (after load, graph capture and warm-up; the log has both times), then
     ``dsaserve bench serve`` (64 clients, 128 prompts, 1024 in / 256 out) -> OUTDIR/serve.json and the
     long-prompt variant (64 clients, 64 prompts, a 65536-token prompt arriving 3 s in)
     -> OUTDIR/serve_long_prompt.json; the server is stopped -> OUTDIR/server.log.
     If decode runs eagerly (no capturable experts backend), output lengths are cut to fit the time left
     (the summary says so).
The routed experts backend is the first sync-free one the build has ("grouped": no host sync, capturable),
else "loop".
A short table comes last; OUTDIR/summary.json holds it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PROFILES = {
    "h200": dict(config="benchmarks/configs/dsv32_8layer_32e.json", device="cuda", dtype="bfloat16",
                 batches="1,32", contexts="4096", steps=48, deadline_s=345, tests_s=110, decode_s=120,
                 server_start_s=150, serve_prompts=128, serve_concurrency=64, input_len=1024, output_len=256,
                 long_len=65536, long_prompts=64, long_at=3.0, max_model_len=69632, max_num_seqs=80,
                 extra_engine=[]),
    "cpu": dict(config="benchmarks/configs/tiny_dsv32.json", device="cpu", dtype="float32", batches="1,4",
                contexts="128", steps=4, deadline_s=600, tests_s=120, decode_s=200, server_start_s=120,
                serve_prompts=8, serve_concurrency=4, input_len=48, output_len=32, long_len=600, long_prompts=4,
                long_at=0.5, max_model_len=2048, max_num_seqs=8,
                extra_engine=["--attention-backend", "triton", "--kv-cache-tokens", "8192"]),
}
TARGETS_MS = {1: 5.0, 32: 12.0}          # issue 13, 8-layer bench model, bf16, context 4096
TARGET_ITL_RATIO = 3.0


class _Skipped(Exception):
    """A part left out by a command-line flag."""


def log(msg: str) -> None:
    print(f"[run_decode {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


T0 = time.monotonic()


def remaining(deadline: float) -> float:
    return deadline - (time.monotonic() - T0)


def run_cmd(cmd: list[str], timeout: float, log_path: str, env: dict | None = None) -> int:
    """Run to completion (or kill the whole process group at ``timeout``); output to log_path and the tail here."""
    log(f"$ {' '.join(cmd)}  (limit {timeout:.0f} s)")
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            rc = 124
    with open(log_path) as f:
        tail = f.read().splitlines()[-15:]
    print("\n".join("    " + line for line in tail), flush=True)
    log(f"exit status {rc}")
    return rc


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM this script's child and its process group, SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def experts_backend() -> str:
    from dsaserve.args import MOE_BACKENDS

    return next((b for b in MOE_BACKENDS if b not in ("loop", "auto")), "loop")


def make_model_dir(config: str, outdir: str) -> str:
    """config.json + a word-level tokenizer.json over the whole vocabulary ("t0" .. "t{V-1}"): every token id
    decodes to non-empty text, so the streamed chunks of the serving check all carry tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    with open(os.path.join(REPO, config)) as f:
        cfg = json.load(f)
    path = os.path.join(outdir, "bench_model")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    return path


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> tuple[bool, float]:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            return False, time.monotonic() - t
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return True, time.monotonic() - t
        except OSError:
            pass
        time.sleep(1.0)
    return False, time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", help="folder for every JSON and log of this run")
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU with the tiny config")
    ap.add_argument("--serve-only", action="store_true",
                    help="only the serving check (the GPU tests and bench decode run elsewhere, e.g. "
                         "benchmarks/run_device_parts.sh); output lengths are not cut then")
    ap.add_argument("--server-args", default="",
                    help="extra `dsaserve serve` flags, one string (e.g. \"--prefill-chunk-while-decoding 256\")")
    a = ap.parse_args()
    p = dict(PROFILES["cpu" if a.cpu else "h200"])
    p["extra_engine"] = [*p["extra_engine"], *a.server_args.split()]
    out = os.path.abspath(a.outdir)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    py = sys.executable
    moe = experts_backend()
    summary: dict = {"profile": "cpu" if a.cpu else "h200", "moe_backend": moe, "parts": {}}
    log(f"profile {summary['profile']}, routed experts backend {moe!r}")

    def save():
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)

    # ---- 1. GPU tests ----------------------------------------------------------------------------------
    try:
        if a.serve_only:
            raise _Skipped
        rc = run_cmd([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"],
                     min(p["tests_s"], remaining(p["deadline_s"]) - 200), os.path.join(out, "gpu_tests.log"), env)
        with open(os.path.join(out, "gpu_tests.log")) as f:
            last = [line for line in f.read().splitlines() if line.strip()][-1:]
        summary["parts"]["gpu_tests"] = {"exit": rc, "result": last[0] if last else ""}
    except _Skipped:
        summary["parts"]["gpu_tests"] = {"skipped": "--serve-only"}
    except Exception as e:
        summary["parts"]["gpu_tests"] = {"error": f"{type(e).__name__}: {e}"}
        traceback.print_exc()
    save()

    # ---- 2. bench decode -------------------------------------------------------------------------------
    decode_json = os.path.join(out, "bench_decode.json")
    try:
        if a.serve_only:
            raise _Skipped
        cmd = [py, "-m", "dsaserve", "bench", "decode", "--config", p["config"], "--device", p["device"],
               "--dtype", p["dtype"], "--batch-size", p["batches"], "--context-len", p["contexts"],
               "--steps", str(p["steps"]), "--graphs", "on,off", "--moe-backend", moe, "--out", decode_json,
               "--deadline-s", str(max(10, p["decode_s"] - 40))]
        if a.cpu:
            cmd += ["--attention-backend", "triton"]
        rc = run_cmd(cmd, min(p["decode_s"], remaining(p["deadline_s"]) - 150), os.path.join(out, "bench_decode.log"),
                     env)
        summary["parts"]["bench_decode"] = {"exit": rc}
    except _Skipped:
        summary["parts"]["bench_decode"] = {"skipped": "--serve-only"}
    except Exception as e:
        summary["parts"]["bench_decode"] = {"error": f"{type(e).__name__}: {e}"}
        traceback.print_exc()
    decode_runs = []
    if os.path.isfile(decode_json):
        with open(decode_json) as f:
            decode_runs = json.load(f).get("runs", [])
    save()

    # ---- 3. serving check --------------------------------------------------------------------------------
    server = None
    try:
        model_dir = make_model_dir(p["config"], out)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [py, "-m", "dsaserve", "serve", "--model", model_dir, "--load-format", "random", "--device", p["device"],
               "--dtype", p["dtype"], "--port", str(port), "--max-model-len", str(p["max_model_len"]),
               "--max-num-seqs", str(p["max_num_seqs"]), "--moe-backend", moe, *p["extra_engine"]]
        log(f"$ {' '.join(cmd)}")
        server_log = open(os.path.join(out, "server.log"), "w")
        # DSASERVE_LOG_COMPILES: a Triton compile after the warm-up (a stall for every request) is logged
        server = subprocess.Popen(cmd, cwd=REPO, stdout=server_log, stderr=subprocess.STDOUT,
                                  env=dict(env, DSASERVE_LOG_COMPILES="1"),
                                  start_new_session=True)
        ok, took = wait_healthy(server, url, min(p["server_start_s"], remaining(p["deadline_s"]) - 60))
        summary["parts"]["server_start"] = {"ready": ok, "seconds": round(took, 1)}
        log(f"server {'ready' if ok else 'NOT ready'} after {took:.0f} s")
        if ok:
            # size the runs to the time left from the measured decode step (graphs or not)
            step32 = [r["step_ms"]["median"] for r in decode_runs if r.get("status") == "ok" and r["batch_size"] ==
                      max(int(b) for b in p["batches"].split(",")) and r["graphs"] == "on"]
            out_len = p["output_len"]
            budget = (remaining(p["deadline_s"]) - 30) / 2
            if step32 and not a.cpu:
                est = 2 * out_len * step32[0] * 1.6 / 1e3 + 10
                if est > budget:
                    out_len = max(16, int(out_len * budget / est))
                    log(f"decode at {step32[0]:.0f} ms/step: output length cut to {out_len} to fit {budget:.0f} s")
            summary["parts"]["serve_output_len"] = out_len
            base = [py, "-m", "dsaserve", "bench", "serve", "--base-url", url, "--max-concurrency",
                    str(p["serve_concurrency"]), "--input-len", str(p["input_len"]), "--output-len", str(out_len),
                    "--ignore-eos", "--timeout-s", "120"]
            runs = [("serve", base + ["--num-prompts", str(p["serve_prompts"])]),
                    ("serve_long_prompt", base + ["--num-prompts", str(p["long_prompts"]), "--long-prompt-len",
                                                  str(p["long_len"]), "--long-prompt-at", str(p["long_at"])])]
            for name, cmd in runs:
                try:
                    js = os.path.join(out, f"{name}.json")
                    rc = run_cmd(cmd + ["--out", js], max(20, min(budget + 20, remaining(p["deadline_s"]) - 15)),
                                 os.path.join(out, f"{name}.log"), env)
                    summary["parts"][name] = {"exit": rc}
                    if os.path.isfile(js):
                        with open(js) as f:
                            summary["parts"][name]["report"] = json.load(f)
                except Exception as e:
                    summary["parts"][name] = {"error": f"{type(e).__name__}: {e}"}
                    traceback.print_exc()
    except Exception as e:
        summary["parts"]["server"] = {"error": f"{type(e).__name__}: {e}"}
        traceback.print_exc()
    finally:
        if server is not None:
            stop_group(server)
            log(f"server stopped (exit {server.returncode})")
    try:
        with open(os.path.join(out, "server.log")) as f:
            text = f.read().splitlines()
        summary["server_startup_lines"] = [line for line in text if "CUDA graphs" in line or "warm-up" in line][:8]
        summary["compiles_after_warmup"] = [line for line in text if "warm-up did not cover" in line][:20]
    except OSError:
        pass
    save()
    print(table(summary, decode_runs), flush=True)
    return 0


def table(summary: dict, decode_runs: list[dict]) -> str:
    lines = ["", "=" * 30 + " run_decode summary " + "=" * 30,
             f"experts backend: {summary['moe_backend']}",
             f"gpu tests: {summary['parts'].get('gpu_tests', {}).get('result', summary['parts'].get('gpu_tests'))}"]
    lines += [f"startup: {s}" for s in summary.get("server_startup_lines", [])]
    lines += [f"compile after warm-up: {s}" for s in summary.get("compiles_after_warmup", [])]
    ctx = sorted({r["context_len"] for r in decode_runs})
    lines.append(f"bench decode (context {ctx}): batch graphs | ms/step med   p99 | floor ms x floor | target")
    for r in decode_runs:
        if r.get("status") != "ok":
            lines.append(f"  B={r['batch_size']:<3} graphs {r['graphs']:<3} | {r.get('status')}")
            continue
        used = "on" if r.get("graph_bucket") else "off"
        tgt = TARGETS_MS.get(r["batch_size"]) if r["context_len"] == 4096 else None
        met = "" if tgt is None else f"<= {tgt:g} ms: {'MET' if r['step_ms']['median'] <= tgt else 'not met'}"
        lines.append(f"  B={r['batch_size']:<3} graphs {r['graphs']:<3}(used {used:<3}) | {r['step_ms']['median']:8.2f} "
                     f"{r['step_ms']['p99']:6.2f} | {r['floor']['floor_ms'] or 0:8.3f} {r['floor_ratio'] or 0:7.1f} | {met}")
    for name in ("serve", "serve_long_prompt"):
        part = summary["parts"].get(name, {})
        rep = part.get("report")
        if not rep:
            lines.append(f"{name}: {part or 'not run'}")
            continue
        itl = rep["itl_ms"]
        lines.append(f"{name}: {rep['completed']}/{rep['num_requests']} ok, {rep['output_throughput']} tok/s out, "
                     f"TTFT p50 {rep['ttft_ms']['p50']} ms, ITL p50 {itl['p50']} p99 {itl['p99']} ms")
        lp = rep.get("long_prompt")
        if lp:
            ratio = lp.get("itl_p99_during_over_p50_outside")
            verdict = "-" if ratio is None else ("MET" if ratio <= TARGET_ITL_RATIO else "not met")
            lines.append(f"  long prompt {lp['input_len']} tokens: TTFT {lp['ttft_ms']} ms, ITL p99 during / p50 "
                         f"outside = {ratio} (target <= {TARGET_ITL_RATIO:g}: {verdict})")
            # "outside" is whatever part of this run the long prefill did not cover; when every request
            # finishes before the long prompt does, that is only the admission burst at the start. The plain
            # run's ITL p50 (same server, same concurrency) is the steady-state reference.
            steady = ((summary["parts"].get("serve") or {}).get("report") or {}).get("itl_ms", {}).get("p50")
            during = (lp.get("itl_during_prefill_ms") or {}).get("p99")
            if steady and during:
                r2 = round(during / steady, 3)
                lines.append(f"  ITL p99 during / ITL p50 of the plain run (steady decoding) = {during} / {steady} = "
                             f"{r2} (target <= {TARGET_ITL_RATIO:g}: {'MET' if r2 <= TARGET_ITL_RATIO else 'not met'})")
    if "serve_output_len" in summary["parts"]:
        lines.append(f"serve output length used: {summary['parts']['serve_output_len']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
