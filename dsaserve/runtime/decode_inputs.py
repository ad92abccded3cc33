"""A decode step's inputs in persistent buffers: filled on the host, one host->device copy, fixed views.

Every tensor a decode step reads (token ids, positions, cache write slots, context lengths, block tables,
sampling parameters) lives in one byte buffer on the device, at offsets fixed by (rows, block-table width).
The host fills a staging copy of it (pinned memory on CUDA, two of them used in turn so the next step can
be filled while the previous copy is still in flight) and sends it in one non-blocking copy. The model
reads the device views, so a CUDA graph captured on the views of (rows, width) replays any later step
staged with the same (rows, width). While the device runs a decode step, ``stage_ahead`` fills the staging
buffer for the step that most likely follows (every request one token further); when the next step is that
one, staging it only writes its token ids (the host's per-step work then hides behind the GPU's).

Rows past the step's requests are padding: token 0, position 0, no keys (context length 0), greedy, no
penalties (their token-count updates go to the table's sink row), and their cache writes go to the cache's
sink slot (``KVCache.sink_slot``), which no request reads.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from dsaserve.model.batch import ForwardBatch
from dsaserve.runtime.plan import PlanEntry
from dsaserve.runtime.sampler import SamplingTensors

_ALIGN = 256    # bytes: every field starts aligned (Triton specializes pointers on 16-byte alignment)
# (name, dtype, columns per row): one [rows] or [rows, width] field each; "width" = the block-table width
_FIELDS = (
    ("input_ids", torch.int64, 1), ("positions", torch.int64, 1), ("write_slots", torch.int64, 1),
    ("token_req", torch.int64, 1), ("top_k", torch.int64, 1), ("noise_key", torch.int64, 1),
    ("counts_slot", torch.int64, 1), ("context_lens", torch.int32, 1), ("temperature", torch.float32, 1),
    ("top_p", torch.float32, 1), ("presence", torch.float32, 1), ("frequency", torch.float32, 1),
    ("repetition", torch.float32, 1), ("block_tables", torch.int32, "width"),
)
_NP = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}
_VIEW_CACHE = 64  # (rows, width) layouts whose views are kept (eager steps vary the width; graphs need few)


@lru_cache(maxsize=_VIEW_CACHE)   # read on every decode step; callers must not change the returned dict
def _layout(rows: int, width: int) -> tuple[dict[str, tuple[int, torch.dtype, tuple[int, ...], int]], int]:
    """Field -> (byte offset, dtype, shape, bytes) for (rows, width), and the bytes used."""
    out, off = {}, 0
    for name, dtype, cols in _FIELDS:
        shape = (rows, width) if cols == "width" else (rows,)
        size = int(np.prod(shape)) * dtype.itemsize
        out[name] = (off, dtype, shape, size)
        off += -(-size // _ALIGN) * _ALIGN
    return out, off


@dataclass
class DecodeViews:
    """The device tensors of one (rows, width) layout: always the same memory for the same layout (which is
    what a graph captured on them replays), the same objects while the layout is in the cache."""

    rows: int
    width: int
    input_ids: torch.Tensor          # [rows] int64 (0 = padding)
    positions: torch.Tensor          # [rows] int64
    write_slots: torch.Tensor        # [rows] int64 (padding: the sink slot)
    token_req: torch.Tensor          # [rows] int64 row index (-1 = padding)
    context_lens: torch.Tensor       # [rows] int32 keys the row sees, its own included (0 = padding)
    block_tables: torch.Tensor       # [rows, width] int32 page ids
    sampling: SamplingTensors        # [rows] each

    def batch(self, page_size: int) -> ForwardBatch:
        """A fresh static ForwardBatch over these views (fresh: its scratch is per forward)."""
        return ForwardBatch(positions=self.positions, token_req=self.token_req, req_seq_lens=[],
                            block_tables=self.block_tables, write_slots=self.write_slots, is_decode=True,
                            page_size=page_size, static=True, context_lens=self.context_lens)


@dataclass
class _Ahead:
    """A staging buffer filled by ``DecodeInputs.stage_ahead``: the predicted entries (token ids 0) of (rows,
    width), and the buffer's token-id field, written when the prediction holds."""

    turn: int
    rows: int
    width: int
    entries: list[PlanEntry]
    ids: np.ndarray                  # [rows] int64 view into the staging buffer

    def matches(self, entries: list[PlanEntry], rows: int, width: int) -> bool:
        """Whether staging ``entries`` would write what is in the buffer (token ids aside): the fields that
        ``_fill`` reads (position, block table, sampling parameters), entry by entry."""
        if rows != self.rows or width != self.width or len(entries) != len(self.entries):
            return False
        for e, p in zip(entries, self.entries):
            s = e.sample
            if (len(e.token_ids) != 1 or e.start_pos != p.start_pos or s is None or s.allowed_bitmask is not None
                    or s != p.sample or e.block_table != p.block_table):
                return False
        return True


