"""One rank's part of a step, and the loop that non-zero ranks run.

``StageWorker.run_plan`` is the whole per-rank data flow of the PP x CP runtime:
  recv (hidden, residual) shard from the peer in the previous stage (pre-posted when the next plan is
  already known) -> this stage's layers (CP gathers inside) -> send the shard to the peer in the next
  stage, or, on the last stage, sample the tokens whose last prompt row lives on this rank.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from dsaserve.args import EngineArgs
from dsaserve.config import ModelConfig
from dsaserve.parallel.control import (ControlReply, ControlRequest, ObjectSender, PendingSends, ReceiverThread,
                                       ReceiveError, Shutdown, StepResult, WorkerEvent)
from dsaserve.parallel.heartbeat import HeartbeatSender, StepProgress
from dsaserve.parallel.layout import Layout
from dsaserve.parallel.rendezvous import StartupMismatchError, publish_error, startup_summary, world_store
from dsaserve.parallel.sm_budget import indexer_num_sms
from dsaserve.parallel.state import ParallelState
from dsaserve.profiling import phase
from dsaserve.runtime import cp
from dsaserve.runtime.compile_watch import COMPILES
from dsaserve.runtime.plan import StepItem, StepPlan
from dsaserve.runtime.runner import ModelRunner

log = logging.getLogger(__name__)

@dataclass
class WorkerSpec:
    """Everything a spawned rank needs to build its part of the engine (picklable)."""

    model_dir: str
    cfg: ModelConfig
    layout: Layout
    args: EngineArgs
    dtype: torch.dtype
    max_model_len: int
    master_addr: str
    master_port: int
    external: bool = False        # launched by torchrun: join through env:// instead of tcp://addr:port
    torch_threads: int = 1        # intra-op threads of a worker (CPU: the cores split over the ranks)


class StageWorker:
    """This rank's runner plus its pipeline links."""

    def __init__(self, rank: int, spec: WorkerSpec, progress: bool | None = None):
        a = spec.args
        self.spec = spec
        world_size = int(os.environ["WORLD_SIZE"]) if spec.external else spec.layout.world_size
        summary = startup_summary(spec.cfg, spec.layout, a, spec.dtype, spec.max_model_len, world_size)
        self.state = ParallelState(rank, spec.layout, device=a.device, master_addr=spec.master_addr,
                                   master_port=spec.master_port, timeout_s=a.comm_timeout_s,
                                   pp_comm_ctas=a.pp_comm_ctas, env_init=spec.external, startup=summary)
        st = self.state
        self.view = st.view
        self.step_progress = StepProgress()            # what this rank's heartbeat reports
        self.heartbeat = None
        if rank != 0:                                  # rank 0 watches the others (MultiProcessExecutor)
            self.heartbeat = HeartbeatSender(st.connect_store, rank, self.step_progress, a.heartbeat_timeout_s,
                                             on_lost=_exit_lost)
        self.runner = ModelRunner(spec.model_dir, spec.cfg, self.view.shard(), a, device=st.device, dtype=spec.dtype,
                                  comm=st.stage_comm, progress=progress if rank == 0 else False)
        self.num_pages = self._agree_num_pages()
        self.runner.allocate_cache(self.num_pages)
        self.runner.init_decode(spec.max_model_len, agree=self._stage_agrees)
        self.hidden_size = spec.cfg.hidden_size
        self._posted_recv: dict[int, tuple] = {}     # step_id -> (buffer, work)
        self._sends = PendingSends(keep=2)          # in-flight PP sends and their payloads
        self.indexer_sms_in_transfer = self._indexer_sms()

    def _agree_num_pages(self) -> int:
        """Each rank proposes what fits after its weights; all take the minimum (slot ids are global)."""
        t = torch.tensor([self.runner.propose_num_pages(self.spec.max_model_len)], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.state.plan_group)
        return int(t.item())

    def _stage_agrees(self, ok: bool) -> bool:
        """True iff every CP rank of this stage says ok (CUDA-graph capture is all or none per stage)."""
        if self.view.cp_size == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.state.device)
        return float(self.state.stage_comm.all_reduce(flag, "graph_capture_vote")) == 0.0

    def _indexer_sms(self) -> int | None:
        """SMs for the indexer kernels while a PP transfer is pending (None = the full grid).

        CPU: 'auto' reserves nothing (no SMs); an explicit ``--indexer-num-sms N`` is passed on as given (the
        PyTorch references ignore it), so the reservation bookkeeping runs, and is tested, without a GPU."""
        setting = self.spec.args.indexer_num_sms
        if setting == "off":        # ablation: full grid even with a transfer pending
            return None
        override = None if setting == "auto" else int(setting)
        if self.state.device.type != "cuda":
            return override
        sms = torch.cuda.get_device_properties(self.state.device).multi_processor_count
        return indexer_num_sms(sms, True, self.spec.args.pp_comm_ctas, override)

    # ---- pipeline receive ---------------------------------------------------------------------------
    def _recv_rows(self, plan: StepPlan) -> int:
        if plan.is_decode:
            return plan.num_tokens
        return cp.local_count(plan.num_tokens, self.view.cp_size, plan.cp_split)

    def post_recv(self, plan: StepPlan) -> None:
        """Post the recv of ``plan``'s (hidden, residual) shard now, so it overlaps the current compute."""
        if self.view.is_first_stage or plan.step_id in self._posted_recv:
            return
        rows = self._recv_rows(plan)
        if self.spec.args.pp_transfer == "gathered" and not plan.is_decode:
            rows *= self.view.cp_size
        buf = torch.empty(2, rows, self.hidden_size, dtype=self.spec.dtype, device=self.state.device)
        self._posted_recv[plan.step_id] = (buf, self.state.pp_irecv(buf))

    def run_plan(self, plan: StepPlan, next_plan: StepPlan | None = None) -> list[StepItem]:
        self.step_progress.current = plan.step_id
        try:
            return self._run_plan(plan, next_plan)
        finally:
            self.step_progress.current, self.step_progress.last_done = -1, plan.step_id

    def _run_plan(self, plan: StepPlan, next_plan: StepPlan | None) -> list[StepItem]:
        step = self.runner.prepare(plan)
        hidden = residual = None
        if not self.view.is_first_stage:
            self.post_recv(plan)
            buf, work = self._posted_recv.pop(plan.step_id)
            with phase("pp_recv_wait"):
                work.wait()
            hidden, residual = buf[0], buf[1]
        if next_plan is not None and not self.view.is_first_stage:
            self.post_recv(next_plan)
        if self._posted_recv or self._sends.in_flight():
            step.batch.indexer_num_sms = self.indexer_sms_in_transfer  # a recv / send kernel holds SMs meanwhile
        if hidden is not None and self.spec.args.pp_transfer == "gathered":
            hidden, residual = self._own_rows(plan, hidden, residual)
        hidden, residual = self.runner.forward(step, hidden, residual)
        if not self.view.is_last_stage:
            payload = torch.stack([hidden, residual])                 # [2, n_local, hidden]: own shard only
            if self.spec.args.pp_transfer == "gathered" and not plan.is_decode:
                with phase("pp_gather"):                              # ablation: the pre-CP-aware scheme
                    payload = self.state.stage_comm.all_gather_tokens(payload.transpose(0, 1), "pp_gather").transpose(0, 1)
            with phase("pp_send"):
                self._sends.add(self.state.pp_isend(payload), payload)
            self.runner.stage_ahead(plan, step)
            return []
        with phase("sample"):
            pending = self.runner.sample_async(plan, step, hidden, residual)
            self.runner.stage_ahead(plan, step)        # the next step's host work, while the device runs
            return self.runner.finish(pending)

    def _own_rows(self, plan: StepPlan, hidden: torch.Tensor, residual: torch.Tensor):
        """Gathered-transfer ablation: the receiver got the whole stage's rows and keeps its own."""
        if plan.is_decode or self.view.cp_size == 1:
            return hidden, residual
        n = self._recv_rows(plan)
        mine = slice(self.view.cp_rank * n, (self.view.cp_rank + 1) * n)
        return hidden[mine], residual[mine]

    def handle_control(self, req: ControlRequest):
        from dsaserve.profiling import RECORDER

        if req.op == "profile_on":
            RECORDER.enable(cuda=self.state.device.type == "cuda")
        elif req.op == "profile_off":
            RECORDER.disable()
        elif req.op == "reset":
            self.state.counters.reset()
            self.runner.prefill_indexer.reset()
            RECORDER.reset()
        elif req.op == "warm":
            COMPILES.mark_warm()
        elif req.op == "stats":
            return {"rank": self.view.rank, "stage": self.view.stage, "cp_rank": self.view.cp_rank,
                    "comm": self.state.counters.snapshot(), "weights": self.runner.weight_stats(),
                    "indexer_sm_budget": self.runner.prefill_indexer.snapshot(),
                    "triton_compiles": COMPILES.snapshot(),
                    "phases_ms": RECORDER.exclusive_ms() if RECORDER.enabled else {},
                    "regions": RECORDER.collect() if RECORDER.enabled else []}
        else:
            raise ValueError(f"unknown control request {req.op!r}")
        return {"rank": self.view.rank}

    def flush(self) -> None:
        self._sends.flush()


