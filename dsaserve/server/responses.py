"""OpenAI response bodies and SSE streams for /v1/completions and /v1/chat/completions.

A request is one ``Job``: one or more prompts (a completions batch), each an engine request with ``n``
sequences. Choice ``index`` = prompt_index * n + sequence index, as OpenAI numbers a batch's choices.
Usage counts each prompt once and every sequence's tokens.

Completions: ``echo`` puts the prompt text before the completion and, with ``logprobs``, the prompt tokens'
logprobs before the generated ones (the first token's are null: nothing predicts it).
Chat: each sequence's text goes through its own output parser when the server has one (reasoning ->
``reasoning_content``, tool calls -> ``tool_calls`` and finish reason ``tool_calls``), streaming included.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dsaserve.engine.types import SamplingParams

from .engine_loop import Delta, RequestStream
from .parsers import ChatOutputParser, ParsedDelta
from .protocol import error_body

OpenAIServer = Any   # app.OpenAIServer (which imports this module): model_name, chat, engine_loop, token_str


@dataclass
class Job:
    """A validated request, ready to run: what the engine gets and what shapes the response."""

    chat: bool
    req: Any                              # the parsed CompletionRequest / ChatCompletionRequest
    prompts: list[list[int]]              # token ids per prompt
    params: list[SamplingParams]          # per prompt
    prompt_texts: list[str] = field(default_factory=list)   # completions: echoed text; chat: the rendered prompt
    tools: list[dict] | None = None       # chat: the tools the model was told about
    top_n: int = 0                        # top logprobs per generated token (when logprobs are asked for)
    want_logprobs: bool = False
    echo: bool = False

    @property
    def n(self) -> int:
        return self.params[0].n


class ClientGone(Exception):
    """The HTTP client disconnected before its non-streamed response was ready (its sequences are aborted)."""


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_event(d: Delta) -> dict:
    code = "shutting_down" if d.code == "shutdown" else "engine_error"
    return error_body(f"The request failed: {d.message or 'unknown error'}", "server_error", None, code)


def engine_error_response(d: Delta) -> JSONResponse:
    # a request ended by a shutdown may be retried elsewhere (503); an engine fault is a 500
    return JSONResponse(error_event(d), status_code=503 if d.code == "shutdown" else 500)


# ---- logprobs ----------------------------------------------------------------------------------------------
def completion_logprobs(server: OpenAIServer, deltas: list[Delta], offset0: int = 0,
                        prompt: tuple[list[int], list] | None = None) -> dict:
    """The completions ``logprobs`` object; ``prompt`` = (prompt ids, their logprobs) when echoing."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = offset0
    pairs: list[tuple[int, dict | None]] = []
    if prompt is not None:
        pairs += list(zip(*prompt))
    pairs += [(tid, lp) for d in deltas for tid, lp in zip(d.token_ids, d.logprobs or [])]
    for tid, lp in pairs:
        s = server.token_str(tid)
        tokens.append(s)
        token_lps.append(None if lp is None else lp.get(tid))
        tops.append(None if lp is None else {server.token_str(t): v for t, v in lp.items()})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(server: OpenAIServer, deltas: list[Delta], top_n: int) -> dict:
    content = []
    for d in deltas:
        for tid, lp in zip(d.token_ids, d.logprobs or []):
            s = server.token_str(tid)
            ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]
            content.append({
                "token": s, "logprob": lp.get(tid), "bytes": list(s.encode("utf-8")),
                "top_logprobs": [{"token": server.token_str(t), "logprob": v,
                                  "bytes": list(server.token_str(t).encode("utf-8"))} for t, v in ranked],
            })
    return {"content": content}


# ---- collecting ------------------------------------------------------------------------------------------
async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta]]:
    """(prompt index, delta) of every stream as they come, until each stream's request finished or failed."""
    if len(streams) == 1:
        while True:
            d: Delta = await streams[0].queue.get()
            yield 0, d
            if d.kind == "error" or d.request_finished:
                return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        while True:
            d = await stream.queue.get()
            await merged.put((i, d))
            if d.kind == "error" or d.request_finished:
                return

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, d = await merged.get()
            yield i, d
            if d.kind == "error" or d.request_finished:
                left -= 1
    finally:
        for t in tasks:
            t.cancel()


async def collect(server: OpenAIServer, streams: list[RequestStream], request: Request) \
        -> tuple[list[dict[int, list[Delta]]], Delta | None]:
    """Every delta of every sequence (non-streaming), per prompt by sequence index, and the first error;
    aborts everything if the client disconnects."""
    async def gather():
        per_prompt: list[dict[int, list[Delta]]] = [{} for _ in streams]
        error = None
        async for i, d in _merged(streams):
            if d.kind == "error":
                error = error or d
            else:
                per_prompt[i].setdefault(d.index, []).append(d)
        return per_prompt, error

    task = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    completed = False
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            result = task.result()
            completed = True
            return result
        raise ClientGone()
    finally:
        for t in (task, gone):
            t.cancel()
        if not completed:  # client gone or handler cancelled: stop generating
            for s in streams:
                server.engine_loop.abort(s.request_id)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _prompt_logprobs_of(by_index: dict[int, list[Delta]]) -> list | None:
    return next((d.prompt_logprobs for ds in by_index.values() for d in ds if d.prompt_logprobs is not None), None)


