"""The control channel (parallel/control.py) on its own: typed messages over gloo, the receiver thread, and
the pending-send window. (End to end it carries every plan and result of tests/parallel.)"""

from __future__ import annotations

import multiprocessing
import os
import queue
from datetime import timedelta

import pytest

from dsaserve.parallel import control
from dsaserve.parallel.control import (ControlReply, ControlRequest, ObjectSender, PendingSends, ReceiverThread,
                                       ReceiveError, Shutdown, StepResult)
from dsaserve.runtime.plan import SampledToken
from tests.parallel._util import free_port

pytestmark = pytest.mark.timeout(120)

BLOB = bytes(range(256)) * 4096        # 1 MiB: the length header must carry more than one chunk's worth

MESSAGES = [
    StepResult(3, [SampledToken(7, 42, {42: -0.5, 9: -1.25}), SampledToken(8, 0)]),
    ControlReply(1, {"rank": 1, "blob": BLOB}),
    StepResult(4, []),
    ControlRequest("stats"),
    Shutdown(),
]


LAST = StepResult(6, [SampledToken(1, 2)])


def _rank_main(rank: int, port: int, out) -> None:
    """Rank 1 sends MESSAGES (ending with Shutdown), then LAST, then dies like a killed worker (no goodbye). Rank 0
    reads with one receiver until Shutdown, then with a second one until the error."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    group = dist.group.WORLD
    if rank == 1:
        sender = ObjectSender(group)
        for msg in MESSAGES + [LAST]:
            sender.send(msg, 0)
        sender.flush()
        os._exit(1)
    phases = []
    for stop_after in (Shutdown, None):
        receiver = ReceiverThread(group, lambda: 1, name="test-receiver", stop_after=stop_after)
        got = []
        try:
            while not got or not isinstance(got[-1], (Shutdown, ReceiveError)):
                got.append(receiver.queue.get(timeout=60))
        except queue.Empty:
            got.append("timeout")
        receiver.thread.join(timeout=10)
        phases.append((got, receiver.thread.is_alive()))
    out.put(phases)


@pytest.fixture(scope="module")
def two_ranks():
    """What rank 0 received in both phases (one pair of spawned processes for the module)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, out), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        return out.get(timeout=90)
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()


def test_typed_messages_arrive_in_order_and_shutdown_stops_the_receiver(two_ranks):
    got, receiver_alive = two_ranks[0]
    assert got == MESSAGES                           # dataclass equality: every field, the 1 MiB blob too
    assert [type(m) for m in got] == [StepResult, ControlReply, StepResult, ControlRequest, Shutdown]
    assert not receiver_alive                        # LAST (sent after Shutdown) was left for the next one


def test_a_dead_peer_becomes_a_receive_error_naming_it(two_ranks):
    got, receiver_alive = two_ranks[1]
    assert got[0] == LAST                            # what the peer sent before dying still arrives
    assert isinstance(got[1], ReceiveError) and got[1].src == 1 and "rank 1" in repr(got[1])
    assert not receiver_alive                        # one error ends the thread


def test_receiver_thread_stops_when_told_and_on_stop_type(monkeypatch):
    """No processes: the receive itself is replaced, to check the thread's own rules."""
    feed = queue.Queue()
    monkeypatch.setattr(control, "recv_object", lambda group, src: feed.get(timeout=10))
    sources = queue.Queue()
    receiver = ReceiverThread(None, sources.get, name="unit", stop_after=Shutdown)
    sources.put(2)
    feed.put(StepResult(1, []))
    assert receiver.queue.get(timeout=10) == StepResult(1, [])
    sources.put(None)                                # nothing more to expect: the thread returns
    receiver.thread.join(timeout=10)
    assert not receiver.thread.is_alive() and receiver.queue.empty()

    def failing(group, src):
        raise RuntimeError("Connection closed by peer")
    monkeypatch.setattr(control, "recv_object", failing)
    receiver = ReceiverThread(None, lambda: 3, name="unit-error")
    err = receiver.queue.get(timeout=10)
    assert isinstance(err, ReceiveError) and err.src == 3 and "Connection closed by peer" in repr(err)
    receiver.thread.join(timeout=10)
    assert not receiver.thread.is_alive()


def test_pending_sends_keep_at_most_the_window_and_flush_waits_for_all():
    waited: list[int] = []

    class Work:
        def __init__(self, i):
            self.i = i

        def wait(self):
            waited.append(self.i)

    pending = PendingSends(keep=2)
    for i in range(5):
        pending.add(Work(i), buffer=object())
    assert waited == [0, 1, 2]                       # oldest first, 2 still in flight
    pending.flush()
    assert waited == [0, 1, 2, 3, 4]
    pending.flush()                                  # nothing left: no second wait
    assert waited == [0, 1, 2, 3, 4]


def test_pending_sends_in_flight_until_completed():
    """``in_flight`` (the SM-budget trigger of a sending rank) is True exactly while a send has not completed,
    and drops completed sends without waiting on anything."""
    class Work:
        def __init__(self):
            self.done = False

        def is_completed(self):
            return self.done

        def wait(self):
            raise AssertionError("in_flight must not wait")

    sends = PendingSends(keep=2)
    assert not sends.in_flight()
    a, b = Work(), Work()
    sends.add(a, "payload a")
    sends.add(b, "payload b")
    assert sends.in_flight()
    a.done = True
    assert sends.in_flight()
    b.done = True
    assert not sends.in_flight()
