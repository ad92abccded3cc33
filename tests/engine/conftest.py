"""Fixtures for engine tests: the same session-wide tiny world as tests/model (built once for both)."""

import pytest

from tests.model._shared import get_world, shutdown_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    w = get_world(tmp_path_factory)
    yield w
    shutdown_world()
