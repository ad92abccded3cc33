"""No host sync in the forward of the MoE and MLP sublayers on their CUDA path (CPU source check).

Covers every function a MoE / dense-MLP sublayer runs on CUDA: the decoder layer's own body, the router,
the expert-input quantization, the grouped experts and their kernels, the stage's token exchange (single
rank and expert parallel), the fp8 / dense linear layers and the gated MLP, RMSNorm. ``LoopExperts`` (the
CPU oracle, never the CUDA default) syncs by design and the check must see it. tests/gpu/test_moe_no_sync.py
runs the same forwards under ``torch.cuda.set_sync_debug_mode("error")``, which also sees syncs inside torch.
The attention sublayer (indexer top-k selection, attention metadata) is not covered here.
"""

from __future__ import annotations

import pytest

from dsaserve import kernels
from dsaserve.kernels import fp8_linear, grouped_moe, quant
from dsaserve.model import deepseek_v32, layers, moe, parallelize
from tests.kernels.sync_check import host_sync_calls

CUDA_PATH = [deepseek_v32.DecoderLayer.forward, moe.MoE, moe.Router, moe.RoutedTokens, moe.ExpertWeights,
             moe.GroupedExperts, moe.StageTokens, parallelize.ExpertParallelTokens, layers.Fp8Linear,
             layers.Fp8LinearFactory, layers.DenseLinear, layers.GatedMLP, layers.RMSNorm, kernels.act_quant, quant,
             fp8_linear, grouped_moe]


@pytest.mark.parametrize("obj", CUDA_PATH, ids=lambda o: getattr(o, "__qualname__", getattr(o, "__name__", str(o))))
def test_no_host_sync_on_the_cuda_path(obj):
    assert host_sync_calls(obj) == []


def test_the_check_sees_the_loop_backends_sync():
    assert any(".tolist(" in c for c in host_sync_calls(moe.LoopExperts))