def _watch_parent(parent_pid: int) -> None:
    """Exit if the engine process disappears (covers a parent killed with SIGKILL)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def _exit_lost(message: str) -> None:
    """The heartbeat lost the world's store: rank 0 (or the launcher hosting the store) is gone."""
    print(f"{message}; exiting", file=sys.stderr, flush=True)
    os._exit(3)


def _report_error(rank: int, spec: WorkerSpec, message: str) -> None:
    """Under torchrun (no queue to rank 0): publish the error in the world's store, where rank 0 reads it."""
    try:
        store = world_store(rank, int(os.environ["WORLD_SIZE"]), spec.master_addr, spec.master_port, external=True,
                            timeout_s=10.0, client=True)
        publish_error(store, rank, message)
    except Exception:  # noqa: BLE001 - best effort: the rank dies anyway, and rank 0 sees it go silent
        pass


def worker_main(rank: int, spec: WorkerSpec, events, parent_pid: int | None) -> None:
    """Entry point of a spawned rank (rank != 0): build, report ready, run plans until shutdown.

    ``events``: the multiprocessing queue of ``WorkerEvent``s to rank 0 (None under torchrun).
    """
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    worker = None
    if events is not None:
        events.put(WorkerEvent("alive", rank))   # bootstrapped: rank 0 may now block in the rendezvous
    try:
        torch.set_num_threads(spec.torch_threads)
        worker = StageWorker(rank, spec)
        if events is not None:
            events.put(WorkerEvent("ready", rank))
        run_worker_loop(worker)
        worker.flush()
    except BaseException as e:  # report, then die loudly: rank 0 turns this into EngineDeadError
        if isinstance(e, StartupMismatchError):     # every rank got the same verdict: no traceback needed
            msg = f"rank {rank} failed: {e}"
        else:
            msg = f"rank {rank} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        print(msg, file=sys.stderr, flush=True)
        if events is not None:
            events.put(WorkerEvent("error", rank, msg))
            events.close()
            events.join_thread()   # os._exit would drop the message still in the feeder thread
        elif not isinstance(e, StartupMismatchError):
            _report_error(rank, spec, msg)
        os._exit(1)
    if worker is not None:
        if worker.heartbeat is not None:
            worker.heartbeat.stop()
        worker.state.destroy()


