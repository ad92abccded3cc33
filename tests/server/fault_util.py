"""The fault scenario, shared by the fake-engine and real-engine fault tests."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai

from .proc_util import ServerProcess, assert_all_dead


def run_fault_scenario(server: ServerProcess, model: str, prompt: str = "fault test",
                       ready_timeout: float = 120.0, sig: int = signal.SIGKILL, needle: str = "died",
                       within_s: float = 60.0) -> str:
    """Kill (or stop, ``sig``) one worker mid-request; check errors containing ``needle`` reach every client
    within ``within_s``, /health turns 503, the server exits with status 1 and no process of its tree
    survives. Returns the /health reason."""
    server.wait_ready(ready_timeout)
    workers = server.worker_pids()
    assert workers, f"no worker process found under the server (pid {server.proc.pid})"
    tree = server.descendants()

    results: dict[str, object] = {}
    first_chunk = threading.Event()
    long = {"model": model, "prompt": prompt, "max_tokens": 10_000, "temperature": 0, "ignore_eos": True}

    def non_streaming(i: int) -> None:
        t0 = time.monotonic()
        try:
            r = httpx.post(server.base_url + "/v1/completions", json=dict(long, max_tokens=None), timeout=90)
            results[f"plain{i}"] = (r.status_code, r.json(), time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001
            results[f"plain{i}"] = (None, repr(e), time.monotonic() - t0)

    def streaming(i: int) -> None:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=90)
        t0 = time.monotonic()
        chunks = 0
        try:
            for _ in client.completions.create(model=model, prompt=prompt, max_tokens=None, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}):
                chunks += 1
                first_chunk.set()
            results[f"stream{i}"] = ("completed", chunks, time.monotonic() - t0)
        except openai.APIError as e:
            results[f"stream{i}"] = ("error", f"{type(e).__name__}: {e}", time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001
            results[f"stream{i}"] = ("other", repr(e), time.monotonic() - t0)

    threads = [threading.Thread(target=non_streaming, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=streaming, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    assert first_chunk.wait(60), "no streamed token arrived before the kill"
    time.sleep(0.3)  # let the non-streaming requests get going too
    assert server.proc.poll() is None
    t_kill = time.monotonic()
    os.kill(workers[-1], sig)

    saw_503, reason = False, ""
    while time.monotonic() - t_kill < within_s and server.proc.poll() is None:
        try:
            r = httpx.get(server.base_url + "/health", timeout=2)
            if r.status_code == 503:
                saw_503 = True
                assert r.json()["status"] == "unhealthy"
                reason = r.json()["reason"]
                break
        except httpx.HTTPError:
            break  # already gone
        time.sleep(0.05)
    for t in threads:
        t.join(max(1.0, within_s - (time.monotonic() - t_kill)))
    assert not any(t.is_alive() for t in threads), f"client requests still hanging {within_s} s after the kill: {results}"

    for i in range(2):
        status, body, _ = results[f"plain{i}"]
        assert status == 500, results
        assert body["error"]["type"] == "server_error" and needle in body["error"]["message"], body
        kind, info, _ = results[f"stream{i}"]
        assert kind == "error", results
    rc = server.proc.wait(timeout=max(1.0, within_s - (time.monotonic() - t_kill)))
    assert rc == 1, f"exit status {rc}\n{server.output()}"
    assert saw_503, "/health never reported 503 before the server exited"
    assert_all_dead(tree)
    return reason
