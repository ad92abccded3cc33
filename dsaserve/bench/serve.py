"""``dsaserve bench serve``: a load generator against any running OpenAI-compatible server (ours or another).

    dsaserve bench serve --base-url http://127.0.0.1:8000 --num-prompts 256 --max-concurrency 64 \\
        --input-len 1024 --output-len 256 --ignore-eos --out serve.json
    dsaserve bench serve --base-url ... --request-rate 4 --long-prompt-len 65536 --long-prompt-at 10

Every request streams (SSE over httpx, ``stream_options.include_usage``). Per request it records the time
to first token (TTFT), the gaps between streamed chunks that carry tokens (ITL), the end-to-end latency
and the output tokens (the server-reported ``usage.completion_tokens`` when present, else the number of
token-carrying chunks: ``output_tokens_source`` in the JSON says which). It reports request and output
token throughput, p50/p90/p99 of each latency, and every failure with its reason (HTTP error, error event
in the stream, connection failure, timeout, truncated stream, unparsable chunk); a failure never stops
the run.

Prompts: ``--dataset FILE.jsonl`` (one object per line: ``{"prompt": "text" | [token ids]}`` or
``{"messages": [...]}``, optional ``"output_len"``), or random prompts of ``--input-len`` tokens. Random
prompts are token-id lists for ``/v1/completions`` (exact input length; accepted by this server, vLLM and
SGLang; ids drawn from ``--token-id-range``, which must be valid ids of the model and should avoid its
special tokens) and random English words for ``/v1/chat/completions`` (the chat API takes only text;
their length is approximate, so the server-reported ``prompt_tokens`` is what the report counts).
``--prompt-kind text`` sends words to ``/v1/completions`` too, for servers without token-id prompts.

Arrivals: ``--request-rate R`` sends requests as a Poisson process (exponential gaps, mean 1/R s; ``inf``
sends all at once); ``--max-concurrency N`` caps requests in flight. Both may be combined.

Prefill interference (``--long-prompt-len N --long-prompt-at T``): T seconds into the run one extra
request with an N-token prompt (``--long-prompt-output-len`` tokens out) is sent outside the concurrency
cap. Its prefill window is [sent, first token]. Each ITL gap of the OTHER requests that overlaps that
window counts as "during prefill", the rest as "outside"; the report gives p50/p99/max of both, the
long prompt's TTFT, and the ratio ITL p99 (during) / ITL p50 (outside) (a server that interleaves
chunked prefill with decode keeps it small; one that freezes decode shows the whole prefill as one gap).

How it plugs in: this module is self-contained (stdlib + httpx, no torch, no engine import) and exposes
``add_arguments(parser)`` / ``run(args) -> int`` like the other subcommands; the CLI registers it as
``bench serve``. ``python -m dsaserve.bench.serve`` runs it directly.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from dsaserve.bench.report import percentile

WORDS = ("the of and to in is was for on that with as by at from this be are it an or which have not one had "
         "time day water light river city road house garden morning evening people story music window paper "
         "number engine prompt token model layer chunk simple small large quick bright quiet").split()
LATENCY_METRICS = ("ttft_ms", "itl_ms", "e2e_ms", "tpot_ms")
PERCENTILES = (50, 90, 99)


# ---- configuration ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--base-url", required=True,
                        help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    parser.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                        help="POST /v1/completions or /v1/chat/completions")
    parser.add_argument("--num-prompts", type=int, default=100, help="number of requests (default 100)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="Poisson arrival rate in requests/s (default inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no cap)")
    parser.add_argument("--input-len", type=int, default=1024, help="tokens per random prompt (default 1024)")
    parser.add_argument("--output-len", type=int, default=256, help="max_tokens per request (default 256)")
    parser.add_argument("--dataset", default=None,
                        help="JSONL prompts ({'prompt': text|ids} or {'messages': [...]}, optional 'output_len') "
                             "instead of random ones; cycled if shorter than --num-prompts")
    parser.add_argument("--prompt-kind", choices=("auto", "tokens", "text"), default="auto",
                        help="random prompts as token ids or words (auto: ids for completions, words for chat)")
    parser.add_argument("--token-id-range", default="10,400",
                        help="LO,HI: random prompt ids are drawn from [LO, HI) (default 10,400: valid and "
                             "non-special for DeepSeek, GLM and the tiny test models)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent (default 0)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send ignore_eos=true (an extension of vLLM, SGLang and this server) so every "
                             "request produces --output-len tokens")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="per-request limit: connect, and the wait for each streamed chunk (default 600)")
    parser.add_argument("--long-prompt-len", type=int, default=None,
                        help="also send one prompt of this many tokens during the run (prefill interference)")
    parser.add_argument("--long-prompt-at", type=float, default=None,
                        help="seconds after the start at which the long prompt is sent")
    parser.add_argument("--long-prompt-output-len", type=int, default=8,
                        help="max_tokens of the long prompt (default 8)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


@dataclass
class BenchConfig:
    """Everything one run needs; built from the CLI args by :func:`config_from_args`."""

    base_url: str
    model: str | None = None
    endpoint: str = "completions"
    num_prompts: int = 100
    request_rate: float = math.inf
    max_concurrency: int | None = None
    input_len: int = 1024
    output_len: int = 256
    dataset: str | None = None
    prompt_kind: str = "auto"
    token_id_range: tuple[int, int] = (10, 400)
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = False
    timeout_s: float = 600.0
    long_prompt_len: int | None = None
    long_prompt_at: float | None = None
    long_prompt_output_len: int = 8

    def validate(self) -> None:
        if self.num_prompts < 1:
            raise ValueError("--num-prompts must be >= 1")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be > 0 (use inf to send all at once)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("--input-len and --output-len must be >= 1")
        lo, hi = self.token_id_range
        if not 0 <= lo < hi:
            raise ValueError(f"--token-id-range {lo},{hi}: need 0 <= LO < HI")
        if (self.long_prompt_len is None) != (self.long_prompt_at is None):
            raise ValueError("--long-prompt-len and --long-prompt-at go together")
        if self.long_prompt_len is not None and (self.long_prompt_len < 1 or self.long_prompt_at < 0):
            raise ValueError("--long-prompt-len must be >= 1 and --long-prompt-at >= 0")
        if not self.timeout_s > 0:
            raise ValueError("--timeout-s must be > 0")

    @property
    def api_root(self) -> str:
        root = self.base_url.rstrip("/")
        return root if root.endswith("/v1") else root + "/v1"

    @property
    def token_prompts(self) -> bool:
        if self.prompt_kind == "auto":
            return self.endpoint == "completions"
        if self.prompt_kind == "tokens" and self.endpoint == "chat":
            raise ValueError("--prompt-kind tokens needs --endpoint completions (the chat API takes only text)")
        return self.prompt_kind == "tokens"


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    try:
        lo, hi = (int(x) for x in str(args.token_id_range).split(","))
    except ValueError:
        raise ValueError(f"--token-id-range must be LO,HI (two integers), got {args.token_id_range!r}") from None
    cfg = BenchConfig(
        base_url=args.base_url, model=args.model, endpoint=args.endpoint, num_prompts=args.num_prompts,
        request_rate=args.request_rate, max_concurrency=args.max_concurrency, input_len=args.input_len,
        output_len=args.output_len, dataset=args.dataset, prompt_kind=args.prompt_kind, token_id_range=(lo, hi),
        seed=args.seed, temperature=args.temperature, ignore_eos=args.ignore_eos, timeout_s=args.timeout_s,
        long_prompt_len=args.long_prompt_len, long_prompt_at=args.long_prompt_at,
        long_prompt_output_len=args.long_prompt_output_len)
    cfg.validate()
    return cfg


# ---- prompts -----------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    """One request's input: ``prompt`` (text or token ids) for completions, ``messages`` for chat."""

    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    output_len: int = 256
    input_len: int | None = None  # known exactly for token-id prompts, else None (the server reports it)


