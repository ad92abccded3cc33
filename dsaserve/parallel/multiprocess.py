"""The PP x CP executor on rank 0: spawns (or joins, under torchrun) the other ranks and runs plans.

Rank 0 is the engine process itself and also stage 0's CP rank 0. ``submit(plan)`` sends the plan to
every other rank and returns at once; ``wait(plan)`` first runs rank 0's own share of every plan submitted
so far, in order, then collects the plan's sampled tokens from the last stage. Up to ``max_inflight`` =
2 x pp_size plans are in flight, so stage s works on chunk c+1 (or further) while stage s+1 works on
chunk c. A dead or failing worker becomes an ``EngineDeadError`` naming the rank, and every
other worker is stopped: no hang, no orphan. A worker that stops answering without dying (SIGSTOP, a
frozen host) is named by the heartbeat monitor (``parallel/heartbeat.py``) after ``heartbeat_timeout_s``;
``liveness_problem()`` lets another thread (the server's watchdog) ask while a step is blocked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import deque

import torch
import torch.multiprocessing as mp

from dsaserve.args import EngineArgs
from dsaserve.config import ConfigError, ModelConfig
from dsaserve.parallel.control import (ControlReply, ControlRequest, ObjectSender, ReceiverThread, ReceiveError,
                                       Shutdown, StepResult, WorkerEvent)
from dsaserve.parallel.errors import EngineDeadError
from dsaserve.parallel.heartbeat import HeartbeatMonitor
from dsaserve.parallel.launch import exit_with_launcher, launched_by_torchrun
from dsaserve.parallel.layout import Layout
from dsaserve.parallel.rendezvous import describe_rank, reported_errors
from dsaserve.parallel.worker import StageWorker, WorkerSpec, worker_main
from dsaserve.runtime.plan import StepItem, StepPlan

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _destroy_world() -> None:
    """Tear down this process's torch.distributed world (what ``ParallelState.destroy`` does); the executor
    refuses to start when a world already exists, so any world here is the executor's own."""
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception as e:  # a broken group (dead peer) must not block shutdown
            log.debug("destroy_process_group failed: %s", e)


@contextlib.contextmanager
def _main_module_hidden():
    """Spawned workers must not re-run the user's script: everything they need lives in dsaserve.

    multiprocessing's spawn re-imports ``__main__`` (by path or module name) in every child, which runs an
    unguarded ``LLM(...)`` at a script's top level again. Hiding the main module's file and spec while the
    children start makes them skip that import, so ``if __name__ == "__main__":`` is not required.
    """
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if main is not None and hasattr(main, k)}
    try:
        for k in saved:
            setattr(main, k, None) if k == "__spec__" else delattr(main, k)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


