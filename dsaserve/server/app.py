"""The FastAPI application: OpenAI-compatible endpoints over an ``EngineLoop``.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON or SSE streaming),
GET /health (200 while the engine is healthy, 503 after a fault), GET /metrics (Prometheus text).

Every client error is HTTP 400 with ``{"error": {"message", "type": "invalid_request_error", "param",
"code"}}``; engine faults are HTTP 500 (or an ``error`` event in a stream) with type ``server_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsaserve.engine.client import EngineClient
from dsaserve.engine.types import SamplingParams

from .engine_loop import Delta, EngineLoop, RequestStream
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    error_body,
    request_error_from_validation,
)

log = logging.getLogger("dsaserve.server")


class _ClientGone(Exception):
    pass


class OpenAIServer:
    """Holds what the handlers need: the engine loop, model facts, metrics, and the fault hook.

    ``request_exit(code)`` is called (on the event loop, ``fault_exit_delay`` seconds after a fatal
    engine error, so that /health can report 503 meanwhile) to make the HTTP server stop.
    """

    def __init__(self, engine: EngineClient, *, served_model_name: str | None = None, chat_template: str | None = None,
                 step_timeout: float = 600.0, fault_exit_delay: float = 1.0,
                 request_exit: Callable[[int], None] | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = served_model_name or engine.model_name
        self.max_model_len = int(engine.max_model_len)
        self.chat_template = chat_template
        self.metrics = ServerMetrics(self.model_name)
        self.fault_exit_delay = fault_exit_delay
        self.request_exit = request_exit
        self.exit_code = 0
        self.created = int(time.time())
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine_loop = EngineLoop(engine, self.metrics, step_timeout=step_timeout, on_fatal=self._on_fatal)

    # --- lifecycle -------------------------------------------------------------------------------------
    def _on_fatal(self, reason: str) -> None:
        """Called once, from any thread, when the engine is dead."""
        self.exit_code = 1
        loop = self._loop
        if loop is None or self.request_exit is None:
            return
        try:
            loop.call_soon_threadsafe(loop.call_later, self.fault_exit_delay, self.request_exit, 1)
        except RuntimeError:
            pass  # loop already closed

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self._loop = asyncio.get_running_loop()
        self.engine_loop.start()
        watchdog = asyncio.create_task(self.engine_loop.watchdog())
        try:
            yield
        finally:
            watchdog.cancel()
            # Joining the engine thread and worker processes blocks: do it off the event loop.
            await asyncio.to_thread(self.engine_loop.stop)

    # --- request preparation ---------------------------------------------------------------------------
    @staticmethod
    def parse(model_cls: type[BaseModel], body: bytes):
        if not body:
            raise RequestError("The request body is empty; send a JSON object", None)
        try:
            req = model_cls.model_validate_json(body)
        except ValidationError as e:
            raise request_error_from_validation(e, model_cls) from None
        req.check()
        return req

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise RequestError(f"The model '{name}' does not exist; this server serves '{self.model_name}' "
                               "(see GET /v1/models)", "model", code="model_not_found")

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("This model has no tokenizer; send the prompt as a list of token ids", "prompt")
            return self.tokenizer.encode(prompt, add_bos=True)
        vocab = getattr(self.tokenizer, "vocab_size", None) if self.tokenizer is not None else None
        if vocab is not None:
            bad = [t for t in prompt if t >= vocab]
            if bad:
                raise RequestError(f"prompt token id {bad[0]} is out of range: the vocabulary has {vocab} tokens",
                                   "prompt")
        return list(prompt)

    def render_chat(self, req: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("This model has no tokenizer, so chat is not available; use /v1/completions "
                               "with token ids", "messages")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise RequestError("This model has no chat template; start the server with --chat-template FILE "
                               "or use /v1/completions", "messages")
        try:
            if self.chat_template:
                import jinja2  # a template given on the command line overrides the checkpoint's

                bos = getattr(self.tokenizer, "bos_token", None) or ""
                text = jinja2.Template(self.chat_template).render(messages=messages, add_generation_prompt=True,
                                                                  bos_token=bos)
            else:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the client's problem
            raise RequestError(f"The chat template could not render these messages: {e}", "messages") from None
        bos = getattr(self.tokenizer, "bos_token", None)
        # Templates usually emit the BOS text themselves; do not add a second one.
        return self.tokenizer.encode(text, add_bos=not (bos and text.startswith(bos)))

    def sampling_params(self, req, prompt_len: int, max_tokens: int | None, prompt_field: str,
                        logprobs: int | None) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise RequestError(f"This model's maximum context length is {self.max_model_len} tokens, but the "
                               f"prompt has {prompt_len} tokens; shorten the prompt", prompt_field,
                               code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise RequestError(f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                               f"has {prompt_len} tokens, so at most {room} can be generated, but max_tokens is "
                               f"{max_tokens}; lower max_tokens or shorten the prompt", "max_tokens",
                               code="context_length_exceeded")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p),
                top_k=-1 if req.top_k in (None, 0) else req.top_k,
                seed=req.seed,
                logprobs=logprobs,
                stop=list(req.stop or []),
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=req.ignore_eos,
            )
        except ValueError as e:
            field = str(e).split(" ", 1)[0]
            raise RequestError(str(e), field if field in type(req).model_fields else None) from None

    # --- running requests ------------------------------------------------------------------------------
    async def start(self, rid: str, prompt_ids: list[int], params: SamplingParams, prompt_field: str) -> RequestStream:
        """Submit and wait for the engine to accept (or reject) the request."""
        stream = self.engine_loop.submit(rid, prompt_ids, params)
        try:
            first: Delta = await stream.queue.get()
        except BaseException:
            self.engine_loop.abort(rid)
            raise
        if first.kind == "rejected":
            raise RequestError(f"The engine rejected the request: {first.message}", prompt_field)
        if first.kind == "error":
            raise RequestError(f"The engine is not available: {first.message}", None, status=503,
                               type="server_error", code="engine_dead")
        return stream

    async def collect(self, stream: RequestStream, request: Request) -> tuple[str, list[Delta], Delta]:
        """Wait for the whole output (non-streaming), aborting if the client disconnects."""
        async def gather():
            text, deltas = [], []
            while True:
                d: Delta = await stream.queue.get()
                if d.kind == "error":
                    return "".join(text), deltas, d
                text.append(d.text)
                deltas.append(d)
                if d.finished:
                    return "".join(text), deltas, d

        task = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        completed = False
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                result = task.result()
                completed = True
                return result
            raise _ClientGone()
        finally:
            for t in (task, gone):
                t.cancel()
            if not completed:  # client gone or handler cancelled: stop generating
                self.engine_loop.abort(stream.request_id)

    def token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _engine_error_response(message: str) -> JSONResponse:
    return JSONResponse(error_body(f"The request failed: {message}", "server_error", None, "engine_error"),
                        status_code=500)


def build_app(server: OpenAIServer) -> FastAPI:
    """Create the FastAPI app for ``server`` (the engine thread starts with the app's lifespan)."""
    app = FastAPI(title="dsaserve", lifespan=server.lifespan)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"Internal server error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        loc = [p for p in (errs[0]["loc"] if errs else ()) if p != "body"]
        param = ".".join(str(p) for p in loc) or None
        msg = errs[0]["msg"] if errs else "invalid request"
        return JSONResponse(error_body(f"{param}: {msg}" if param else msg, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}", kind),
                            status_code=exc.status_code)

    @app.get("/health")
    async def health():
        if server.engine_loop.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "reason": server.engine_loop.dead_reason}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "dsaserve", "max_model_len": server.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = server.parse(CompletionRequest, await request.body())
        server.check_model(req.model)
        prompt_ids = server.tokenize_prompt(req.prompt)
        params = server.sampling_params(req, len(prompt_ids), req.max_tokens, "prompt", req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        return await _respond(server, request, rid, prompt_ids, params, req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = server.parse(ChatCompletionRequest, await request.body())
        server.check_model(req.model)
        prompt_ids = server.render_chat(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = server.sampling_params(req, len(prompt_ids), max_tokens, "messages", logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await _respond(server, request, rid, prompt_ids, params, req, chat=True)

    return app


def _completion_logprobs(server: OpenAIServer, deltas: list[Delta], offset0: int = 0) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = offset0
    for d in deltas:
        for tid, lp in zip(d.token_ids, d.logprobs or []):
            s = server.token_str(tid)
            tokens.append(s)
            token_lps.append(lp.get(tid))
            tops.append({server.token_str(t): v for t, v in lp.items()})
            offsets.append(offset)
            offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(server: OpenAIServer, deltas: list[Delta], top_n: int) -> dict:
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


async def _respond(server: OpenAIServer, request: Request, rid: str, prompt_ids: list[int],
                   params: SamplingParams, req, chat: bool):
    prompt_field = "messages" if chat else "prompt"
    stream = await server.start(rid, prompt_ids, params, prompt_field)
    created = int(time.time())
    want_logprobs = params.logprobs is not None
    top_n = params.logprobs or 0

    if not req.stream:
        try:
            text, deltas, last = await server.collect(stream, request)
        except _ClientGone:
            return Response(status_code=499)  # nobody is listening; the request was aborted
        if last.kind == "error":
            return _engine_error_response(last.message or "unknown error")
        usage = _usage(len(prompt_ids), last.num_generated_tokens)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": _chat_logprobs(server, deltas, top_n) if want_logprobs else None,
                      "finish_reason": last.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text,
                      "logprobs": _completion_logprobs(server, deltas) if want_logprobs else None,
                      "finish_reason": last.finish_reason}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": server.model_name,
                             "choices": [choice], "usage": usage})

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, usage: dict | None = None) -> str:
        c = {"id": rid, "object": obj, "created": created, "model": server.model_name, "choices": choices}
        if include_usage:
            c["usage"] = usage
        return _sse(c)

    async def events() -> AsyncIterator[str]:
        finished = False
        text_offset = 0
        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            while True:
                d: Delta = await stream.queue.get()
                if d.kind == "error":
                    finished = True
                    yield _sse(error_body(f"The request failed: {d.message}", "server_error", None, "engine_error"))
                    return
                reason = d.finish_reason if d.finished else None
                if d.text or reason is not None or (want_logprobs and d.token_ids):
                    if chat:
                        lp = _chat_logprobs(server, [d], top_n) if want_logprobs else None
                        delta = {"content": d.text} if d.text else {}
                        yield chunk([{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}])
                    else:
                        lp = _completion_logprobs(server, [d], text_offset) if want_logprobs else None
                        text_offset += len(d.text)
                        yield chunk([{"index": 0, "text": d.text, "logprobs": lp, "finish_reason": reason}])
                if d.finished:
                    finished = True
                    if include_usage:
                        yield chunk([], _usage(len(prompt_ids), d.num_generated_tokens))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:  # client went away (generator cancelled/closed): stop generating
                server.engine_loop.abort(rid)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
