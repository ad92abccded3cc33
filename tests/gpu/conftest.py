"""GPU numerics tests: every kernel against its PyTorch reference on the GPU at realistic shapes.

Skipped without CUDA. Run them in their own pytest process (tests/kernels switches Triton to its CPU
interpreter for the whole process, which these tests refuse), e.g. on the device machine:

    PYTHONPATH=. python3 -m pytest tests/gpu -q -rs 2>&1 | tee $OUT/tests_gpu.txt
"""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU"
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        reason = "TRITON_INTERPRET is set (tests/kernels in the same process): run tests/gpu on its own"
    if reason:
        for item in items:
            if "tests/gpu" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(1234)