class DecodeInputs:
    """Staging and device buffers for decode steps of up to ``max_rows`` rows and ``max_width`` pages."""

    def __init__(self, max_rows: int, max_width: int, device: torch.device, page_size: int, sink_slot: int):
        self.max_rows, self.max_width = max_rows, max_width
        self.device, self.page_size, self.sink_slot = device, page_size, sink_slot
        _, nbytes = _layout(max_rows, max_width)
        pinned = device.type == "cuda"
        # zeroed: block-table entries past a row's pages are read (masked) by the gathered-keys path, so they
        # must always be valid page ids
        self.device_buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._host = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(2 if pinned else 1)]
        # per staging buffer: the event recorded after the last copy that read it (created at the first copy,
        # then re-recorded: a step constructs no event)
        self._copied: list[torch.cuda.Event | None] = [None] * len(self._host)
        self._turn = 0
        self._ahead: _Ahead | None = None       # the next step as predicted by stage_ahead
        self.ahead_hits = 0                     # steps staged ahead (only their token ids written in stage)
        self.ahead_misses = 0                   # predictions the real step did not match
        self._views: OrderedDict[tuple[int, int], DecodeViews] = OrderedDict()

    def views(self, rows: int, width: int) -> DecodeViews:
        key = (rows, width)
        if key in self._views:
            self._views.move_to_end(key)
        else:
            if rows > self.max_rows or width > self.max_width:
                raise ValueError(f"decode step of {rows} rows x {width} pages exceeds the buffers "
                                 f"({self.max_rows} x {self.max_width})")
            t = self._typed(self.device_buf, rows, width)
            self._views[key] = DecodeViews(
                rows, width, t["input_ids"], t["positions"], t["write_slots"], t["token_req"], t["context_lens"],
                t["block_tables"], SamplingTensors(*(t[name] for name in SamplingTensors.FIELDS)))
            if len(self._views) > _VIEW_CACHE:
                self._views.popitem(last=False)
        return self._views[key]

    @staticmethod
    def _typed(buf: torch.Tensor, rows: int, width: int) -> dict[str, torch.Tensor]:
        layout, _ = _layout(rows, width)
        out = {}
        for name, (off, dtype, shape, n) in layout.items():
            out[name] = buf[off:off + n].view(dtype).view(shape)
        return out

    def stage(self, entries: list[PlanEntry], rows: int, width: int) -> DecodeViews:
        """Fill the staging buffer with ``entries`` (one decode token each) padded to ``rows`` rows and
        ``width`` block-table columns, send it to the device, and return the device views. When
        ``stage_ahead`` predicted exactly this step, only the token ids are written now."""
        b = len(entries)
        if b > rows:
            raise ValueError(f"{b} decode requests do not fit {rows} rows")
        ahead, self._ahead = self._ahead, None
        turn = self._turn
        _, nbytes = _layout(rows, width)
        if ahead is not None and ahead.turn == turn and ahead.matches(entries, rows, width):
            self.ahead_hits += 1
            ahead.ids[:b] = [e.token_ids[0] for e in entries]
        else:
            if ahead is not None:
                self.ahead_misses += 1
            self._wait_turn(turn, block=True)
            self._fill(self._host[turn], entries, rows, width)
        self._send(turn, nbytes)
        return self.views(rows, width)

    def stage_ahead(self, entries: list[PlanEntry], rows: int, width: int) -> bool:
        """Fill the staging buffer for the decode step that follows ``entries`` when every request goes on by one
        token (position + 1, the same pages, output index + 1), while the device still runs the current step:
        the host work of the next step overlaps this one's GPU time. The next ``stage`` checks the prediction
        against the real entries (all that ``stage`` reads of them, token ids aside) and writes only their
        token ids when it holds, else fills the buffer again. Returns whether a prediction was made: none
        when a request needs a new page next, has a grammar mask (it changes per token) or forks, or when
        the staging buffer is still being copied from."""
        self._ahead = None
        ps, predicted = self.page_size, []
        for e in entries:
            s = e.sample
            if (len(e.token_ids) != 1 or s is None or s.allowed_bitmask is not None or e.forks
                    or (e.start_pos + 1) // ps >= len(e.block_table)):
                return False
            predicted.append(PlanEntry(e.req_id, [0], e.start_pos + 1, list(e.block_table),
                                       replace(s, output_index=s.output_index + 1), counts=e.counts))
        turn = self._turn
        if len(predicted) > rows or not self._wait_turn(turn, block=False):
            return False
        self._fill(self._host[turn], predicted, rows, width)
        layout, _ = _layout(rows, width)
        off, _, _, n = layout["input_ids"]
        ids = self._host[turn].numpy()[off:off + n].view(np.int64)
        self._ahead = _Ahead(turn, rows, width, predicted, ids)
        return True

    def _wait_turn(self, turn: int, block: bool) -> bool:
        """Whether staging buffer ``turn`` may be written: the copy that last read it is done (``block``: wait)."""
        ev = self._copied[turn]
        if ev is None or ev.query():
            return True
        if block:
            ev.synchronize()           # (in practice never: the step after that copy already synced)
        return block

    def _send(self, turn: int, nbytes: int) -> None:
        self._turn = (turn + 1) % len(self._host)
        self.device_buf[:nbytes].copy_(self._host[turn][:nbytes], non_blocking=True)
        if self.device.type == "cuda":
            ev = self._copied[turn] or torch.cuda.Event()
            ev.record()
            self._copied[turn] = ev

    def _fill(self, host: torch.Tensor, entries: list[PlanEntry], rows: int, width: int) -> None:
        """Write ``entries`` padded to (rows, width) into the staging buffer ``host``."""
        b = len(entries)
        layout, _ = _layout(rows, width)
        raw = host.numpy()
        f = {name: raw[off:off + n].view(_NP[dt]).reshape(shape) for name, (off, dt, shape, n) in layout.items()}
        ps = self.page_size
        pos = [e.start_pos for e in entries]
        f["input_ids"][:b] = [e.token_ids[0] for e in entries]
        f["positions"][:b] = pos
        f["write_slots"][:b] = [e.block_table[p // ps] * ps + p % ps for e, p in zip(entries, pos)]
        f["token_req"][:b] = np.arange(b)
        f["context_lens"][:b] = [p + 1 for p in pos]
        for name, values in zip(SamplingTensors.FIELDS, SamplingTensors.host_values([e.sample for e in entries])):
            f[name][:b] = values
        bt = f["block_tables"]
        for r, e in enumerate(entries):
            n = len(e.block_table)
            bt[r, :n] = e.block_table
            bt[r, n:] = 0
        # padding rows
        for name, value in (("input_ids", 0), ("positions", 0), ("write_slots", self.sink_slot), ("token_req", -1),
                            ("context_lens", 0), ("temperature", 0.0), ("top_k", 0), ("top_p", 1.0),
                            ("noise_key", 0), ("counts_slot", -1), ("presence", 0.0), ("frequency", 0.0),
                            ("repetition", 1.0)):
            f[name][b:] = value
        bt[b:] = 0

    def stage_padding(self, rows: int, width: int) -> DecodeViews:
        """Every row padding (graph capture and warm-up)."""
        return self.stage([], rows, width)
