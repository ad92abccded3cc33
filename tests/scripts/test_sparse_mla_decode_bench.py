"""benchmarks/sparse_mla_decode.py: imports and exits cleanly without a GPU; its floors and table."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import sparse_mla_decode as bench  # noqa: E402


def test_floors_and_variants():
    mem, mma = bench.floors_us(1)
    assert abs(mem - 2048 * 576 * 2 / 4.2e12 * 1e6) < 1e-9 and abs(mem - 0.5617) < 1e-3
    assert abs(mma - 2 * 2048 * 128 * 1088 / 989e12 * 1e6) < 1e-9
    assert bench.floors_us(32)[0] == 32 * mem
    names = [v[0] for v in bench.variants((4, 8))]
    assert names == ["split=1", "auto", "split=4", "split=8", "auto bk32"]


def test_table_and_cpu_exit(capsys):
    rows = [{"t": 1, "variant": "split=1", "nsplit": 1, "programs": 2, "eager_us": 150.0, "graph_us": 149.0,
             "floor_mem_us": 0.56, "floor_mma_us": 0.58},
            {"t": 1, "variant": "auto", "nsplit": 32, "programs": 64, "eager_us": 20.0, "graph_us": 14.9,
             "merge_us": 3.0, "floor_mem_us": 0.56, "floor_mma_us": 0.58},
            {"t": 1, "variant": "split=4", "nsplit": 4, "programs": 8, "error": "CHECK FAILED"}]
    text = bench.format_table(rows)
    assert " 10.00 " in text.splitlines()[3] and "CHECK FAILED" in text
    if not torch.cuda.is_available():
        assert bench.main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