# ---- responses -----------------------------------------------------------------------------------------
async def respond(server: OpenAIServer, request: Request, rid: str, job: Job, streams: list[RequestStream]):
    if job.req.stream:
        return _stream(server, rid, job, streams)
    try:
        per_prompt, error = await collect(server, streams, request)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; the request was aborted
    if error is not None:
        return engine_error_response(error)
    choices, generated = [], 0
    for pi, by_index in enumerate(per_prompt):
        prompt_lps = _prompt_logprobs_of(by_index)
        for j in range(job.n):
            deltas = by_index.get(j, [])
            last = deltas[-1]
            generated += last.num_generated_tokens
            text = "".join(d.text for d in deltas)
            index = pi * job.n + j
            if job.chat:
                choices.append(_chat_choice(server, job, index, text, deltas, last.finish_reason))
            else:
                lp = None
                if job.want_logprobs:
                    lp = completion_logprobs(server, deltas, prompt=(job.prompts[pi], prompt_lps)
                                             if job.echo and prompt_lps is not None else None)
                choices.append({"index": index, "text": (job.prompt_texts[pi] if job.echo else "") + text,
                                "logprobs": lp, "finish_reason": last.finish_reason})
    return JSONResponse({"id": rid, "object": "chat.completion" if job.chat else "text_completion",
                         "created": int(time.time()), "model": server.model_name, "choices": choices,
                         "usage": usage(sum(len(p) for p in job.prompts), generated)})


def _chat_choice(server: OpenAIServer, job: Job, index: int, text: str, deltas: list[Delta],
                 reason: str | None) -> dict:
    parser = server.chat.output_parser(job.prompt_texts[0], job.tools)
    if parser is None:
        message = {"role": "assistant", "content": text}
    else:
        parsed = parser.parse(text)
        message = parsed.to_openai_message()
        if reason == "stop" and parsed.finish_reason_override:
            reason = parsed.finish_reason_override
    return {"index": index, "message": message,
            "logprobs": chat_logprobs(server, deltas, job.top_n) if job.want_logprobs else None,
            "finish_reason": reason}


def _stream(server: OpenAIServer, rid: str, job: Job, streams: list[RequestStream]) -> StreamingResponse:
    created = int(time.time())
    include_usage = bool(job.req.stream_options and job.req.stream_options.include_usage)
    obj = "chat.completion.chunk" if job.chat else "text_completion"
    n = job.n

    def chunk(choices: list, usage_: dict | None = None) -> str:
        c = {"id": rid, "object": obj, "created": created, "model": server.model_name, "choices": choices}
        if include_usage:
            c["usage"] = usage_
        return sse(c)

    parsers: dict[int, ChatOutputParser | None] = {}
    called: set[int] = set()              # choices that emitted tool calls
    text_offset: dict[int, int] = {}
    echoed: set[int] = set()
    prompt_lps: dict[int, list] = {}
    generated: dict[int, int] = {}

    def chat_delta(index: int, d: Delta) -> tuple[dict, str | None]:
        reason = d.finish_reason if d.finished else None
        parser = parsers.setdefault(index, server.chat.output_parser(job.prompt_texts[0], job.tools))
        if parser is None:
            return ({"content": d.text} if d.text else {}), reason
        parsed = parser.feed(d.text)
        if d.finished:
            tail = parser.finish()
            parsed = ParsedDelta(parsed.content + tail.content, parsed.reasoning_content + tail.reasoning_content,
                                 parsed.tool_calls + tail.tool_calls)
        if parsed.tool_calls:
            called.add(index)
        if reason == "stop" and index in called:
            reason = "tool_calls"
        return parsed.to_openai_delta(), reason

    async def events() -> AsyncIterator[str]:
        finished = False
        try:
            if job.chat:
                for j in range(n):
                    yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            async for pi, d in _merged(streams):
                if d.kind == "error":
                    finished = True
                    yield sse(error_event(d))
                    return
                index = pi * n + d.index
                generated[index] = d.num_generated_tokens
                if d.prompt_logprobs is not None:
                    prompt_lps[pi] = d.prompt_logprobs
                if job.chat:
                    delta, reason = chat_delta(index, d)
                    if delta or reason is not None or (job.want_logprobs and d.token_ids):
                        lp = chat_logprobs(server, [d], job.top_n) if job.want_logprobs else None
                        yield chunk([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}])
                    continue
                reason = d.finish_reason if d.finished else None
                prefix, prompt = "", None
                if job.echo and index not in echoed:
                    echoed.add(index)
                    prefix = job.prompt_texts[pi]
                    if pi in prompt_lps:
                        prompt = (job.prompts[pi], prompt_lps[pi])
                text = prefix + d.text
                if text or reason is not None or (job.want_logprobs and (d.token_ids or prompt)):
                    lp = None
                    if job.want_logprobs:
                        lp = completion_logprobs(server, [d], text_offset.get(index, 0), prompt=prompt)
                    text_offset[index] = text_offset.get(index, 0) + (len("".join(lp["tokens"])) if lp else len(text))
                    yield chunk([{"index": index, "text": text, "logprobs": lp, "finish_reason": reason}])
            finished = True
            if include_usage:
                yield chunk([], usage(sum(len(p) for p in job.prompts), sum(generated.values())))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # client went away (generator cancelled/closed): stop generating
                for s in streams:
                    server.engine_loop.abort(s.request_id)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
