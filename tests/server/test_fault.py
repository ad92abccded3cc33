"""Faults and process lifecycle of ``dsaserve serve`` (subprocess), with the fake engine.

The fake engine's worker is a real spawned process (``FAKE_ENGINE_WORKER=1``), so killing it drives the
whole server-side fault path: EngineDeadError -> in-flight requests fail -> /health 503 -> exit 1.
"""

from __future__ import annotations

import os
import signal
import socket

import httpx
import pytest

pytest.importorskip("openai")

from .fault_util import run_fault_scenario  # noqa: E402
from .proc_util import FAKE_FACTORY, ServerProcess, assert_all_dead  # noqa: E402

FAKE_ARGS = ["--model", "fake-model", "--engine-factory", FAKE_FACTORY, "--fault-exit-delay", "2"]


@pytest.fixture
def spawn():
    servers = []

    def _spawn(*args, **kw):
        s = ServerProcess(*args, **kw)
        servers.append(s)
        return s

    yield _spawn
    for s in servers:
        s.kill()


def test_worker_killed_mid_request(spawn):
    server = spawn(FAKE_ARGS, env={"FAKE_ENGINE_WORKER": "1", "FAKE_ENGINE_STEP_DELAY": "0.01"})
    run_fault_scenario(server, "fake-model")
    out = server.output()
    assert "engine died" in out and "exiting with status 1" in out, out


def test_worker_killed_while_idle(spawn):
    server = spawn(FAKE_ARGS, env={"FAKE_ENGINE_WORKER": "1"})
    server.wait_ready()
    tree = server.descendants()
    os.kill(server.worker_pids()[-1], signal.SIGKILL)
    assert server.proc.wait(timeout=30) == 1
    assert_all_dead(tree)


def test_sigterm_shuts_down_cleanly(spawn):
    server = spawn(FAKE_ARGS, env={"FAKE_ENGINE_WORKER": "1"})
    server.wait_ready()
    r = httpx.post(server.base_url + "/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 4,
                                                               "temperature": 0}, timeout=30)
    assert r.status_code == 200
    tree = server.descendants()
    assert server.worker_pids()
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(timeout=30)
    assert rc in (0, -signal.SIGTERM), server.output()
    assert_all_dead(tree)


def test_port_in_use_exits_1(spawn):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = spawn(FAKE_ARGS, env={"FAKE_ENGINE_WORKER": "1"}, port=port)
        assert server.proc.wait(timeout=60) == 1
        assert not server.descendants()


def test_engine_construction_failure_exits_1(spawn, tmp_path):
    server = spawn(["--model", str(tmp_path / "does-not-exist")])
    assert server.proc.wait(timeout=120) == 1
    assert "does-not-exist" in server.output()
