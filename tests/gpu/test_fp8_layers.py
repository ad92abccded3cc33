"""The engine's fp8 indexer path on the GPU against the same path on the CPU, layer by layer (issue 12, item 5).

Tiny DeepSeek-V3.2 checkpoint (fp32, index_topk 32), one 300-token prefill through ``DSAModel`` on both
devices with the same weights (``benchmarks/fp8_gap.py`` holds the capture and the metrics; it runs the
larger cuda_path_check model and more switches). Three comparisons:
  * forced: every GPU layer runs on the CPU's input of that layer, so each layer's own error is measured
    without compounding: hidden state within TF32 rounding, top-k sets equal except near-ties;
  * kernel only: the GPU fused top-k kernel on the CPU's own e4m3 inputs of each layer: the sets differ only
    where fp8 MMA accumulation order breaks a near-tie;
  * free-running (both devices on their own): printed per layer, not bounded (a changed set changes the
    next layer's input; the fp8 gap is this compounding, see benchmarks/KERNELS_NOTES.md).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import fp8_gap as G

    from dsaserve.checkpoint.tiny import make_tiny_checkpoint
    from dsaserve.config import ModelConfig

    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("fp8_layers") / "tiny"), arch="deepseek_v32", seed=0)
    topk = ModelConfig.from_hf(ckpt).index_topk
    ids = G.prompt(300, 0)
    cpu = G.run_prefill(ckpt, ids, "cpu")
    forced = G.run_prefill(ckpt, ids, "cuda", force_inputs=cpu)
    free = G.run_prefill(ckpt, ids, "cuda")
    res = {"forced": G.compare(forced, cpu, topk), "free": G.compare(free, cpu, topk),
           "kernel_only": G.kernel_only(cpu, "cuda", topk)}
    for name in ("forced", "free"):
        print(f"\n{name}: max logprob diff {res[name]['max_logprob_diff']}, per layer {res[name]['layers']}")
    print(f"kernel only: {res['kernel_only']}")
    return res, forced, free


def test_each_gpu_layer_on_cpu_inputs_stays_within_rounding(runs):
    res, _, _ = runs
    layers = res["forced"]["layers"]
    assert len(layers) >= 2 and any("topk" in row for row in layers)
    for row in layers:
        assert row["hidden_rel_err"] < 2e-3, row           # TF32 dots in sparse MLA: ~5e-4 per product
        if row.get("topk", {}).get("rows"):
            assert row["topk"]["mean_overlap"] >= 0.97, row


def test_fused_kernel_on_cpu_fp8_inputs_picks_the_cpu_sets(runs):
    res, _, _ = runs
    assert res["kernel_only"]
    for row in res["kernel_only"]:
        assert row["rows"] > 100, row
        assert row["mean_overlap"] >= 0.999 and row["identical_rows"] >= 0.98, row


def test_free_running_first_layer_equals_forced(runs):
    """Layer 0 sees the same embeddings either way: the forcing hook changes nothing there (bit for bit)."""
    _, forced, free = runs
    assert torch.equal(forced.layer_out[0], free.layer_out[0])
    assert torch.equal(forced.slots[0], free.slots[0])
