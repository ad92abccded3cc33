"""Issue 14 items 2 and 9: heartbeats name a stopped worker quickly, and ranks started with different
settings fail in seconds naming the difference (start-up agreement through the world's store)."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from dsaserve import LLM, SamplingParams
from dsaserve.args import EngineArgs
from dsaserve.config import ModelConfig
from dsaserve.engine.types import EngineDeadError
from dsaserve.parallel.heartbeat import HeartbeatMonitor, HeartbeatSender, StepProgress
from dsaserve.parallel.layout import Layout
from dsaserve.parallel.rendezvous import (StartupMismatchError, agree_on_startup, publish_error, publish_startup_error,
                                          startup_summary)
from tests.parallel._util import LLM_DEFAULTS, free_port, prompt_ids
from tests.parallel.conftest import wait_all_gone

pytestmark = pytest.mark.timeout(180)


def _new_store():
    """A fresh TCPStore server in this process; returns (server, connect) (connect opens a client)."""
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, None, is_master=True, timeout=timedelta(seconds=10),
                           wait_for_workers=False, multi_tenant=True)
    return master, lambda: dist.TCPStore("127.0.0.1", port, None, is_master=False, timeout=timedelta(seconds=10))


@pytest.fixture
def store():
    master, connect = _new_store()
    yield connect
    del master


def _summary(ckpt: str, pp: int, cp: int, **options) -> dict:
    cfg = ModelConfig.from_hf(ckpt)
    args = EngineArgs(pp_size=pp, cp_size=cp, **options)
    return startup_summary(cfg, Layout.build(cfg, pp, cp), args, "torch.float32", 2048, 4)


def _agree_all(connect, summaries: dict[int, dict], timeout_s: float = 10.0) -> dict[int, object]:
    """Run agree_on_startup for every rank in its own thread; rank -> its return value or exception."""
    out: dict[int, object] = {}

    def one(rank: int) -> None:
        try:
            out[rank] = agree_on_startup(connect(), rank, len(summaries), summaries[rank], timeout_s)
        except Exception as e:  # noqa: BLE001
            out[rank] = e

    threads = [threading.Thread(target=one, args=(r,)) for r in summaries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_startup_agreement_names_the_mismatch(store, ds_ckpt):
    same = _summary(ds_ckpt, 2, 2)
    ok = _agree_all(store, {r: dict(same, pid=100 + r) for r in range(4)})
    assert set(ok[0]) == {0, 1, 2, 3} and ok[1] == {} and ok[3] == {}

    other = _summary(ds_ckpt, 1, 4, chunked_prefill_size=4096)
    master, connect = _new_store()                       # a new world
    t0 = time.monotonic()
    out = _agree_all(connect, {0: same, 1: same, 2: other, 3: other})
    assert time.monotonic() - t0 < 5
    for r in range(4):                                   # every rank fails, with the same message
        assert isinstance(out[r], StartupMismatchError), out[r]
        assert str(out[r]) == str(out[0])
    msg = str(out[0])
    assert "rank 2 (host" in msg and "rank 3 (host" in msg and "rank 1 " not in msg, msg
    assert "pp_size 1 vs 2" in msg and "cp_size 4 vs 2" in msg and "--chunked-prefill-size 4096 vs 8192" in msg, msg
    assert "same command with the same flags" in msg


def test_startup_error_of_one_rank_fails_the_world_at_once(store, ds_ckpt):
    same = _summary(ds_ckpt, 1, 2)
    publish_startup_error(store(), 1, "ConfigError: torchrun started 4 processes but pp_size x cp_size = 2")
    t0 = time.monotonic()
    with pytest.raises(StartupMismatchError, match=r"rank 1 \(host .*could not start: ConfigError: torchrun started 4"):
        agree_on_startup(store(), 0, 2, same, timeout_s=10)
    assert time.monotonic() - t0 < 5


def test_startup_agreement_times_out_naming_the_missing_rank(store, ds_ckpt):
    with pytest.raises(StartupMismatchError, match=r"ranks 1 did not start within 1 s"):
        agree_on_startup(store(), 0, 2, _summary(ds_ckpt, 1, 2), timeout_s=1)


def test_monitor_names_a_silent_rank_and_a_reported_error(store):
    progress = {r: StepProgress() for r in (1, 2, 3)}
    senders = {r: HeartbeatSender(store, r, progress[r], timeout_s=1.0, on_lost=lambda m: None) for r in (1, 2, 3)}
    found = []
    monitor = HeartbeatMonitor(store, [1, 2, 3], lambda r: f"rank {r} (host h)", timeout_s=1.0,
                               on_problem=lambda r, m: found.append(r))
    try:
        progress[2].current = 7
        time.sleep(0.6)
        assert monitor.problem is None and monitor.diagnose() is None
        assert monitor.stuck_in_step(0.3) is not None and "rank 2 (host h) in step 7" in monitor.stuck_in_step(0.3)
        assert monitor.stuck_in_step(30) is None
        senders[3].stop()                                   # rank 3 goes quiet (stopped / killed)
        deadline = time.monotonic() + 10
        while (monitor.problem is None or not found) and time.monotonic() < deadline:
            time.sleep(0.05)                                # the callback runs just after the problem is set
        assert found == [3], (found, monitor.problem)
        assert "rank 3 (host h) has sent no heartbeat" in monitor.problem and "--heartbeat-timeout-s 1" in monitor.problem
    finally:
        monitor.stop()
        for s in senders.values():
            s.stop()

    # a reported error is named, unless a rank went quiet without one (then the error is its echo)
    progress = {r: StepProgress() for r in (1, 2)}
    senders = {r: HeartbeatSender(store, r, progress[r], timeout_s=5.0, on_lost=lambda m: None) for r in (1, 2)}
    publish_error(store(), 1, "rank 1 failed: RuntimeError: Connection closed by peer")
    monitor = HeartbeatMonitor(store, [1, 2], lambda r: f"rank {r}", timeout_s=5.0)
    try:
        time.sleep(0.4)
        senders[2].stop()
        deadline = time.monotonic() + 10
        while monitor.problem is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert monitor.problem is not None and monitor.problem.startswith("rank 2 stopped sending heartbeats without"), \
            monitor.problem
    finally:
        monitor.stop()
        for s in senders.values():
            s.stop()


def test_stopped_worker_is_named_within_seconds(pool, ds_ckpt):
    """SIGSTOP a worker mid-generation: before, rank 0 waited in the collective for comm_timeout_s (120 s)
    and the error named no rank; now the heartbeat names it within seconds and the engine stops."""
    pool.shutdown()
    llm = LLM(ds_ckpt, pp_size=2, cp_size=1, heartbeat_timeout_s=2.0, **LLM_DEFAULTS)
    ex = llm.engine.executor
    pids = [p.pid for p in ex._procs]
    orig_submit, submitted, stopped_at = ex.submit, [], []

    def submit(plan):
        submitted.append(plan)
        if len(submitted) == 3:
            os.kill(pids[0], signal.SIGSTOP)
            stopped_at.append(time.monotonic())
        return orig_submit(plan)

    ex.submit = submit
    try:
        with pytest.raises(EngineDeadError) as info:
            llm.generate([prompt_ids(40)], SamplingParams(max_tokens=20, ignore_eos=True))
        took = time.monotonic() - stopped_at[0]
        msg = str(info.value)
        assert "rank 1 (host" in msg and "no heartbeat" in msg and "--heartbeat-timeout-s 2" in msg, msg
        assert took < 15, f"the stopped worker was named after {took:.1f} s"
        assert not llm.engine.is_healthy()
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        llm.shutdown()
    assert not wait_all_gone(pids, timeout_s=15)
