"""The bridge between the asyncio server and the (synchronous, single-threaded) engine.

One thread owns the engine and calls every engine method; HTTP handlers never touch the engine. They
``submit`` a request and read ``RequestStream.queue`` (an asyncio queue fed with
``loop.call_soon_threadsafe``). The thread loop is

    take new requests / aborts from the inbox -> engine.step() -> ``OutputProcessor`` (detokenize, stop
    strings, finish reasons; the same one ``LLM`` uses) -> record metrics, push a ``Delta`` per request

and sleeps on an event while there is nothing to do (checking ``engine.is_healthy()`` every
``health_interval`` seconds so that a worker that dies while idle is noticed too).

Start-up: given a ``factory`` instead of an engine, the thread first builds the engine (loading the
model, spawning the ranks) and waits for ``engine.is_ready()`` (warm-up) when the engine has it; ``ready``
is set only then, so the HTTP server can listen (and answer /health with 503 "starting") meanwhile.

Faults: ``EngineDeadError`` from the engine (or an unexpected exception, a failed start-up, a step that
runs longer than ``step_timeout``, or a rank that stopped sending heartbeats, both found by
``watchdog()``) marks the loop dead: every request in flight gets a final ``Delta`` with ``error`` set,
later submissions are refused, the engine is shut down (its workers killed) and ``on_fatal`` is called
once so the server can exit non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from dsaserve.engine.client import EngineClient
from dsaserve.engine.output import OutputProcessor, RequestOutput
from dsaserve.engine.types import EngineDeadError, FinishReason, SamplingParams

from .metrics import ServerMetrics

log = logging.getLogger("dsaserve.server")


@dataclass
class Delta:
    """What a handler receives for its request: an acceptance, new text, the end, or an error."""

    kind: str                      # "accepted" | "rejected" | "output" | "error"
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    message: str | None = None     # for "rejected" / "error"
    code: str | None = None        # for "error": "engine_dead" or "shutdown"
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    index: int = 0                 # which of the request's n sequences ("output")
    request_finished: bool = False  # every sequence of the request is done (errors end them all)
    prompt_logprobs: list | None = None   # once, on sequence 0's first delta, when asked for


@dataclass
class RequestStream:
    """Handler side of one request."""

    request_id: str
    queue: asyncio.Queue


@dataclass
class _State:
    """Engine-thread side of one request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    post: Callable[[Delta], None]
    arrival: float
    first_token_time: float | None = None
    last_token_time: dict[int, float] = field(default_factory=dict)   # per sequence (n > 1 step together)
    num_generated: int = 0


