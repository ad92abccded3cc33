"""Heartbeats: rank 0 notices a worker that stopped (SIGSTOP), froze, died or became unreachable, and
names it, while its own main thread may be blocked in a collective with that very worker.

Each worker runs a ``HeartbeatSender`` thread that writes ``hb/<rank>`` = "<seq> <step in progress or -1>
<last finished step>" to the world's store (``parallel/rendezvous.py``) every ``interval_s``, over its
own connection; a long step does not delay it (torch releases the GIL while it computes). Rank 0's
``HeartbeatMonitor`` thread reads them: a rank whose sequence number has not moved for ``timeout_s``
(measured on rank 0's clock, so node clocks need not agree) is reported, and so is an error a worker
published under ``error/<rank>`` (under torchrun that is how rank 0 learns a worker's traceback). A worker
that cannot reach the store for ``timeout_s`` (rank 0 or the launcher hosting it is gone) exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dsaserve.parallel.rendezvous import dsaserve_keys

log = logging.getLogger(__name__)


# Seconds a beat may be late before rank 0 counts the rank as quiet when explaining a failure (a killed
# worker goes quiet; live ones beat every interval), and how long an error report waits for that.
QUIET_S = 1.0
ECHO_GRACE_S = 1.5


def heartbeat_interval(timeout_s: float) -> float:
    """Several beats per timeout, at most 4 a second."""
    return max(0.05, min(0.25, timeout_s / 8))


@dataclass
class StepProgress:
    """What a rank is doing, as its heartbeat reports it (written by its main thread, read by the sender)."""

    current: int = -1        # step id being run, -1 between steps
    last_done: int = -1      # last step id finished


class HeartbeatSender:
    """Worker side: a daemon thread beating into the store until ``stop()``; ``on_lost(message)`` when the
    store has been unreachable for ``timeout_s`` (then the thread ends)."""

    def __init__(self, connect: Callable[[], object], rank: int, progress: StepProgress, timeout_s: float,
                 on_lost: Callable[[str], None]):
        self.connect, self.rank, self.progress = connect, rank, progress
        self.timeout_s, self.on_lost = timeout_s, on_lost
        self.interval_s = heartbeat_interval(timeout_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{rank}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        store, seq, failing_since, error = None, 0, None, None
        while True:
            try:
                if store is None:
                    store = dsaserve_keys(self.connect())
                seq += 1
                p = self.progress
                store.set(f"hb/{self.rank}", f"{seq} {p.current} {p.last_done}")
                failing_since = None
            except Exception as e:  # noqa: BLE001 - the store's host is gone (or briefly unreachable)
                store, error = None, e
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.timeout_s:
                    if not self._stop.is_set():
                        self.on_lost(f"rank {self.rank} lost the world's store for {self.timeout_s:.0f} s ({error}): "
                                     "rank 0 or the launcher that hosts it is gone")
                    return
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()


@dataclass
class _Seen:
    seq: int | None
    changed_at: float            # rank 0's monotonic clock when seq last moved
    current: int = -1
    step_since: float = 0.0      # when ``current`` became the step in progress
    last_done: int = -1


class HeartbeatMonitor:
    """Rank 0 side: watches ``ranks``; ``problem`` becomes a message naming the first rank found silent for
    ``timeout_s`` or reporting an error (then ``on_problem(rank, message)`` is called once and the thread
    ends). ``where`` maps a rank to how messages name it ("rank 2 (host node-b, pid 4242)")."""

    def __init__(self, connect: Callable[[], object], ranks: list[int], where: Callable[[int], str],
                 timeout_s: float, on_problem: Callable[[int, str], None] | None = None):
        self.connect, self.ranks, self.where = connect, list(ranks), where
        self.timeout_s, self.on_problem = timeout_s, on_problem
        self.interval_s = heartbeat_interval(timeout_s)
        self.problem: str | None = None
        self._lock = threading.Lock()             # guards _seen, _errors
        now = time.monotonic()
        self._seen = {r: _Seen(None, now, step_since=now) for r in self.ranks}
        self._errors: dict[int, tuple[float, str]] = {}   # rank -> (when rank 0 saw it, message)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            store = dsaserve_keys(self.connect())
        except Exception as e:  # noqa: BLE001
            self._report(-1, f"rank 0 cannot reach the world's store to watch the heartbeats: {e}")
            return
        while not self._stop.wait(self.interval_s):
            try:
                self._poll(store)
            except Exception as e:  # noqa: BLE001 - the store lives in rank 0 or the node-0 agent
                if not self._stop.is_set():
                    self._report(-1, f"rank 0 lost the world's store while watching heartbeats: {e}")
                return
            if self.problem is not None:
                return

    def _poll(self, store) -> None:
        now = time.monotonic()
        for r in self.ranks:
            if r not in self._errors and store.check([f"error/{r}"]):
                message = store.get(f"error/{r}").decode(errors="replace")
                with self._lock:
                    self._errors.setdefault(r, (now, message))
            beat = store.get(f"hb/{r}").decode().split() if store.check([f"hb/{r}"]) else None
            with self._lock:
                seen = self._seen[r]
                if beat is not None and int(beat[0]) != seen.seq:
                    seq, current, done = (int(x) for x in beat)
                    if current != seen.current:
                        seen.current, seen.step_since = current, now
                    seen.seq, seen.changed_at, seen.last_done = seq, now, done
        with self._lock:
            first_error = min((t for t, _ in self._errors.values()), default=None)
        silent = self._silent(now, self.timeout_s)
        if silent:
            r = silent[0]
            self._report(r, self._errors[r][1] if r in self._errors else self._silent_message(r, now))
        elif first_error is not None and now - first_error > ECHO_GRACE_S:
            self._report(*self._cause(now))

    def _silent(self, now: float, quiet_s: float) -> list[int]:
        """Ranks whose heartbeat has not moved for ``quiet_s``, the longest silent first."""
        with self._lock:
            return [r for _, r in sorted((s.changed_at, r) for r, s in self._seen.items()
                                         if now - s.changed_at > quiet_s)]

    def _cause(self, now: float) -> tuple[int, str]:
        """After errors were reported: a rank that went quiet without reporting one was killed, and the
        others' errors ("connection closed by peer") are its echo; else the first error reported."""
        with self._lock:
            errors = dict(self._errors)
        for r in self._silent(now, QUIET_S):
            if r not in errors:
                return r, self._killed_message(r)
        r = min(errors, key=lambda k: errors[k][0])
        return r, errors[r][1]

    def _killed_message(self, rank: int) -> str:
        return (f"{self.where(rank)} stopped sending heartbeats without reporting an error: it was killed (its "
                "launcher died?) or its host went away")

    def _silent_message(self, rank: int, now: float) -> str:
        with self._lock:
            age = now - self._seen[rank].changed_at
        return (f"{self.where(rank)} has sent no heartbeat for {age:.0f} s (--heartbeat-timeout-s "
                f"{self.timeout_s:g}): its process is stopped (SIGSTOP?), frozen, killed, or its host is unreachable")

    def _report(self, rank: int, message: str) -> None:
        if self.problem is not None:
            return
        self.problem = message
        log.error("%s", message)
        if self.on_problem is not None:
            try:
                self.on_problem(rank, message)
            except Exception:  # noqa: BLE001
                log.exception("heartbeat problem callback failed")

    # ---- what rank 0 asks ------------------------------------------------------------------------------
    def diagnose(self) -> str | None:
        """Right after a failure rank 0 saw: the problem found so far, or a rank that went quiet without
        reporting an error (killed), or the first error a worker reported; None if nothing is known yet."""
        if self.problem is not None:
            return self.problem
        now = time.monotonic()
        with self._lock:
            has_errors = bool(self._errors)
        if has_errors:
            return self._cause(now)[1]
        silent = self._silent(now, QUIET_S)
        return self._killed_message(silent[0]) if silent else None

    def stuck_in_step(self, step_timeout_s: float) -> str | None:
        """A message naming the ranks that have been inside one step for more than ``step_timeout_s``."""
        now = time.monotonic()
        with self._lock:
            stuck = [(r, s.current, now - s.step_since) for r, s in self._seen.items()
                     if s.current >= 0 and now - s.step_since > step_timeout_s]
        if not stuck:
            return None
        first = min(stuck, key=lambda x: (x[1], x[0]))
        listing = ", ".join(f"{self.where(r)} in step {step} for {age:.0f} s" for r, step, age in stuck)
        return (f"steps are not finishing (--step-timeout {step_timeout_s:g} s): {listing}; the earliest is "
                f"rank {first[0]} (its heartbeat still runs: a hung collective or kernel?)")

    def stop(self) -> None:
        self._stop.set()
