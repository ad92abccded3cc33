"""Fixtures: run the real FastAPI app in-process (uvicorn in a background thread) over an engine."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from dsaserve.server.app import OpenAIServer, build_app  # noqa: E402

from .fake_engine import FakeEngine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessServer:
    """uvicorn serving ``build_app(OpenAIServer(engine))`` on a free port, in a daemon thread."""

    def __init__(self, engine=None, wait_ready: bool = True, **server_kwargs) -> None:
        self.engine = engine
        self.exit_requested: list[int] = []
        self.server = OpenAIServer(engine, request_exit=self._request_exit, **server_kwargs)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(self.server), host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=2)
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not (self.uv.started and (self.server.engine_loop.ready.is_set() or not wait_ready)):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.02)

    def _request_exit(self, code: int) -> None:
        self.exit_requested.append(code)
        self.uv.should_exit = True

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "server thread did not stop"


@pytest.fixture(scope="module")
def fake_server():
    srv = InProcessServer(FakeEngine("fake-model", max_model_len=256, step_delay=0.002))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(fake_server):
    with httpx.Client(base_url=fake_server.base_url, timeout=30) as c:
        yield c
