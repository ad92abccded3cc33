"""``dsaserve bench serve`` on CPU: latency statistics from a fake OpenAI server with known delays (httpx
MockTransport, no sockets), failure counting, arrivals and concurrency, the long-prompt window, and one
end-to-end CLI run against this project's server (in-process, fake engine)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time

import httpx
import numpy as np
import pytest

from dsaserve.bench import serve as S

TTFT, ITL, N_TOKENS = 0.05, 0.02, 5


class FakeOpenAI:
    """An in-process OpenAI-style streaming server with fixed delays; what each request does is chosen by its
    prompt text (``ok``, ``http500``, ``http400``, ``error_event``, ``truncate``, ``connect_error``,
    ``bad_json``). A prompt of >= ``long_len`` token ids stalls every other stream for ``stall`` seconds
    (a prefill that freezes decode) and gets its first token after it."""

    def __init__(self, ttft=TTFT, itl=ITL, n_tokens=N_TOKENS, usage=True, stall=0.3, long_len=100):
        self.ttft, self.itl, self.n_tokens, self.usage = ttft, itl, n_tokens, usage
        self.stall, self.long_len = stall, long_len
        self.stall_until = 0.0
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.transport = httpx.MockTransport(self.handle)

    async def _wait_stall(self):
        while (left := self.stall_until - time.monotonic()) > 0:
            await asyncio.sleep(left)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model"}, {"id": "other"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        prompt = body.get("prompt", body.get("messages", [{}])[0].get("content"))
        kind = prompt if isinstance(prompt, str) else "ok"
        if kind == "connect_error":
            raise httpx.ConnectError("connection refused", request=request)
        if kind in ("http500", "http400"):
            code = int(kind[4:])
            return httpx.Response(code, json={"error": {"message": f"fake failure {code}", "type": "x"}})
        long = isinstance(prompt, list) and len(prompt) >= self.long_len
        if long:
            self.stall_until = time.monotonic() + self.stall
        chat = "messages" in body

        def chunk(text, finish=None):
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "finish_reason": finish})
            return f"data: {json.dumps({'choices': [choice]})}\n\n".encode()

        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        async def stream():
            # The client stops reading at [DONE], leaving the generator suspended there: count the request
            # as finished before that last yield (the finally covers the early returns).
            try:
                await asyncio.sleep(self.stall if long else self.ttft)
                n = body["max_tokens"] if long else self.n_tokens
                for k in range(n):
                    if k:
                        await asyncio.sleep(self.itl)
                    if not long:
                        await self._wait_stall()
                    yield chunk(f" t{k}", "length" if k == n - 1 else None)
                    if kind == "error_event" and k == 1:
                        yield b'data: {"error": {"message": "engine died", "type": "server_error"}}\n\n'
                        return
                    if kind == "truncate" and k == 2:
                        return
                    if kind == "bad_json" and k == 1:
                        yield b"data: {not json\n\n"
                        return
                if self.usage:
                    usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            finally:
                self.in_flight -= 1
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())


def bench(fake: FakeOpenAI, **kw) -> dict:
    cfg = S.BenchConfig(base_url="http://fake", **kw)
    return asyncio.run(S.run_benchmark(cfg, transport=fake.transport))


def write_dataset(tmp_path, rows) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


# ---- statistics --------------------------------------------------------------------------------------------
def test_latency_stats_follow_the_injected_delays():
    fake = FakeOpenAI()
    rep = bench(fake, num_prompts=8, input_len=16, output_len=N_TOKENS)
    assert (rep["completed"], rep["failed"], rep["failures"]) == (8, 0, {})
    assert rep["total_output_tokens"] == 8 * N_TOKENS and rep["output_tokens_source"] == "usage"
    assert rep["total_input_tokens"] == 8 * 7  # the server-reported prompt_tokens
    assert rep["model"] == "fake-model"  # the first of /v1/models
    for key in ("ttft_ms", "itl_ms", "e2e_ms", "tpot_ms"):
        assert set(rep[key]) == {"count", "mean", "p50", "p90", "p99", "max"}
    assert rep["ttft_ms"]["count"] == 8 and rep["itl_ms"]["count"] == 8 * (N_TOKENS - 1)
    # Sleeps never end early; a busy CI box may make them late, hence the loose upper bounds.
    ttft_ms, itl_ms, e2e_ms = TTFT * 1e3, ITL * 1e3, (TTFT + (N_TOKENS - 1) * ITL) * 1e3
    assert ttft_ms - 2 <= rep["ttft_ms"]["p50"] <= 3 * ttft_ms + 100
    assert itl_ms - 2 <= rep["itl_ms"]["p50"] <= 3 * itl_ms + 60
    assert e2e_ms - 2 <= rep["e2e_ms"]["p50"] <= 3 * e2e_ms + 150
    assert itl_ms - 2 <= rep["tpot_ms"]["p50"] <= 3 * itl_ms + 60
    assert rep["duration_s"] >= e2e_ms / 1e3 - 0.002
    assert rep["request_throughput"] == pytest.approx(8 / rep["duration_s"], rel=1e-3)
    assert rep["output_throughput"] == pytest.approx(8 * N_TOKENS / rep["duration_s"], rel=1e-3)
    assert len(rep["requests"]) == 8 and all(r["ok"] and r["chunks"] == N_TOKENS for r in rep["requests"])
    json.dumps(rep, allow_nan=False)  # the report is plain JSON (no inf/nan)
    table = S.format_table(rep)
    assert "TTFT" in table and "ITL" in table and "8 / 0" in table


def test_output_tokens_are_counted_from_chunks_without_usage():
    rep = bench(FakeOpenAI(usage=False), num_prompts=3, input_len=4, output_len=N_TOKENS, endpoint="chat")
    assert rep["completed"] == 3 and rep["output_tokens_source"] == "chunks"
    assert rep["total_output_tokens"] == 3 * N_TOKENS and rep["total_input_tokens"] is None


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert S.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), abs=1e-12)
    assert S.percentile([], 50) is None


# ---- failures -----------------------------------------------------------------------------------------------
def test_every_failure_kind_is_counted_with_its_reason(tmp_path):
    kinds = ["ok", "http500", "ok", "http400", "error_event", "truncate", "connect_error", "bad_json", "ok"]
    data = write_dataset(tmp_path, [{"prompt": k} for k in kinds])
    rep = bench(FakeOpenAI(), num_prompts=len(kinds), dataset=data, output_len=N_TOKENS)
    assert rep["completed"] == 3 and rep["failed"] == 6
    assert rep["failures"] == {"http_500": 1, "http_400": 1, "error_event": 1, "truncated_stream": 1,
                               "connection": 1, "invalid_chunk": 1}
    assert rep["failure_examples"]["http_500"] == "fake failure 500"
    assert rep["failure_examples"]["error_event"] == "engine died"
    # failed requests stay out of the latency statistics
    assert rep["ttft_ms"]["count"] == 3 and rep["total_output_tokens"] == 3 * N_TOKENS
    assert "failed: http_500" in S.format_table(rep)


def test_unreachable_server_is_a_clear_error():
    async def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    cfg = S.BenchConfig(base_url="http://nowhere", num_prompts=1)
    with pytest.raises(RuntimeError, match="cannot reach .*/v1/models"):
        asyncio.run(S.run_benchmark(cfg, transport=httpx.MockTransport(refuse)))


# ---- prompts, arrivals, concurrency -------------------------------------------------------------------------
def test_request_bodies_token_prompts_and_passthrough():
    fake = FakeOpenAI()
    bench(fake, num_prompts=3, input_len=12, output_len=4, token_id_range=(20, 30), ignore_eos=True, model="m1", seed=3)
    for body in fake.bodies:
        assert body["model"] == "m1" and body["max_tokens"] == 4 and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
        assert len(body["prompt"]) == 12 and all(20 <= t < 30 for t in body["prompt"])
    fake2 = FakeOpenAI()
    bench(fake2, num_prompts=3, input_len=12, output_len=4, token_id_range=(20, 30), model="m1", seed=3)
    assert [b["prompt"] for b in fake2.bodies] == [b["prompt"] for b in fake.bodies]  # seeded
    assert "ignore_eos" not in fake2.bodies[0]
    fake3 = FakeOpenAI()
    bench(fake3, num_prompts=2, input_len=6, output_len=4, endpoint="chat")
    msg = fake3.bodies[0]["messages"]
    assert msg[0]["role"] == "user" and len(msg[0]["content"].split()) == 6


def test_bad_config_is_rejected():
    for kw, match in [({"num_prompts": 0}, "num-prompts"), ({"request_rate": 0}, "request-rate"),
                      ({"long_prompt_len": 10}, "go together"), ({"token_id_range": (5, 5)}, "token-id-range"),
                      ({"max_concurrency": 0}, "max-concurrency")]:
        with pytest.raises(ValueError, match=match):
            S.BenchConfig(base_url="http://x", **kw).validate()
    with pytest.raises(ValueError, match="chat"):
        _ = S.BenchConfig(base_url="http://x", endpoint="chat", prompt_kind="tokens").token_prompts


def test_poisson_arrivals():
    gaps = np.diff(S.arrival_times(4000, 50.0, seed=0))
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.08)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.12)  # exponential: std == mean
    assert S.arrival_times(5, 50.0, seed=0) == S.arrival_times(5, 50.0, seed=0)
    assert S.arrival_times(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


def test_request_rate_spaces_the_sends():
    rep = bench(FakeOpenAI(), num_prompts=6, input_len=4, output_len=2, request_rate=20.0, seed=1)
    starts = [r["start_s"] for r in rep["requests"]]
    offsets = S.arrival_times(6, 20.0, seed=1)
    assert all(s >= o - 0.002 for s, o in zip(starts, offsets))
    assert starts[-1] - starts[0] >= offsets[-1] - 0.01


def test_max_concurrency_caps_requests_in_flight():
    fake = FakeOpenAI()
    rep = bench(fake, num_prompts=12, input_len=4, output_len=N_TOKENS, max_concurrency=3)
    assert rep["completed"] == 12 and fake.max_in_flight == 3


# ---- long prompt ----------------------------------------------------------------------------------------------
def test_long_prompt_window_separates_the_stalled_itl():
    fake = FakeOpenAI(n_tokens=25, stall=0.3, long_len=100)
    rep = bench(fake, num_prompts=4, input_len=8, output_len=25, long_prompt_len=200, long_prompt_at=0.15,
                long_prompt_output_len=3)
    lp = rep["long_prompt"]
    assert lp["ok"] and lp["input_len"] == 200 and lp["ttft_ms"] >= 300 - 2
    assert rep["num_requests"] == 4  # the probe is reported on its own, not among the load
    during, outside = lp["itl_during_prefill_ms"], lp["itl_outside_ms"]
    assert during["count"] >= 4 and outside["count"] >= 4 * 10
    assert during["max"] >= 250  # each stream sat out (most of) the 0.3 s stall in one gap
    assert outside["p50"] <= 3 * ITL * 1e3 + 60
    assert lp["itl_p99_during_over_p50_outside"] > 2.5
    assert "ITL during its prefill" in S.format_table(rep)


# ---- CLI, end to end against this project's server ----------------------------------------------------------
def test_cli_against_the_server_counts_its_400(tmp_path, capsys):
    pytest.importorskip("uvicorn")
    from tests.server.conftest import InProcessServer
    from tests.server.fake_engine import FakeEngine

    srv = InProcessServer(FakeEngine("fake-model", max_model_len=256, step_delay=0.002))
    try:
        data = write_dataset(tmp_path, [{"prompt": [72, 105, 33]}, {"prompt": "Hello there"},
                                        {"prompt": [999999]}, {"prompt": [1, 2, 3, 4]}])  # 999999: not a token id
        out = tmp_path / "serve.json"
        rc = S.main(["--base-url", srv.base_url, "--num-prompts", "4", "--dataset", data, "--output-len", "6",
                     "--max-concurrency", "2", "--out", str(out)])
        assert rc == 0
        rep = json.loads(out.read_text())
        assert rep["model"] == "fake-model" and rep["completed"] == 3
        assert rep["failures"] == {"http_400": 1}
        assert all(r["output_tokens_source"] == "usage" for r in rep["requests"] if r["ok"])
        assert rep["total_output_tokens"] > 0 and rep["ttft_ms"]["count"] == 3
        printed = capsys.readouterr().out
        assert "bench serve" in printed and "failed: http_400" in printed
        rc = S.main(["--base-url", srv.base_url, "--endpoint", "chat", "--num-prompts", "2", "--input-len", "5",
                     "--output-len", "4"])
        assert rc == 0 and "2 / 0" in capsys.readouterr().out
    finally:
        srv.stop()


def test_cli_reports_a_bad_flag_as_an_error(capsys):
    assert S.main(["--base-url", "http://127.0.0.1:9", "--token-id-range", "abc"]) == 2
    assert "--token-id-range" in capsys.readouterr().err