def random_prompt(rng: random.Random, cfg: BenchConfig, length: int, output_len: int) -> Prompt:
    if cfg.token_prompts:
        lo, hi = cfg.token_id_range
        return Prompt(prompt=[rng.randrange(lo, hi) for _ in range(length)], output_len=output_len, input_len=length)
    text = " ".join(rng.choice(WORDS) for _ in range(length))
    if cfg.endpoint == "chat":
        return Prompt(messages=[{"role": "user", "content": text}], output_len=output_len)
    return Prompt(prompt=text, output_len=output_len)


def load_dataset(path: str, cfg: BenchConfig) -> list[Prompt]:
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object")
            out_len = int(row.get("output_len", row.get("max_tokens", cfg.output_len)))
            if "messages" in row:
                if cfg.endpoint != "chat":
                    raise ValueError(f"{path}:{n}: 'messages' needs --endpoint chat")
                prompts.append(Prompt(messages=row["messages"], output_len=out_len))
            elif "prompt" in row:
                p = row["prompt"]
                if cfg.endpoint == "chat":
                    if not isinstance(p, str):
                        raise ValueError(f"{path}:{n}: the chat endpoint takes text prompts only")
                    prompts.append(Prompt(messages=[{"role": "user", "content": p}], output_len=out_len))
                else:
                    prompts.append(Prompt(prompt=p, output_len=out_len,
                                          input_len=len(p) if isinstance(p, list) else None))
            else:
                raise ValueError(f"{path}:{n}: needs a 'prompt' or a 'messages' field")
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def make_prompts(cfg: BenchConfig) -> list[Prompt]:
    if cfg.dataset:
        rows = load_dataset(cfg.dataset, cfg)
        return [rows[i % len(rows)] for i in range(cfg.num_prompts)]
    rng = random.Random(cfg.seed)
    return [random_prompt(rng, cfg, cfg.input_len, cfg.output_len) for _ in range(cfg.num_prompts)]


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send offsets (s) of ``n`` requests: a Poisson process of ``rate``/s starting at 0; all 0 for inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed + 1)  # separate stream from the prompts
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ---- one request -------------------------------------------------------------------------------------------
@dataclass
class RequestResult:
    """What one streamed request did; times are seconds since the bench started (monotonic clock)."""

    index: int
    start: float
    ok: bool = False
    error: str | None = None           # failure kind: http_4xx/5xx, error_event, connection, timeout, ...
    error_detail: str | None = None
    first_token: float | None = None
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each token-carrying chunk
    output_tokens: int = 0
    output_tokens_source: str = "chunks"  # "usage" when the server reported completion_tokens
    prompt_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start

    def itl_gaps(self) -> list[tuple[float, float]]:
        """(previous chunk time, chunk time) of every inter-token gap."""
        return list(zip(self.chunk_times, self.chunk_times[1:]))

    def summary(self) -> dict:
        keep = ("index", "ok", "error", "error_detail", "output_tokens", "output_tokens_source", "prompt_tokens",
                "finish_reason")
        d = {k: v for k, v in asdict(self).items() if k in keep}
        d.update(start_s=round(self.start, 6), ttft_ms=_ms(self.ttft), e2e_ms=_ms(self.e2e),
                 chunks=len(self.chunk_times))
        return d


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def request_body(cfg: BenchConfig, model: str, p: Prompt) -> dict:
    body: dict[str, Any] = {"model": model, "max_tokens": p.output_len, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": cfg.temperature}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = p.messages
    else:
        body["prompt"] = p.prompt
    return body


def _chunk_has_tokens(obj: dict, chat: bool) -> bool:
    for choice in obj.get("choices") or []:
        if chat:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                return True
        elif choice.get("text"):
            return True
    return False


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message") if isinstance(err, dict) else None
        return str(msg or body)[:300]
    except (ValueError, AttributeError):
        return raw[:300].decode("utf-8", "replace")


async def send_request(client: httpx.AsyncClient, cfg: BenchConfig, model: str, p: Prompt, index: int,
                       t0: float) -> RequestResult:
    """Stream one request; every failure is caught and recorded, never raised."""
    chat = cfg.endpoint == "chat"
    url = cfg.api_root + ("/chat/completions" if chat else "/completions")
    res = RequestResult(index=index, start=time.monotonic() - t0, prompt_tokens=p.input_len)
    done = False
    try:
        async with client.stream("POST", url, json=request_body(cfg, model, p)) as resp:
            if resp.status_code != 200:
                res.error = f"http_{resp.status_code}"
                res.error_detail = _error_message(await resp.aread())
                return res
            async for line in resp.aiter_lines():
                now = time.monotonic() - t0
                if not line.startswith("data:"):
                    continue  # blank separators, comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    res.error, res.error_detail = "invalid_chunk", data[:300]
                    return res
                if not isinstance(obj, dict):
                    res.error, res.error_detail = "invalid_chunk", data[:300]
                    return res
                if obj.get("error") is not None:
                    res.error, res.error_detail = "error_event", _error_message(data.encode())
                    return res
                if _chunk_has_tokens(obj, chat):
                    if res.first_token is None:
                        res.first_token = now
                    res.chunk_times.append(now)
                for choice in obj.get("choices") or []:
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    if isinstance(usage.get("completion_tokens"), int):
                        res.output_tokens = usage["completion_tokens"]
                        res.output_tokens_source = "usage"
                    if isinstance(usage.get("prompt_tokens"), int):
                        res.prompt_tokens = usage["prompt_tokens"]
        res.end = time.monotonic() - t0
        if not done:
            res.error, res.error_detail = "truncated_stream", "the stream ended without data: [DONE]"
            return res
        if res.output_tokens_source == "chunks":
            res.output_tokens = len(res.chunk_times)
        res.ok = True
    except httpx.TimeoutException as e:
        res.error, res.error_detail = "timeout", f"{type(e).__name__}: {e}"
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
            httpx.NetworkError) as e:
        res.error, res.error_detail = "connection", f"{type(e).__name__}: {e}"
    except httpx.HTTPError as e:
        res.error, res.error_detail = "http_client", f"{type(e).__name__}: {e}"
    return res


