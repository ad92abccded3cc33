"""Per-phase timing for the prefill breakdown and the Chrome/Perfetto trace of ``dsaserve bench``.

``with phase("indexer_logits"):`` marks a region. Off by default (one attribute check per region). When
enabled, regions on CUDA are timed with CUDA events on the current stream (no host sync until
``collect``), on CPU with ``perf_counter``. Phases nest: a parent's time includes its children's, the
breakdown reports *exclusive* time per phase.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class _Region:
    name: str
    depth: int
    start: object       # torch.cuda.Event or float seconds
    end: object = None


class PhaseRecorder:
    """Collects timed regions of one process. Use the module-level ``RECORDER``."""

    def __init__(self):
        self.enabled = False
        self.cuda = False
        self._regions: list[_Region] = []
        self._depth = 0
        self._origin = None

    def enable(self, cuda: bool) -> None:
        self.enabled, self.cuda = True, cuda
        self.reset()

    def disable(self) -> None:
        self.enabled = False

    def reset(self) -> None:
        self._regions.clear()
        self._depth = 0
        self._origin = self._now()

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        region = _Region(name, self._depth, self._now())
        self._regions.append(region)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            region.end = self._now()

    def _ms(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def collect(self) -> list[tuple[str, int, float, float]]:
        """(name, depth, start_ms, duration_ms) of every closed region, relative to ``reset``."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for r in self._regions:
            if r.end is None:
                continue
            out.append((r.name, r.depth, self._ms(self._origin, r.start), self._ms(r.start, r.end)))
        return out

    def exclusive_ms(self) -> dict[str, float]:
        """Time per phase name, children subtracted (what the breakdown table shows)."""
        regions = sorted(self.collect(), key=lambda r: (r[2], r[1]))
        totals: dict[str, float] = {}
        stack: list[list] = []   # [name, depth, end, child_time]
        def close(entry):
            name, _, _, child, dur = entry
            totals[name] = totals.get(name, 0.0) + dur - child
        for name, depth, start, dur in regions:
            while stack and stack[-1][1] >= depth:
                close(stack.pop())
            if stack:
                stack[-1][3] += dur
            stack.append([name, depth, start + dur, 0.0, dur])
        while stack:
            close(stack.pop())
        return totals


RECORDER = PhaseRecorder()
phase = RECORDER.phase


def chrome_trace(regions_by_rank: dict[int, list[tuple[str, int, float, float]]], path: str) -> None:
    """Write a Chrome/Perfetto trace: one process row per rank, one slice per region."""
    events = []
    for rank, regions in regions_by_rank.items():
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for name, depth, start, dur in regions:
            events.append({"name": name, "ph": "X", "pid": rank, "tid": 0, "ts": start * 1e3, "dur": dur * 1e3,
                           "args": {"depth": depth}})
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
