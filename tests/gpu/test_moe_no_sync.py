"""No host sync in the MoE / dense-MLP forwards on a GPU (the cases of ``tests/gpu/moe_no_sync.py``).
Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.moe_no_sync import CASES, run_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("quantization,n_experts,tokens,decode", CASES, ids=lambda v: str(v))
def test_moe_and_mlp_forward_without_host_sync(quantization, n_experts, tokens, decode):
    run_case(quantization, n_experts, tokens, decode)
