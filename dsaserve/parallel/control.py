"""The control channel between rank 0 and the workers: typed messages, sent as pickled objects over gloo.

Messages: rank 0 sends every worker ``StepPlan``s, ``ControlRequest``s and finally ``Shutdown`` (plan
group); last-stage workers answer each plan with a ``StepResult`` and every worker answers a control
request with a ``ControlReply`` (result group). Spawned workers also report ``WorkerEvent``s (alive,
ready, error) over a multiprocessing queue, which works before and after the process groups exist.

Transport: a length header, then the pickled bytes. Gloo point-to-point receives cannot be polled (their
completion only shows inside ``wait``), so each receiving side runs one background thread per channel
that blocks on ``recv`` and hands objects to the main thread through a ``queue.Queue``, which *can* be
waited on with a timeout and liveness checks.
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from dsaserve.runtime.plan import StepItem

log = logging.getLogger(__name__)


# ---- messages ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shutdown:
    """Rank 0 -> every worker (plan group): flush pending sends and exit the worker loop."""


@dataclass(frozen=True)
class ControlRequest:
    """Rank 0 -> every worker (plan group): a request outside the step stream; every rank answers."""

    op: Literal["stats", "profile_on", "profile_off", "reset"]


@dataclass
class StepResult:
    """A last-stage worker -> rank 0 (result group): the tokens it sampled for one step (maybe none)."""

    step_id: int
    tokens: list[StepItem]           # sampled tokens and prompt logprobs


@dataclass
class ControlReply:
    """A worker -> rank 0 (result group): its answer to a ``ControlRequest``."""

    rank: int
    answer: dict


@dataclass(frozen=True)
class WorkerEvent:
    """A spawned worker -> rank 0 (multiprocessing queue): it bootstrapped ("alive", rank 0 may now enter
    the rendezvous), finished loading ("ready"), or failed ("error", with the traceback)."""

    kind: Literal["alive", "ready", "error"]
    rank: int
    message: str = ""


# ---- transport -----------------------------------------------------------------------------------------


class PendingSends:
    """Non-blocking sends in flight, each with the buffer it must keep alive until it completes."""

    def __init__(self, keep: int):
        self.keep = keep                 # at most this many stay un-waited
        self._pending: list = []

    def add(self, work, buffer) -> None:
        self._pending.append((work, buffer))
        while len(self._pending) > self.keep:
            self._pending.pop(0)[0].wait()

    def flush(self) -> None:
        while self._pending:
            self._pending.pop(0)[0].wait()

    def in_flight(self) -> bool:
        """True while a send has not completed (completed ones are dropped; the query never blocks)."""
        self._pending = [(w, b) for w, b in self._pending if not w.is_completed()]
        return bool(self._pending)


class ObjectSender:
    """Non-blocking sends of pickled objects to other ranks (keeps buffers alive until delivered)."""

    def __init__(self, group):
        self.group = group
        # gloo sends finish once written to the socket; old ones are waited on so buffers can be freed
        self._pending = PendingSends(keep=64)

    def send(self, obj, dst: int) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        header = torch.tensor([payload.numel()], dtype=torch.int64)
        self._pending.add(dist.isend(header, dst, group=self.group), header)
        self._pending.add(dist.isend(payload, dst, group=self.group), payload)

    def flush(self) -> None:
        self._pending.flush()


def recv_object(group, src: int):
    """Blocking receive of one object sent by ``ObjectSender.send``."""
    header = torch.zeros(1, dtype=torch.int64)
    dist.recv(header, src, group=group)
    payload = torch.empty(int(header.item()), dtype=torch.uint8)
    dist.recv(payload, src, group=group)
    return pickle.loads(payload.numpy().tobytes())


class ReceiverThread:
    """Background thread: ``next_source()`` says whom to receive from next; objects land in ``queue``.

    ``next_source`` blocks until there is something to expect and returns None to stop. The thread also
    ends after delivering an instance of ``stop_after`` (e.g. ``Shutdown``). Errors (a peer died: gloo
    reports 'Connection closed by peer') are put on the queue as ``ReceiveError``.
    """

    def __init__(self, group, next_source: Callable[[], int | None], name: str, stop_after: type | None = None):
        self.group = group
        self.next_source = next_source
        self.stop_after = stop_after
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            src = self.next_source()
            if src is None:
                return
            try:
                obj = recv_object(self.group, src)
            except Exception as e:
                self.queue.put(ReceiveError(src, e))
                return
            self.queue.put(obj)
            if self.stop_after is not None and isinstance(obj, self.stop_after):
                return


class ReceiveError:
    """What a ``ReceiverThread`` queues when a receive fails (then it stops)."""

    def __init__(self, src: int, error: Exception):
        self.src, self.error = src, error

    def __repr__(self) -> str:
        return f"receive from rank {self.src} failed: {self.error}"
