"""Helpers every ``dsaserve bench`` benchmark shares: the command line, engine teardown between
measurements, OOM detection, GPU matmul ceilings, and the repo's plotting script."""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command_line() -> str:
    """How this process was started, for the report's header."""
    argv0 = sys.argv[0] if sys.argv else ""
    head = "python3 -m dsaserve" if argv0.endswith("__main__.py") else os.path.basename(argv0) or "dsaserve"
    return " ".join([head] + sys.argv[1:])


def save_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file, so a run killed mid-write leaves the last
    complete file (the benchmarks rewrite their JSON after every measurement)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def gpu_rows_record(rows: list) -> dict:
    """A kernel benchmark's JSON: its command, date, GPU and torch version around its result rows."""
    return {"command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def shutdown_llm(llm) -> None:
    """Shut an engine down without letting a failure stop the bench; leave the process ready for the next."""
    if llm is not None:
        try:
            llm.shutdown()
        except Exception as e:  # a broken engine must not stop the bench
            print(f"[bench] shutdown failed: {e}", file=sys.stderr)
    gc.collect()
    # an engine that failed while starting may leave this process's default group behind: the next
    # engine could not create its own
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:
            print(f"[bench] destroy_process_group failed: {e}", file=sys.stderr)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_plotter():
    """benchmarks/plot_ttft.py's ``plot_results`` (the repo's plotting script), or None if absent."""
    import importlib.util

    path = os.path.join(REPO_ROOT, "benchmarks", "plot_ttft.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("dsaserve_plot_ttft", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.plot_results


def measure_matmul_ceilings(size: int = 8192, iters: int = 20) -> dict:
    """fp8 e4m3 ``torch._scaled_mm`` and bf16 matmul TFLOPS at size^3 on the current GPU (median of events)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    a = torch.randn(size, size, device=dev)
    b = torch.randn(size, size, device=dev)
    out = {}

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        return statistics.median(times)

    ab, bb = a.bfloat16(), b.bfloat16()
    out["bf16_tflops"] = 2 * size**3 / (timed(lambda: ab @ bb) * 1e-3) / 1e12
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()      # column-major second operand
        one = torch.ones((), device=dev)
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        out["fp8_tflops"] = 2 * size**3 / (timed(fn) * 1e-3) / 1e12
    except (RuntimeError, AttributeError) as e:
        out["fp8_error"] = str(e).splitlines()[0]
    del a, b, ab, bb
    torch.cuda.empty_cache()
    return out