class MultiProcessExecutor:
    """Rank 0's view of the world of P x C ranks."""

    def __init__(self, model_dir: str, cfg: ModelConfig, layout: Layout, args: EngineArgs, dtype: torch.dtype,
                 max_model_len: int):
        if torch.distributed.is_initialized():
            # checked first: spawning would be wasted, and shutdown would tear down the other engine's world
            raise RuntimeError("this process already holds a torch.distributed world (is another multi-process "
                               "LLM still running?): one PP x CP engine per process; shut the other one down first")
        self.layout = layout
        # independent prefill chunks may run ahead: stage 0 keeps computing while later stages catch up
        self.max_inflight = 2 * layout.pp_size
        self.feeds_tokens = False      # the tokens are sampled on the last stage; the first stage embeds them
        self.timeout_s = args.comm_timeout_s
        self._procs: list = []
        self._caller_threads: int | None = None
        self._ready: set[int] = set()                 # ranks that reported "ready" after loading
        self._alive: set[int] = set()                 # ranks whose process bootstrapped (before the rendezvous)
        self._worker_errors: dict[int, str] = {}      # rank -> the error it reported, in arrival order
        self._events = None                           # WorkerEvents from spawned workers (multiprocessing queue)
        self._closed = False
        self._dead: str | None = None
        self._monitor: HeartbeatMonitor | None = None   # started once every rank is ready
        self.heartbeat_timeout_s = args.heartbeat_timeout_s
        external = launched_by_torchrun()
        self._external = external
        if external:
            exit_with_launcher(signal.SIGTERM)        # the torchrun agent died: this engine stops too
            layout.check_world_size(int(os.environ["WORLD_SIZE"]))
            if int(os.environ["RANK"]) != 0:
                raise RuntimeError("MultiProcessExecutor runs on rank 0 only; under torchrun the other ranks call "
                                   "dsaserve.parallel.launch.run_worker_if_torchrun() first thing")
            addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        else:
            addr, port = "127.0.0.1", args.master_port or _free_port()
        threads = 1
        if args.device == "cpu":
            # OpenMP threads spin: more threads than cores across the ranks slows everything down many times
            threads = max(1, (os.cpu_count() or 1) // layout.world_size)
            self._caller_threads = torch.get_num_threads()          # restored at shutdown
            torch.set_num_threads(threads)
        spec = WorkerSpec(model_dir, cfg, layout, args, dtype, max_model_len, addr, port, external=external,
                          torch_threads=threads)
        try:
            if not external:
                self._spawn(spec)
                # rank 0 cannot watch its children while blocked in the rendezvous: wait for every child to
                # bootstrap first, so one that dies on import fails fast instead of after comm_timeout_s
                self._wait_for(self._alive, "start")
            self.worker = StageWorker(0, spec, progress=None)
            self.num_pages = self.worker.num_pages
            self._wait_ready()
        except BaseException as e:
            # describe before shutdown: shutdown terminates the workers, and their exit codes would hide the cause;
            # a configuration error (the ranks' settings disagree) is already the whole story
            message = None if isinstance(e, (EngineDeadError, ConfigError)) else \
                self._describe_failure(f"startup failed on rank 0: {e}")
            self.shutdown()
            if message is None:
                raise
            raise EngineDeadError(message) from e
        st = self.worker.state
        self._monitor = HeartbeatMonitor(st.connect_store, list(range(1, layout.world_size)),
                                         lambda r: describe_rank(r, st.summaries), self.heartbeat_timeout_s,
                                         on_problem=self._rank_unresponsive)
        self._plans = ObjectSender(st.plan_group)
        # The result thread receives, for every submitted plan, one message per last-stage rank but rank 0.
        self._expect: queue.Queue = queue.Queue()
        self._result_sources = [r for r in layout.last_stage_ranks() if r != 0]
        self._results = ReceiverThread(st.result_group, self._expect.get, name="results-rank0")
        self._inflight: deque[StepPlan] = deque()
        self._unrun: deque[StepPlan] = deque()           # submitted, rank 0's share not run yet
        self._local_results: dict[int, list[StepItem]] = {}
        self._early: dict[int, list] = {}

    # ---- processes -------------------------------------------------------------------------------------
    def _spawn(self, spec: WorkerSpec) -> None:
        ctx = mp.get_context("spawn")
        self._events = ctx.Queue()
        with _main_module_hidden():
            for rank in range(1, self.layout.world_size):
                p = ctx.Process(target=worker_main, args=(rank, spec, self._events, os.getpid()),
                                name=f"dsaserve-rank{rank}", daemon=True)
                p.start()
                self._procs.append(p)

    def _wait_ready(self) -> None:
        self._wait_for(self._ready, "finish loading")

    def _wait_for(self, ranks: set[int], what: str) -> None:
        deadline = time.monotonic() + max(self.timeout_s, 300.0)
        while len(ranks) < len(self._procs):
            self._check_workers()
            if time.monotonic() > deadline:
                raise EngineDeadError(f"workers did not {what} within {max(self.timeout_s, 300.0):.0f} s")
            time.sleep(0.05)

    def _rank_unresponsive(self, rank: int, message: str) -> None:
        """Heartbeat monitor thread: ``rank`` is silent or failed. A spawned one is killed, so that rank 0's
        main thread, maybe blocked in a collective with it, fails now instead of after comm_timeout_s."""
        if 1 <= rank <= len(self._procs):
            p = self._procs[rank - 1]
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGKILL)

    def liveness_problem(self, step_timeout_s: float | None = None) -> str | None:
        """Thread-safe: a rank that stopped sending heartbeats or reported an error, or (with
        ``step_timeout_s``) ranks inside one step for longer than that, named; None while all is well."""
        m = self._monitor
        if m is None:
            return None
        if m.problem is not None:
            return m.problem
        return m.stuck_in_step(step_timeout_s) if step_timeout_s else None

    def _check_workers(self) -> None:
        """Raise EngineDeadError if any spawned worker exited or reported an error, or a rank's heartbeat
        stopped.

        A worker that died without a report (killed: SIGKILL, OOM) is named first: the errors its peers
        report then ('Connection reset by peer') are only consequences of its death.
        """
        if self._monitor is not None and self._monitor.problem is not None:
            raise EngineDeadError(self._monitor.problem)
        deadline = None
        while True:
            while self._events is not None:
                try:
                    event: WorkerEvent = self._events.get_nowait()
                except queue.Empty:
                    break
                if event.kind == "error":
                    self._worker_errors.setdefault(event.rank, event.message)
                elif event.kind == "alive":
                    self._alive.add(event.rank)
                else:
                    self._ready.add(event.rank)
            for rank, p in enumerate(self._procs, start=1):
                if not p.is_alive() and rank not in self._worker_errors:
                    raise EngineDeadError(f"worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}; "
                                          "the engine stopped. See the worker's stderr above for its error.")
            if not self._worker_errors:
                return
            # a reported error may be the echo of a peer killed a moment ago whose exit does not show yet
            deadline = deadline or time.monotonic() + 0.5
            if time.monotonic() >= deadline:
                raise EngineDeadError(next(iter(self._worker_errors.values())))
            time.sleep(0.05)

    def _describe_failure(self, fallback: str, grace_s: float = 2.0) -> str:
        """The worker-side cause of a failure rank 0 just saw, else ``fallback``. A killed peer's sockets
        close a moment before its exit status shows, so look again for ``grace_s`` before settling."""
        deadline = time.monotonic() + (grace_s if self._procs or self._external else 0.0)
        while True:
            try:
                self._check_workers()
            except EngineDeadError as e:
                return str(e)
            found = self._external_cause()
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                return fallback
            time.sleep(0.05)

    def _external_cause(self) -> str | None:
        """Under torchrun: what the heartbeats say (a rank gone quiet, a reported error), or before they run,
        the errors workers published in the store."""
        if not self._external:
            return None
        if self._monitor is not None:
            return self._monitor.diagnose()
        state = getattr(getattr(self, "worker", None), "state", None)
        if state is None:
            return None
        try:
            errors = reported_errors(state.store, list(range(1, self.layout.world_size)))
        except Exception:  # noqa: BLE001 - the store's host may be gone too
            return None
        return next(iter(errors.values()), None)

    def is_healthy(self) -> bool:
        if self._dead is not None or self._closed:
            return False
        try:
            self._check_workers()
        except EngineDeadError as e:
            self._dead = str(e)
            return False
        return True

    # ---- plans -----------------------------------------------------------------------------------------
    def submit(self, plan: StepPlan) -> StepPlan:
        """Send the plan to every other rank now; rank 0 runs its own share later, in ``wait``.

        Dispatching ahead matters: the engine submits every plan it can before waiting, so the other
        ranks already hold step k+1 when step k ends instead of idling while rank 0 schedules.
        """
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        try:
            self._check_workers()
            for rank in range(1, self.layout.world_size):
                self._plans.send(plan, rank)
        except EngineDeadError as e:
            self._fail(str(e))
        except Exception as e:
            self._fail(self._describe_failure(f"could not send step {plan.step_id}: {e}"))
        for src in self._result_sources:
            self._expect.put(src)
        self._inflight.append(plan)
        self._unrun.append(plan)
        return plan

    def _run_local(self) -> None:
        """Rank 0's share of every submitted plan it has not run yet, in order."""
        while self._unrun:
            plan = self._unrun.popleft()
            nxt = self._unrun[0] if self._unrun else None
            try:
                self._local_results[plan.step_id] = self.worker.run_plan(plan, nxt)
            except EngineDeadError as e:
                self._fail(str(e))
            except Exception as e:  # a collective broke: most likely a peer died
                self._fail(self._describe_failure(f"rank 0 failed while running step {plan.step_id}: {e}"))

    def wait(self, plan: StepPlan) -> list[StepItem]:
        self._run_local()
        tokens = list(self._local_results.pop(plan.step_id, []))
        need = len(self._result_sources)
        got = self._early.pop(plan.step_id, [])
        deadline = time.monotonic() + self.timeout_s
        while len(got) < need:
            try:
                item = self._results.queue.get(timeout=0.05)
            except queue.Empty:
                try:
                    self._check_workers()
                except EngineDeadError as e:
                    self._fail(str(e))
                if time.monotonic() > deadline:
                    stuck = self._monitor.stuck_in_step(0.0) if self._monitor is not None else None
                    self._fail(f"no result for step {plan.step_id} within {self.timeout_s:.0f} s (comm_timeout_s)"
                               + (f"; {stuck}" if stuck else ""))
                continue
            if isinstance(item, ReceiveError):
                self._fail(self._describe_failure(str(item)))
            if not isinstance(item, StepResult):
                self._fail(f"expected the result of step {plan.step_id}, got {item!r}")
            if item.step_id == plan.step_id:
                got.append(item.tokens)
            else:  # results of a later plan (ranks progress independently)
                self._early.setdefault(item.step_id, []).append(item.tokens)
        if self._inflight and self._inflight[0] is plan:
            self._inflight.popleft()
        for part in got:
            tokens += part
        return tokens

    def _fail(self, message: str):
        self._dead = message
        self.shutdown()
        raise EngineDeadError(message)

    def control(self, op: str) -> list[dict]:
        """Send a ControlRequest to every rank (no step may be in flight); returns each rank's answer."""
        if self._inflight:
            raise RuntimeError("control requests need an idle engine (steps are in flight)")
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        req = ControlRequest(op)
        for rank in range(1, self.layout.world_size):
            self._plans.send(req, rank)
            self._expect.put(rank)
        answers = [self.worker.handle_control(req)]
        deadline = time.monotonic() + self.timeout_s
        while len(answers) < self.layout.world_size:
            try:
                item = self._results.queue.get(timeout=0.05)
            except queue.Empty:
                self._check_workers()
                if time.monotonic() > deadline:
                    self._fail(f"ranks did not answer control request {op!r} within {self.timeout_s:.0f} s")
                continue
            if isinstance(item, ReceiveError):
                self._fail(self._describe_failure(str(item)))
            if not isinstance(item, ControlReply):
                self._fail(f"expected answers to control request {op!r}, got {item!r}")
            answers.append(item.answer)
        return sorted(answers, key=lambda a: a["rank"])

    def stats(self) -> dict:
        """Per-rank comm counters (and phase times when profiling is on), keyed by rank."""
        if not hasattr(self, "worker") or self._closed:
            return {}
        return {a["rank"]: a for a in self.control("stats")}

    # ---- shutdown ----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._monitor is not None:
            self._monitor.stop()
        # workers can only be asked to stop once startup finished (the plan channel exists); else terminate now
        healthy = self._dead is None and hasattr(self, "_plans") and all(p.is_alive() for p in self._procs)
        if hasattr(self, "_expect"):
            self._expect.put(None)                                    # stops the result thread
        if healthy and hasattr(self, "_plans"):
            try:
                for rank in range(1, self.layout.world_size):
                    self._plans.send(Shutdown(), rank)
                self._plans.flush()
            except Exception as e:
                log.debug("could not send shutdown: %s", e)
                healthy = False
        deadline = time.monotonic() + (10.0 if healthy else 0.5)
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=3)
        if self._events is not None:
            # release the queue's semaphores now (else "leaked semaphore objects" when the process exits)
            self._events.close()
            self._events.join_thread()
            self._events = None
        if self._caller_threads is not None:
            torch.set_num_threads(self._caller_threads)
        # Also when rank 0's StageWorker failed half-built (no self.worker): its process group exists and
        # would make every later engine of this process fail ("default process group twice").
        # A group with dead peers may block in teardown on NCCL: never let that hang the caller.
        t = threading.Thread(target=_destroy_world, daemon=True)
        t.start()
        t.join(timeout=10.0)