class EngineLoop:
    """Runs an engine in a background thread and serves many concurrent asyncio requests."""

    def __init__(self, engine: EngineClient | None, metrics: ServerMetrics, *, step_timeout: float = 600.0,
                 health_interval: float = 0.5, on_fatal: Callable[[str], None] | None = None,
                 factory: Callable[[], EngineClient] | None = None,
                 on_ready: Callable[[EngineClient], None] | None = None) -> None:
        if (engine is None) == (factory is None):
            raise ValueError("give either an engine or a factory that builds one")
        self.engine = engine
        self._factory = factory
        self.on_ready = on_ready
        self.outputs: OutputProcessor | None = None   # engine thread only, made once the engine exists
        self.ready = threading.Event()                # engine built and warmed up: requests may come in
        self.starting_phase = "loading the model"     # what /health says while not ready
        self.metrics = metrics
        # Read at scrape time: a 20 s prefill step must show its request as running while it runs.
        metrics.track_queues(self._num_waiting, self._num_running)
        self.step_timeout = step_timeout
        self.health_interval = health_interval
        self.on_fatal = on_fatal
        self._lock = threading.Lock()          # guards _inbox, _states, dead, _fatal_called
        self._inbox: list[tuple[str, _State | str]] = []
        self._states: dict[str, _State] = {}
        self._wakeup = threading.Event()
        self._stop = False
        self.dead = False
        self.dead_reason: str | None = None
        self._fatal_called = False
        self._step_started: float | None = None
        self._shutdown_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dsaserve-engine", daemon=True)

    # --- handler side (event loop thread) ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return not self.dead and self._thread.is_alive()

    def num_active(self) -> int:
        """Requests submitted and not finished yet (accepted or still in the inbox)."""
        with self._lock:
            return len(self._states) + sum(1 for op, _ in self._inbox if op == "add")

    def _num_waiting(self) -> int:
        # len() of the scheduler's queue from the scrape thread: a benign read of a changing length
        engine = self.engine if self.ready.is_set() else None
        return engine.num_waiting() if engine is not None else 0

    def _num_running(self) -> int:
        engine = self.engine if self.ready.is_set() else None
        return engine.num_running() if engine is not None else 0

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request; the first item on the stream's queue is "accepted" or "rejected"."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def post(delta: Delta) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, delta)
            except RuntimeError:
                pass  # event loop closed (server shutting down)

        stream = RequestStream(request_id, queue)
        state = _State(request_id, list(prompt_token_ids), params, post, time.monotonic())
        with self._lock:
            if self.dead:
                queue.put_nowait(Delta("error", message=f"engine is dead: {self.dead_reason}", finished=True,
                                       code="engine_dead", request_finished=True))
                return stream
            self._inbox.append(("add", state))
        self._wakeup.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request (client gone). Safe to call for finished or unknown requests."""
        with self._lock:
            if self.dead:
                return
            self._inbox.append(("abort", request_id))
        self._wakeup.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (finishing in-flight requests with an error) and shut the engine down."""
        self._stop = True
        self._wakeup.set()
        if self._thread.is_alive():
            # a thread still building the engine cannot be interrupted: the process exit (and the killing of
            # leftover children) ends it, so do not wait for the whole load
            self._thread.join(timeout if self.ready.is_set() else 1.0)
        self.fail_all("server is shutting down")
        self._shutdown_engine()

    def fail_all(self, message: str) -> int:
        """End every request in flight with an error (``code`` "shutdown"); returns how many."""
        return self._fail_all(message, kind="shutdown")

    async def watchdog(self, interval: float = 0.5) -> None:
        """Declare the engine dead when a rank stopped sending heartbeats (the engine's
        ``liveness_problem()``, which names it) or one step runs longer than ``step_timeout``."""
        while not self.dead and not self._stop:
            await asyncio.sleep(interval)
            engine = self.engine if self.ready.is_set() else None
            probe = getattr(engine, "liveness_problem", None)
            problem = probe(self.step_timeout) if probe is not None else None
            started = self._step_started
            if problem is None and started is not None and time.monotonic() - started > self.step_timeout:
                problem = f"an engine step has been running for more than {self.step_timeout:.0f} s (--step-timeout)"
            if problem is not None:
                self._die(f"the engine stopped making progress: {problem}")
                # The engine thread may be stuck inside step(): shut down from a helper thread.
                threading.Thread(target=self._shutdown_engine, daemon=True).start()

    # --- engine thread -------------------------------------------------------------------------------
    def _start_engine(self) -> None:
        """Build the engine (when given a factory) and wait for its warm-up; then set ``ready``."""
        t0 = time.monotonic()
        if self.engine is None:
            self.engine = self._factory()
            log.info("engine started in %.1f s", time.monotonic() - t0)
        self.outputs = OutputProcessor(self.engine.tokenizer, self.engine.abort_request)
        is_ready = getattr(self.engine, "is_ready", None)
        if is_ready is not None and not is_ready():
            self.starting_phase = "warming up"
            t1 = time.monotonic()
            while not is_ready():
                if self._stop:
                    return
                if not self.engine.is_healthy():
                    raise EngineDeadError("the engine became unhealthy while warming up (a worker died?)")
                time.sleep(0.05)
            log.info("engine warmed up in %.1f s", time.monotonic() - t1)
        if self.on_ready is not None:
            self.on_ready(self.engine)
        self.ready.set()

    def _run(self) -> None:
        try:
            self._start_engine()
        except EngineDeadError as e:
            self._die(f"engine died while starting: {e}")
            self._shutdown_engine()
            return
        except BaseException as e:  # noqa: BLE001 - a bad model folder etc.: the server cannot serve
            log.error("could not start the engine: %s: %s", type(e).__name__, e, exc_info=_wants_traceback(e))
            self._die(f"could not start the engine: {type(e).__name__}: {e}")
            self._shutdown_engine()
            return
        last_health = time.monotonic()
        try:
            while not self._stop:
                self._wakeup.clear()
                self._drain_inbox()
                if self.dead:
                    return
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(self.health_interval)
                    if time.monotonic() - last_health >= self.health_interval:
                        last_health = time.monotonic()
                        if not self.engine.is_healthy():
                            raise EngineDeadError("the engine reports itself unhealthy (a worker died?)")
                    continue
                self._step_started = time.monotonic()
                outputs = self.engine.step()
                self._step_started = None
                self._process(outputs)
        except EngineDeadError as e:
            self._die(f"engine died: {e}")
        except BaseException as e:  # noqa: BLE001 - any crash of the loop is fatal for the server
            log.exception("engine loop crashed")
            self._die(f"engine loop crashed: {type(e).__name__}: {e}")
        finally:
            self._step_started = None
            if self.dead:
                self._shutdown_engine()

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for op, arg in inbox:
            if op == "add":
                state: _State = arg
                try:
                    self.engine.add_request(state.request_id, state.prompt_token_ids, state.params)
                except ValueError as e:
                    state.post(Delta("rejected", message=str(e), finished=True, request_finished=True))
                    self.metrics.failed("rejected")
                    continue
                self.outputs.add(state.request_id, state.prompt_token_ids, state.params)
                with self._lock:
                    self._states[state.request_id] = state
                self.metrics.prompt_tokens.inc(len(state.prompt_token_ids))
                state.post(Delta("accepted", num_prompt_tokens=len(state.prompt_token_ids)))
            elif op == "abort":
                with self._lock:
                    state = self._states.pop(arg, None)
                if state is not None:
                    self.outputs.abort(arg)
                    self.metrics.aborted()          # the client went away: neither a success nor a fault
            else:                                   # "abort_quiet": already failed and counted by fail_all
                self.outputs.abort(arg)

    def _process(self, step_outputs) -> None:
        now = time.monotonic()
        for out in self.outputs.process(step_outputs):
            with self._lock:
                state = self._states.get(out.request_id)
            if state is None:
                continue  # aborted meanwhile
            n_new = len(out.token_ids)
            if n_new:
                if state.first_token_time is None:
                    state.first_token_time = now
                    self.metrics.ttft.observe(now - state.arrival)
                # the gap since this sequence's own last token: with n > 1 the sequences advance in the same
                # step, so a request-wide timestamp would record 0 for every sequence after the first
                last = state.last_token_time.get(out.index)
                if last is not None:
                    gap = (now - last) / n_new
                    for _ in range(n_new):
                        self.metrics.itl.observe(gap)
                state.last_token_time[out.index] = now
                state.num_generated += n_new
                self.metrics.generation_tokens.inc(n_new)
            if out.request_finished:
                with self._lock:
                    self._states.pop(out.request_id, None)
                if out.finish_reason == FinishReason.ABORT.value:
                    self.metrics.aborted()
                else:
                    self.metrics.e2e.observe(now - state.arrival)
                    self.metrics.finished(out.finish_reason or "unknown")
            if out.text or out.finished or (out.logprobs and n_new) or out.prompt_logprobs is not None:
                state.post(self._delta(out))

    @staticmethod
    def _delta(out: RequestOutput) -> Delta:
        return Delta("output", out.text, list(out.token_ids), out.logprobs, out.finished, out.finish_reason,
                     num_prompt_tokens=out.num_prompt_tokens, num_generated_tokens=out.num_generated_tokens,
                     index=out.index, request_finished=out.request_finished, prompt_logprobs=out.prompt_logprobs)

    # --- faults ----------------------------------------------------------------------------------------
    def _fail_all(self, message: str, kind: str) -> int:
        with self._lock:
            states = list(self._states.values()) + [s for op, s in self._inbox if op == "add"]
            self._states.clear()
            self._inbox.clear()
        for s in states:
            s.post(Delta("error", message=message, finished=True, code=kind, request_finished=True,
                         num_prompt_tokens=len(s.prompt_token_ids), num_generated_tokens=s.num_generated))
            self.metrics.failed(kind)
        if states and kind == "shutdown" and self.engine is not None and self.ready.is_set() and not self.dead:
            with self._lock:                          # the engine thread stops generating for them
                self._inbox.extend(("abort_quiet", s.request_id) for s in states)
            self._wakeup.set()
        return len(states)

    def _die(self, reason: str) -> None:
        with self._lock:
            if self.dead:
                return
            self.dead, self.dead_reason = True, reason
        log.error("%s; failing all requests and shutting down", reason)
        self.metrics.engine_healthy.set(0)
        self._fail_all(reason, kind="engine_dead")
        with self._lock:
            call, self._fatal_called = not self._fatal_called, True
        if call and self.on_fatal is not None:
            try:
                self.on_fatal(reason)
            except Exception:  # noqa: BLE001
                log.exception("on_fatal callback failed")

    def _shutdown_engine(self) -> None:
        with self._shutdown_lock:
            if self.engine is None:
                return
            try:
                self.engine.shutdown()
            except Exception:  # noqa: BLE001 - shutting down after a fault must not raise
                log.exception("engine.shutdown() failed")


def _wants_traceback(e: BaseException) -> bool:
    """A configuration mistake gets its one-line message; anything else its traceback too."""
    from dsaserve.config import ConfigError

    return not isinstance(e, (ConfigError, FileNotFoundError, ValueError))