# ---- statistics --------------------------------------------------------------------------------------------
def latency_stats(seconds: list[float]) -> dict:
    ms = [x * 1000.0 for x in seconds]
    out: dict[str, Any] = {"count": len(ms), "mean": round(sum(ms) / len(ms), 3) if ms else None}
    for q in PERCENTILES:
        v = percentile(ms, q)
        out[f"p{q}"] = None if v is None else round(v, 3)
    out["max"] = round(max(ms), 3) if ms else None
    return out


def prefill_window_report(results: list[RequestResult], long: RequestResult) -> dict:
    """ITL of the other requests during the long prompt's prefill [sent, first token] vs outside it."""
    w0 = long.start
    w1 = long.first_token if long.first_token is not None else long.end
    report: dict[str, Any] = {"input_len": None, "ok": long.ok, "error": long.error, "error_detail": long.error_detail,
                              "sent_s": round(w0, 6), "ttft_ms": _ms(long.ttft), "window_s": None}
    if w1 is None:
        return report
    inside, outside = [], []
    for r in results:
        for a, b in r.itl_gaps():
            (inside if (b > w0 and a < w1) else outside).append(b - a)
    report["window_s"] = [round(w0, 6), round(w1, 6)]
    report["itl_during_prefill_ms"] = latency_stats(inside)
    report["itl_outside_ms"] = latency_stats(outside)
    p99_in, p50_out = report["itl_during_prefill_ms"]["p99"], report["itl_outside_ms"]["p50"]
    report["itl_p99_during_over_p50_outside"] = (round(p99_in / p50_out, 3)
                                                  if p99_in is not None and p50_out else None)
    return report


