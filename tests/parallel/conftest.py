"""Fixtures for the PP x CP runtime tests: tiny checkpoints, single-process references, and the one live
multi-process engine (spawning a world costs seconds, so one engine per layout serves many tests).

The scheduler's ``chunked_prefill_size`` and ``cp_split`` are read from each step plan by the workers, so
one engine per layout is switched between modes with ``set_mode`` instead of being respawned.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time

import pytest

from tests.parallel._util import LLM_DEFAULTS, REF_PARAMS, batch_prompts


@pytest.fixture(scope="session")
def ds_ckpt(tmp_path_factory) -> str:
    from dsaserve.checkpoint.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "deepseek_v32"))


@pytest.fixture(scope="session")
def glm_ckpt(tmp_path_factory) -> str:
    from dsaserve.checkpoint.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "glm"), arch="glm_moe_dsa")


class Reference:
    """One single-process engine per checkpoint and its outputs for the standard prompt batch."""

    def __init__(self, model_dir: str, **options):
        from dsaserve import LLM

        self.llm = LLM(model_dir, **{**LLM_DEFAULTS, **options})
        self._cache: dict = {}

    def outputs(self, prompts: list[list[int]], params=REF_PARAMS):
        key = (tuple(map(tuple, prompts)), repr(params))
        if key not in self._cache:
            self._cache[key] = self.llm.generate(prompts, params)
        return self._cache[key]


@pytest.fixture(scope="session")
def ds_ref(ds_ckpt):
    ref = Reference(ds_ckpt)
    ref.outputs(batch_prompts())
    yield ref
    ref.llm.shutdown()


@pytest.fixture(scope="session")
def glm_ref(glm_ckpt):
    ref = Reference(glm_ckpt)
    yield ref
    ref.llm.shutdown()


class EnginePool:
    """At most one live multi-process ``LLM`` (rank 0 lives in this process, and a process holds one
    torch.distributed world at a time). ``get`` reuses the live engine when the key matches, otherwise
    shuts it down first."""

    def __init__(self):
        self.key: str | None = None
        self.llm = None

    def get(self, key: str, model_dir: str, **options):
        if self.key != key:
            self.shutdown()
            from dsaserve import LLM

            self.llm = LLM(model_dir, **{**LLM_DEFAULTS, **options})
            self.key = key
        return self.llm

    def release(self, key: str) -> None:
        if self.key == key:
            self.shutdown()

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
        self.key = self.llm = None


@pytest.fixture(scope="session")
def pool():
    p = EnginePool()
    yield p
    p.shutdown()


def pid_gone(pid: int) -> bool:
    """True once ``pid`` is no process at all (reaped), or a zombie (exited, only its entry left)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def wait_all_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    """Pids still alive after ``timeout_s`` (empty list: none left)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        multiprocessing.active_children()          # reaps finished children of this process
        alive = [p for p in pids if not pid_gone(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if not pid_gone(p)]


def venv_bin(name: str) -> str:
    import sys

    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else (shutil.which(name) or name)
