"""Fixtures for model tests: the shared tiny world (checkpoints, LLMs, transformers oracle), built once."""

import pytest

from tests.model._shared import get_world, shutdown_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    w = get_world(tmp_path_factory)
    yield w
    shutdown_world()