def summarize(cfg: BenchConfig, model: str, results: list[RequestResult], duration: float,
              long: RequestResult | None) -> dict:
    ok = [r for r in results if r.ok]
    failures: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in results:
        if not r.ok:
            failures[r.error] = failures.get(r.error, 0) + 1
            examples.setdefault(r.error, r.error_detail or "")
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.ttft is not None and r.e2e is not None and r.output_tokens > 1]
    sources = sorted({r.output_tokens_source for r in ok})
    config = asdict(cfg)
    config["request_rate"] = None if math.isinf(cfg.request_rate) else cfg.request_rate  # JSON has no inf
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "config": config,
        "model": model,
        "endpoint": "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions",
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "failures": failures,
        "failure_examples": examples,
        "duration_s": round(duration, 6),
        "request_throughput": round(len(ok) / duration, 4) if duration > 0 else None,
        "output_throughput": round(out_tokens / duration, 3) if duration > 0 else None,
        "total_output_tokens": out_tokens,
        "total_input_tokens": sum(in_tokens) if len(in_tokens) == len(ok) else None,
        "output_tokens_source": sources[0] if len(sources) == 1 else "mixed" if sources else None,
        "ttft_ms": latency_stats([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": latency_stats([b - a for r in ok for a, b in r.itl_gaps()]),
        "e2e_ms": latency_stats([r.e2e for r in ok if r.e2e is not None]),
        "tpot_ms": latency_stats(tpot),
        "long_prompt": None,
        "requests": [r.summary() for r in results],
    }
    if long is not None:
        lp = prefill_window_report(results, long)
        lp["input_len"] = cfg.long_prompt_len
        report["long_prompt"] = lp
    return report


def format_table(report: dict) -> str:
    rows = [("requests completed / failed", f"{report['completed']} / {report['failed']}"),
            ("duration (s)", f"{report['duration_s']:.2f}"),
            ("request throughput (req/s)", _fmt(report["request_throughput"])),
            ("output throughput (tok/s)", _fmt(report["output_throughput"])),
            ("output tokens (" + str(report["output_tokens_source"]) + ")", str(report["total_output_tokens"]))]
    if report["total_input_tokens"] is not None:
        rows.append(("input tokens", str(report["total_input_tokens"])))
    for reason, n in sorted(report["failures"].items()):
        rows.append((f"failed: {reason}", f"{n}  ({report['failure_examples'][reason][:60]})"))
    width = max(30, *(len(r[0]) for r in rows)) + 2
    lines = ["=" * 20 + " bench serve " + "=" * 20, f"model {report['model']}  {report['endpoint']}"]
    lines += [f"{k:<{width}}{v}" for k, v in rows]
    cols = ("mean", "p50", "p90", "p99", "max")
    lines.append(f"{'latency (ms)':<{width}}" + "".join(f"{c:>10}" for c in cols))
    for name in LATENCY_METRICS:
        lines.append(f"{name[:-3].upper():<{width}}" + "".join(f"{_fmt(report[name][c]):>10}" for c in cols))
    lp = report.get("long_prompt")
    if lp:
        lines.append(f"long prompt: {lp['input_len']} tokens sent at {lp['sent_s']:.2f} s, "
                     f"TTFT {_fmt(lp['ttft_ms'])} ms"
                     + ("" if lp["ok"] else f", FAILED ({lp['error']}: {lp['error_detail']})"))
        if lp.get("window_s"):
            for label, key in (("ITL during its prefill", "itl_during_prefill_ms"), ("ITL outside", "itl_outside_ms")):
                s = lp[key]
                lines.append(f"{label:<{width}}" + "".join(f"{_fmt(s[c]):>10}" for c in cols) + f"   (n={s['count']})")
            lines.append(f"{'ITL p99 during / p50 outside':<{width}}{_fmt(lp['itl_p99_during_over_p50_outside'])}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


# ---- the run -----------------------------------------------------------------------------------------------
async def resolve_model(client: httpx.AsyncClient, cfg: BenchConfig) -> str:
    if cfg.model:
        return cfg.model
    try:
        resp = await client.get(cfg.api_root + "/models")
    except httpx.HTTPError as e:
        raise RuntimeError(f"cannot reach {cfg.api_root}/models ({type(e).__name__}: {e}); is the server up? "
                           f"or pass --model") from None
    if resp.status_code != 200:
        raise RuntimeError(f"GET {cfg.api_root}/models returned HTTP {resp.status_code}: "
                           f"{_error_message(resp.content)}; pass --model")
    try:
        return resp.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RuntimeError(f"GET {cfg.api_root}/models listed no model; pass --model") from None


async def run_benchmark(cfg: BenchConfig, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Run the load and return the report (the JSON). ``transport`` lets tests serve requests in-process."""
    cfg.validate()
    prompts = make_prompts(cfg)
    offsets = arrival_times(cfg.num_prompts, cfg.request_rate, cfg.seed)
    long_prompt = None
    if cfg.long_prompt_len is not None:
        long_prompt = random_prompt(random.Random(cfg.seed + 2), cfg, cfg.long_prompt_len, cfg.long_prompt_output_len)
    limits = httpx.Limits(max_connections=(cfg.max_concurrency or cfg.num_prompts) + 1, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 30.0))
    async with httpx.AsyncClient(transport=transport, limits=limits, timeout=timeout) as client:
        model = await resolve_model(client, cfg)
        gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        t0 = time.monotonic()

        async def one(i: int) -> RequestResult:
            delay = offsets[i] - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is None:
                return await send_request(client, cfg, model, prompts[i], i, t0)
            async with gate:
                return await send_request(client, cfg, model, prompts[i], i, t0)

        async def probe() -> RequestResult:
            await asyncio.sleep(max(0.0, cfg.long_prompt_at - (time.monotonic() - t0)))
            return await send_request(client, cfg, model, long_prompt, -1, t0)

        probe_task = asyncio.ensure_future(probe()) if long_prompt is not None else None
        results = list(await asyncio.gather(*(one(i) for i in range(cfg.num_prompts))))
        duration = time.monotonic() - t0
        long_result = await probe_task if probe_task is not None else None
    return summarize(cfg, model, results, duration, long_result)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        report = asyncio.run(run_benchmark(cfg))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    print(format_table(report))
    return 0 if report["completed"] > 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsaserve bench serve")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
