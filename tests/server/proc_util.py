"""Run ``dsaserve serve`` as a subprocess and inspect its process tree (Linux /proc)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from dsaserve.server.cli import _cmdline, _descendants

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE_FACTORY = "tests.server.fake_engine:make_fake_engine"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


class ServerProcess:
    """``python -m dsaserve serve ...`` with its output in a temp file (no pipe to fill up)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="dsaserve-serve-", suffix=".log", delete=False)
        full_env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        **(env or {}))
        cmd = [sys.executable, "-m", "dsaserve", "serve", "--port", str(self.port), "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready:\n{self.output()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output()}")

    def descendants(self) -> list[int]:
        return _descendants(self.proc.pid)

    def worker_pids(self) -> list[int]:
        """Child processes that look like engine workers (multiprocessing spawn children)."""
        return [p for p in self.descendants() if "spawn_main" in _cmdline(p) and "resource_tracker" not in _cmdline(p)]

    def kill(self) -> None:
        """Test cleanup: kill the server and everything under it."""
        pids = self.descendants()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for p in pids:
            try:
                os.kill(p, 9)
            except OSError:
                pass
        self.log.close()
        os.unlink(self.log.name)


def assert_all_dead(pids: list[int], timeout: float = 10.0) -> None:
    """Every pid is gone within ``timeout`` (multiprocessing's resource tracker needs a moment after its
    parent exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    left = [(p, _cmdline(p)[:100]) for p in pids if alive(p)]
    assert not left, f"orphaned processes: {left}"
