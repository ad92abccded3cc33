"""Suite-wide settings and the tiny checkpoints several folders share (tests/checkpoint, tests/config,
tests/tokenizer; built once per session, each build takes well under a second).

The tiny test models are latency-bound: OpenMP thread wake-ups on a busy 2-core CI box cost more than the
math (measured: 7x slower with 2 threads under load), so every test process and the subprocesses it
starts use one thread per process."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Triton fixes interpreter mode when a kernel is decorated, i.e. when dsaserve.kernels' modules are first
# imported, which any test importing the model does at collection. Without a GPU the kernel tests run the
# interpreter (tests/kernels), so set it before anything imports triton. ('auto' kernel dispatch ignores
# it: CPU tensors take the PyTorch references either way.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_ds(tmp_path_factory):
    from dsaserve.checkpoint.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_ds")), arch="deepseek_v32", seed=0)


@pytest.fixture(scope="session")
def tiny_ds_fp8(tmp_path_factory):
    from dsaserve.checkpoint.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_ds_fp8")), arch="deepseek_v32", fp8=True, seed=0)


@pytest.fixture(scope="session")
def tiny_glm(tmp_path_factory):
    from dsaserve.checkpoint.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_glm")), arch="glm_moe_dsa", seed=0)
