"""Faults and process lifecycle of ``dsaserve serve`` (subprocess), with the fake engine.

The fake engine's worker is a real spawned process (``FAKE_ENGINE_WORKER=1``), so killing it drives the
whole server-side fault path: EngineDeadError -> in-flight requests fail -> /health 503 -> exit 1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

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
    assert rc == 0, server.output()
    assert_all_dead(tree)


def _stream(base_url: str, body: dict, events: list, started: threading.Event, headers: dict) -> None:
    """Collect the SSE ``data:`` payloads of one streaming request (raw, to see error events as sent)."""
    try:
        with httpx.stream("POST", base_url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
        events.append("<closed>")
    except httpx.HTTPError as e:
        events.append(f"<{type(e).__name__}>")


def test_sigterm_drains_then_errors_the_rest(spawn):
    """Issue 14 item 3: SIGTERM lets short requests finish, ends long ones with an error event at the drain
    deadline (never a truncated stream), refuses new work meanwhile (/health 503), exits 0 with a clean log.
    Also item 7b: the API key from the environment is enforced and never logged."""
    key = "sk-drain-test-93b1"
    server = spawn([*FAKE_ARGS, "--shutdown-timeout", "3", "--log-level", "info"],
                   env={"FAKE_ENGINE_WORKER": "1", "FAKE_ENGINE_STEP_DELAY": "0.03", "DSASERVE_API_KEY": key})
    server.wait_ready()
    auth = {"Authorization": f"Bearer {key}"}
    base = {"model": "fake-model", "temperature": 0, "stream": True, "ignore_eos": True}
    short, long, s_started, l_started = [], [], threading.Event(), threading.Event()
    threads = [threading.Thread(target=_stream, args=(server.base_url, dict(base, prompt="short", max_tokens=40),
                                                      short, s_started, auth)),
               threading.Thread(target=_stream, args=(server.base_url, dict(base, prompt="long", max_tokens=240),
                                                      long, l_started, auth))]
    for t in threads:
        t.start()
    assert s_started.wait(30) and l_started.wait(30)
    assert httpx.get(server.base_url + "/v1/models", timeout=5).status_code == 401      # the key is enforced
    tree = server.descendants()
    t_term = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    health = httpx.get(server.base_url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "draining", health.text
    refused = httpx.post(server.base_url + "/v1/completions", headers=auth, timeout=5,
                         json={"model": "fake-model", "prompt": "late", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    for t in threads:
        t.join(30)
    rc = server.proc.wait(timeout=30)
    took = time.monotonic() - t_term
    out = server.output()
    assert rc == 0, out
    # the short request completed normally within the drain
    assert short[-2:] == ["[DONE]", "<closed>"], short[-3:]
    assert json.loads(short[-3])["choices"][0]["finish_reason"] == "length"
    # the long one got an error event, then the stream closed (no truncation, no [DONE])
    assert long[-1] == "<closed>", long[-3:]
    err = json.loads(long[-2])["error"]
    assert err["code"] == "shutting_down" and "shutting down" in err["message"], err
    assert 3 <= took < 15, took
    for bad in ("Traceback", "CancelledError", "leaked semaphore", key):
        assert bad not in out, f"{bad!r} in the log:\n{out}"
    assert_all_dead(tree)


def test_port_in_use_exits_1_before_loading(spawn, tmp_path):
    marker = tmp_path / "engine-built"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = spawn(FAKE_ARGS, env={"FAKE_ENGINE_WORKER": "1", "FAKE_ENGINE_MARKER": str(marker)}, port=port)
        assert server.proc.wait(timeout=60) == 1
        assert not server.descendants()
    out = server.output()
    assert not marker.exists(), "the engine was built although the port was taken"
    assert f"cannot listen on 127.0.0.1:{port}" in out and "--port" in out, out
    assert "Traceback" not in out and "exit status 3" not in out, out


def test_engine_construction_failure_exits_1(spawn, tmp_path):
    server = spawn(["--model", str(tmp_path / "does-not-exist")])
    assert server.proc.wait(timeout=120) == 1
    assert "does-not-exist" in server.output()
