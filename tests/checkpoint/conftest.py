"""Shared tiny checkpoints (built once per test session; each build takes well under a second)."""

import pytest

from dsaserve.checkpoint.tiny import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ds(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_ds")), arch="deepseek_v32", seed=0)


@pytest.fixture(scope="session")
def tiny_ds_fp8(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_ds_fp8")), arch="deepseek_v32", fp8=True, seed=0)


@pytest.fixture(scope="session")
def tiny_glm(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_glm")), arch="glm_moe_dsa", seed=0)