def run_worker_loop(worker: StageWorker) -> None:
    """Serve rank 0's messages in order until ``Shutdown``: plans (answered with a ``StepResult`` by the
    last stage) and control requests (answered with a ``ControlReply`` by every rank)."""
    st = worker.state
    receiver = ReceiverThread(st.plan_group, lambda: 0, name=f"plans-rank{st.rank}", stop_after=Shutdown)
    results = ObjectSender(st.result_group)
    pending: list = []
    while True:
        item = pending.pop(0) if pending else receiver.queue.get()
        if isinstance(item, ReceiveError):
            raise RuntimeError(f"lost the connection to rank 0 ({item})")
        if isinstance(item, Shutdown):
            results.flush()
            return
        if isinstance(item, ControlRequest):
            worker.flush()
            results.send(ControlReply(st.rank, worker.handle_control(item)), 0)
            continue
        if not isinstance(item, StepPlan):
            raise RuntimeError(f"unexpected message from rank 0: {item!r}")
        plan = item
        # Peek: if the next plan is already here, its PP recv is posted before this plan's compute.
        try:
            while True:
                pending.append(receiver.queue.get_nowait())
        except queue.Empty:
            pass
        nxt = next((p for p in pending if isinstance(p, StepPlan)), None)
        tokens = worker.run_plan(plan, nxt)
        if st.view.is_last_stage:
            results.send(StepResult(plan.step_id, tokens), 0)
