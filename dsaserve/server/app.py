"""The FastAPI application: OpenAI-compatible endpoints over an ``EngineLoop``.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON or SSE streaming; the
bodies are built in ``responses.py``, chats rendered and parsed in ``chat.py``), POST /tokenize,
POST /detokenize, GET /version, GET /health (200 while the engine is ready and healthy; 503 while it starts, after a fault, or while the
server drains for shutdown), GET /metrics (Prometheus text).

Every client error is HTTP 400 with ``{"error": {"message", "type": "invalid_request_error", "param",
"code"}}`` (401 without the API key, 413 for a body over ``--max-request-bytes``); engine faults are HTTP
500 (or an ``error`` event in a stream) with type ``server_error``; 503 while starting or shutting down.

Nothing slow runs on the event loop: a request body is size-checked while it is read, then parsed,
tokenized and validated in a thread pool (large bodies in their own pool, so small requests never queue
behind them), so one huge prompt cannot stall /health or other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import dsaserve
from dsaserve.engine.client import EngineClient
from dsaserve.engine.structured import GrammarSpec, StructuredOutputError
from dsaserve.engine.types import SamplingParams

from .chat import ChatRenderer
from .engine_loop import Delta, EngineLoop, RequestStream
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    error_body,
    request_error_from_validation,
)
from .responses import Job, respond

log = logging.getLogger("dsaserve.server")

# --max-request-bytes default: room for a whole context plus the JSON around it. 16 bytes per token covers
# text at its most verbose (JSON-escaped non-ASCII: 6-12 bytes per character) and token-id lists (at most 7
# bytes per id); 1 MiB covers long chat histories' JSON. A larger body can only be rejected after a costly
# parse, and parsing is the one step that holds the GIL (about 0.25 s per million ids on a busy CPU).
BYTES_PER_TOKEN = 16
REQUEST_BYTES_HEADROOM = 1 << 20
# Bodies above this size are prepared in their own single-thread pool; smaller ones never wait behind them.
LARGE_BODY_BYTES = 256 << 10
# A body over the limit is still read (and discarded) up to this size, so that the client gets the 413
# instead of a reset connection; beyond it the connection is closed after the 413.
DISCARD_LIMIT_BYTES = 64 << 20


def default_max_request_bytes(max_model_len: int) -> int:
    return REQUEST_BYTES_HEADROOM + BYTES_PER_TOKEN * int(max_model_len)


class OpenAIServer:
    """Holds what the handlers need: the engine loop, model facts, metrics, limits and the exit hook.

    Give it an ``engine``, or an ``engine_factory`` that the engine thread calls (the server then listens
    at once and answers 503 "starting" until the engine is built and warmed up; ``model_name`` is then
    needed up front). ``request_exit(code)`` is called on the event loop to make the HTTP server stop:
    ``fault_exit_delay`` seconds after a fatal engine error (so that /health can report 503 meanwhile),
    or once a shutdown drain (``begin_shutdown``) is over.
    """

    def __init__(self, engine: EngineClient | None = None, *, engine_factory: Callable[[], EngineClient] | None = None,
                 model_name: str | None = None, served_model_name: str | None = None, chat_template: str | None = None,
                 step_timeout: float = 600.0, fault_exit_delay: float = 1.0,
                 request_exit: Callable[[int], None] | None = None, api_key: str | None = None,
                 max_request_bytes: int | None = None, shutdown_timeout: float = 30.0,
                 tool_call_parser: str | None = "auto", reasoning_parser: str | None = "auto") -> None:
        name = served_model_name or model_name or (engine.model_name if engine is not None else None)
        if name is None:
            raise ValueError("OpenAIServer needs model_name (or served_model_name) when given an engine factory")
        self.model_name = name
        self.chat_template = chat_template
        self.metrics = ServerMetrics(self.model_name)
        self.fault_exit_delay = fault_exit_delay
        self.request_exit = request_exit
        self.exit_code = 0
        self.created = int(time.time())
        # the key is kept only as its digest: compared in constant time, never logged
        self._key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self._max_request_bytes_flag = max_request_bytes
        self.max_request_bytes = max_request_bytes or DISCARD_LIMIT_BYTES   # until the engine is ready
        self.shutdown_timeout = shutdown_timeout
        self.draining = False
        # model facts, known once the engine is ready (see _engine_ready)
        self.engine: EngineClient | None = None
        self.tokenizer = None
        self.max_model_len = 0
        self.vocab_size: int | None = None
        self.parser_flags = (tool_call_parser, reasoning_parser)
        self.chat: ChatRenderer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._small_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dsaserve-prepare")
        self._large_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsaserve-prepare-large")
        self.engine_loop = EngineLoop(engine, self.metrics, step_timeout=step_timeout, on_fatal=self._on_fatal,
                                      factory=engine_factory, on_ready=self._engine_ready)

    # --- lifecycle -------------------------------------------------------------------------------------
    def _engine_ready(self, engine: EngineClient) -> None:
        """Called by the engine thread once the engine is built and warmed up (before ``ready`` is set)."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = int(engine.max_model_len)
        self.vocab_size = getattr(engine, "vocab_size", None)
        self.chat = ChatRenderer(self.tokenizer, getattr(engine, "model_type", None), chat_template=self.chat_template,
                                 tool_call_parser=self.parser_flags[0], reasoning_parser=self.parser_flags[1])
        self.max_request_bytes = self._max_request_bytes_flag or default_max_request_bytes(self.max_model_len)
        log.info("engine ready: serving %r (max_model_len %d, requests up to %d bytes)", self.model_name,
                 self.max_model_len, self.max_request_bytes)

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

    def begin_shutdown(self) -> None:
        """Start a graceful shutdown (SIGTERM): refuse new requests, let those in flight finish for up to
        ``shutdown_timeout`` seconds, end the rest with an error, then ask the HTTP server to exit.
        Call on the event loop; a second call ends every request now."""
        if self.draining:
            n = self.engine_loop.fail_all("the server is shutting down now (second signal)")
            log.warning("second shutdown signal: ended %d request(s) in flight", n)
            return
        self.draining = True
        log.info("shutting down: draining %d request(s) in flight (up to %.0f s)", self.engine_loop.num_active(),
                 self.shutdown_timeout)
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self.engine_loop.num_active() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        n = self.engine_loop.fail_all(f"the server is shutting down (requests still running after the "
                                      f"{self.shutdown_timeout:.0f} s drain were stopped)")
        if n:
            log.warning("drain deadline reached: ended %d request(s) with an error", n)
            await asyncio.sleep(0.2)          # let their handlers write the error before the server stops
        if self.request_exit is not None:
            self.request_exit(self.exit_code)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self._loop = asyncio.get_running_loop()
        self.engine_loop.start()
        watchdog = asyncio.create_task(self.engine_loop.watchdog())
        try:
            yield
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            # Joining the engine thread and worker processes blocks: do it off the event loop.
            await asyncio.to_thread(self.engine_loop.stop)
            for pool in (self._small_pool, self._large_pool):
                pool.shutdown(wait=False, cancel_futures=True)

    # --- admission -------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        """With an API key configured, every /v1 request must carry ``Authorization: Bearer <key>``."""
        if self._key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        # digests of equal length: the comparison takes the same time whatever the key and the guess
        if not (hmac.compare_digest(given, self._key_digest) and scheme.lower() == "bearer"):
            raise RequestError("Missing or invalid API key: send the header 'Authorization: Bearer <key>' with the "
                               "key the server was started with (--api-key / DSASERVE_API_KEY)", None, status=401,
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_serving(self) -> None:
        """503 while the engine starts, after it died, or while the server shuts down."""
        if self.engine_loop.dead:
            raise RequestError(f"The engine is not available: {self.engine_loop.dead_reason}", None, status=503,
                               type="server_error", code="engine_dead")
        if self.draining:
            raise RequestError("The server is shutting down; send the request to another replica", None,
                               status=503, type="server_error", code="shutting_down")
        if not self.engine_loop.ready.is_set():
            raise RequestError(f"The server is starting ({self.engine_loop.starting_phase}); retry when GET /health "
                               "returns 200", None, status=503, type="server_error", code="server_starting")

    def _too_large(self, size: str) -> RequestError:
        return RequestError(f"The request body is {size} bytes; this server accepts at most {self.max_request_bytes} "
                            "bytes (--max-request-bytes; by default room for a whole context)", None, status=413,
                            code="request_too_large")

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it exceeds ``max_request_bytes`` (before any parsing)."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            if int(declared) <= DISCARD_LIMIT_BYTES:
                async for _ in request.stream():   # read and drop it: the client then sees the 413
                    pass
            raise self._too_large(declared)
        chunks, size = [], 0
        stream = request.stream()
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                async for more in stream:      # drop the rest (up to the discard limit)
                    size += len(more)
                    if size > DISCARD_LIMIT_BYTES:
                        break
                raise self._too_large(f"more than {limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def prepare(self, fn: Callable, body: bytes):
        """Run ``fn(body)`` (parse, tokenize, validate) in a thread pool: tokenizing a long prompt takes
        seconds and must not stall the event loop."""
        pool = self._large_pool if len(body) > LARGE_BODY_BYTES else self._small_pool
        return await asyncio.get_running_loop().run_in_executor(pool, fn, body)

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

    def check_model(self, name: str | None) -> None:
        """A request's ``model`` must name the served model; left out, it means the served one."""
        if name is not None and name != self.model_name:
            raise RequestError(f"The model '{name}' does not exist; this server serves '{self.model_name}' "
                               "(see GET /v1/models)", "model", code="model_not_found")

    def tokenize_prompt(self, prompt: str | list[int], field: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("This model has no tokenizer; send the prompt as a list of token ids", field)
            return self.tokenizer.encode(prompt, add_bos=True)
        if len(prompt) >= self.max_model_len:
            return list(prompt)                # sampling_params rejects the length; no need to scan the ids
        self.check_token_ids(prompt, field)
        return list(prompt)

    def check_token_ids(self, ids, field: str) -> None:
        """Token ids must lie in the model's vocabulary: the same rule the engine applies (the tokenizer's
        vocabulary may be smaller than the model's; ids in between are still valid model inputs)."""
        vocab = self.vocab_size
        if vocab is None:
            return
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"{field} contains the token id {bad}, outside the model's vocabulary [0, {vocab})",
                               field)

    def prepare_completion(self, body: bytes) -> Job:
        req: CompletionRequest = self.parse(CompletionRequest, body)
        self.check_model(req.model)
        prompts = req.prompts()
        ids = [self.tokenize_prompt(p) for p in prompts]
        prompt_logprobs = None
        if req.echo:                          # the prompt's logprobs come with it (computed also with max_tokens=0)
            prompt_logprobs = req.logprobs if req.logprobs is not None else (0 if req.max_tokens == 0 else None)
        structured = self.structured_output(req)
        params = [self.sampling_params(req, len(p), req.max_tokens, "prompt", req.logprobs, prompt_logprobs,
                                       structured) for p in ids]
        texts = [p if isinstance(p, str) else self.decode_text(p) for p in prompts] if req.echo else []
        return Job(False, req, ids, params, texts, top_n=req.logprobs or 0, want_logprobs=req.logprobs is not None,
                   echo=req.echo)

    def prepare_chat(self, body: bytes) -> Job:
        req: ChatCompletionRequest = self.parse(ChatCompletionRequest, body)
        self.check_model(req.model)
        tools = req.tool_dicts()
        text = self.chat.render([m.to_dict() for m in req.messages], tools, req.chat_template_kwargs)
        prompt_ids = self.chat.encode(text)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, len(prompt_ids), max_tokens, "messages", logprobs, None,
                                      self.structured_output(req))
        return Job(True, req, [prompt_ids], [params], [text], tools=tools, top_n=req.top_logprobs or 0,
                   want_logprobs=req.logprobs)

    def structured_output(self, req) -> GrammarSpec | None:
        """The request's output constraint, compiled now (a bad schema / regex / grammar is a 400 here)."""
        rf = req.response_format.model_dump(exclude_none=True) if req.response_format is not None else None
        field = "regex" if req.regex is not None else "grammar" if req.grammar is not None else "response_format"
        try:
            spec = GrammarSpec.from_request(rf, req.regex, req.grammar)
        except StructuredOutputError as e:
            raise RequestError(str(e), field) from None
        if spec is None:
            return None
        compile_grammar = getattr(self.engine, "compile_grammar", None)
        if compile_grammar is None:
            raise RequestError("This engine does not support structured output", field)
        try:
            compile_grammar(spec)
        except (StructuredOutputError, ValueError) as e:
            raise RequestError(str(e), field) from None
        return spec

    def sampling_params(self, req, prompt_len: int, max_tokens: int | None, prompt_field: str,
                        logprobs: int | None, prompt_logprobs: int | None = None,
                        structured: GrammarSpec | None = None) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise RequestError(f"This model's maximum context length is {self.max_model_len} tokens, but the "
                               f"prompt has {prompt_len} tokens; shorten the prompt", prompt_field,
                               code="context_length_exceeded")
        self.check_token_ids(req.stop_token_ids or [], "stop_token_ids")
        bias = req.bias_by_id()
        self.check_token_ids(bias or {}, "logit_bias")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise RequestError(f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                               f"has {prompt_len} tokens, so at most {room} can be generated, but max_tokens is "
                               f"{max_tokens}; lower max_tokens or shorten the prompt", "max_tokens",
                               code="context_length_exceeded")
        if req.min_tokens > max_tokens:
            raise RequestError(f"min_tokens ({req.min_tokens}) is larger than max_tokens ({max_tokens})", "min_tokens")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p),
                top_k=-1 if req.top_k in (None, 0) else req.top_k,
                seed=req.seed,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                stop=list(req.stop or []),
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=req.ignore_eos,
                n=req.n,
                min_tokens=req.min_tokens,
                presence_penalty=float(req.presence_penalty),
                frequency_penalty=float(req.frequency_penalty),
                repetition_penalty=float(req.repetition_penalty),
                logit_bias=bias,
                structured_output=structured,
            )
        except ValueError as e:
            field = str(e).split(" ", 1)[0]
            raise RequestError(str(e), field if field in type(req).model_fields else None) from None

    def prepare_tokenize(self, body: bytes) -> dict:
        req: TokenizeRequest = self.parse(TokenizeRequest, body)
        self.check_model(req.model)
        if self.tokenizer is None:
            raise RequestError("This model has no tokenizer", "prompt")
        if req.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            ids = self.chat.encode(self.chat.render([m.to_dict() for m in req.messages], tools,
                                                    req.chat_template_kwargs))
        else:
            ids = self.tokenizer.encode(req.prompt, add_bos=req.add_special_tokens)
        out = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [self.token_str(t) for t in ids]
        return out

    def prepare_detokenize(self, body: bytes) -> dict:
        req: DetokenizeRequest = self.parse(DetokenizeRequest, body)
        self.check_model(req.model)
        if self.tokenizer is None:
            raise RequestError("This model has no tokenizer", "tokens")
        self.check_token_ids(req.tokens, "tokens")
        return {"prompt": self.decode_text(req.tokens)}

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer is not None else ""

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
                               type="server_error", code="shutting_down" if first.code == "shutdown" else "engine_dead")
        return stream

    async def start_job(self, rid: str, job: Job) -> list[RequestStream]:
        """Submit every prompt of a job (engine requests ``rid``, or ``rid-i`` for a batch); all or none."""
        field = "messages" if job.chat else "prompt"
        streams: list[RequestStream] = []
        try:
            for i, (ids, params) in enumerate(zip(job.prompts, job.params)):
                streams.append(await self.start(rid if len(job.prompts) == 1 else f"{rid}-{i}", ids, params, field))
        except BaseException:
            for s in streams:
                self.engine_loop.abort(s.request_id)
            raise
        return streams

    def token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def build_app(server: OpenAIServer) -> FastAPI:
    """Create the FastAPI app for ``server`` (the engine thread starts with the app's lifespan)."""
    app = FastAPI(title="dsaserve", lifespan=server.lifespan)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

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
        loop = server.engine_loop
        if loop.dead or not loop.healthy and loop.ready.is_set():
            return JSONResponse({"status": "unhealthy", "reason": loop.dead_reason}, status_code=503)
        if server.draining:
            return JSONResponse({"status": "draining", "reason": "the server is shutting down"}, status_code=503)
        if not loop.ready.is_set():
            return JSONResponse({"status": "starting", "reason": loop.starting_phase}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        server.check_serving()
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "dsaserve", "max_model_len": server.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.authorize(request)
        server.check_serving()
        body = await server.read_body(request)
        job = await server.prepare(server.prepare_completion, body)
        rid = f"cmpl-{uuid.uuid4().hex}"
        return await respond(server, request, rid, job, await server.start_job(rid, job))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.authorize(request)
        server.check_serving()
        body = await server.read_body(request)
        job = await server.prepare(server.prepare_chat, body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await respond(server, request, rid, job, await server.start_job(rid, job))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        server.authorize(request)
        server.check_serving()
        return await server.prepare(server.prepare_tokenize, await server.read_body(request))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        server.authorize(request)
        server.check_serving()
        return await server.prepare(server.prepare_detokenize, await server.read_body(request))

    @app.get("/version")
    async def version():
        return {"version": dsaserve.__version__}

    return app
