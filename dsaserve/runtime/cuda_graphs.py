"""CUDA graphs of one rank's decode step, one per (batch-size bucket, block-table width class).

What a graph holds: this rank's whole stage forward for a static decode batch (``ForwardBatch.static``), and
on the last stage the logits too; whatever backends the model has (linear, experts, attention, indexer)
are inside. Its inputs are the ``DecodeInputs`` device views of (bucket, width) and, after the first stage,
static hidden / residual buffers that the received activations are copied into. Buckets: 1, 2, 4, ...,
max_num_seqs; a step of n requests replays the smallest bucket >= n with the rows past n as padding.
Widths (``width_classes``): block-table widths of GRAPH_WIDTH_KEYS keys, 4x more each, and the width that
covers max_model_len; a step replays the narrowest one that holds its longest request. The indexer's
decode logits and top-k span the whole width (a static shape), so a short-context step on a long-context
server does not pay for max_model_len, and wide rows can take the top-k that scales with the width
(``model.indexer.DECODE_RADIX_MAX_KEYS``). Sampling runs after the replay, eagerly (it is sync-free too).

Capture (at engine start, before the engine reports ready): a preflight forward of the largest bucket
under ``torch.cuda.set_sync_debug_mode("error")`` finds a backend that synchronizes with the host (e.g.
the loop experts, which size their per-expert batches on the host) and names it; then buckets are captured
largest first into one memory pool, each after an eager warm-up run (Triton compiles, cuBLAS workspaces).
Under context parallelism every CP rank of the stage captures the same buckets in the same order (decode
tokens are replicated, the MoE partials are all-reduced inside the graph), and the ranks agree after the
preflight and after each bucket (``agree``), so either all of them replay a bucket or none does. Any
failure leaves the decode step eager, with the reason logged.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable

import torch

from dsaserve.runtime.decode_inputs import DecodeInputs, DecodeViews

log = logging.getLogger(__name__)
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))    # .../dsaserve
GRAPH_WIDTH_KEYS = 32768    # keys of the narrowest width class (then x4 per class, then the full width)
GRAPH_WIDTH_FACTOR = 4


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... below max_num_seqs, and max_num_seqs itself."""
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return out + [max_num_seqs]


def width_classes(max_pages: int, page_size: int, first_keys: int | None = None) -> list[int]:
    """Block-table widths (pages) to capture: first_keys (default GRAPH_WIDTH_KEYS) keys, x GRAPH_WIDTH_FACTOR per
    class below max_pages, and max_pages itself."""
    out, pages = [], -(-(first_keys or GRAPH_WIDTH_KEYS) // page_size)
    while pages < max_pages:
        out.append(pages)
        pages *= GRAPH_WIDTH_FACTOR
    return out + [max_pages]


def _sync_culprit(exc: BaseException) -> str:
    """The innermost dsaserve frame of a sync-debug error: where the host sync happens."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if os.path.abspath(f.filename).startswith(_PACKAGE + os.sep)]
    where = "?"
    if frames:
        f = frames[-1]
        where = f"{os.path.relpath(os.path.abspath(f.filename), os.path.dirname(_PACKAGE))}:{f.lineno} ({f.line})"
    return f"the decode step synchronizes with the host at {where}"


class DecodeGraphs:
    """Captures and replays the decode graphs of one rank (see the module docstring)."""

    def __init__(self, model, cache, inputs: DecodeInputs, width: int, buckets: list[int], *, hidden_size: int,
                 dtype: torch.dtype, device: torch.device, widths: list[int] | None = None):
        self.model, self.cache, self.inputs, self.width = model, cache, inputs, width
        self.buckets = sorted(buckets)
        self.widths = sorted(widths or [width])               # block-table width classes (pages), max = width
        self.first, self.last = model.is_first, model.is_last
        self.device = device
        rows = max(buckets)
        # later stages: the received activations are copied here before a replay (rows past n stay finite)
        self.hidden_in = None if self.first else torch.zeros(rows, hidden_size, dtype=dtype, device=device)
        self.residual_in = None if self.first else torch.zeros(rows, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}   # (rows, width) ->
        self.reason: str | None = None          # why decode runs eagerly (None while graphs are in use)
        self.report: dict = {}

    # ---- capture --------------------------------------------------------------------------------------
    def _forward(self, views: DecodeViews, rows: int):
        hidden = None if self.first else self.hidden_in[:rows]
        residual = None if self.first else self.residual_in[:rows]
        h, r = self.model(views.batch(self.inputs.page_size), self.cache,
                          input_ids=views.input_ids if self.first else None, hidden=hidden, residual=residual)
        return h, r, (self.model.compute_logits(h, r) if self.last else None)

    def _preflight(self) -> str | None:
        """Run the largest bucket eagerly at every width (the top-k differs by width) with host syncs turned
        into errors -> why not capturable, or None."""
        rows = max(self.buckets)
        for width in self.widths:
            views = self.inputs.stage_padding(rows, width)
            torch.cuda.synchronize(self.device)
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                self._forward(views, rows)
            except RuntimeError as e:
                if "synchroniz" not in str(e):
                    raise
                return _sync_culprit(e)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
            torch.cuda.synchronize(self.device)
        return None

    def capture(self, agree: Callable[[bool], bool]) -> dict:
        """Capture every bucket (or none). ``agree(ok)`` -> True iff every CP rank of the stage is ok."""
        t0 = time.perf_counter()
        # cached blocks freed by the allocator in between would otherwise show up as negative memory
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free0, _ = torch.cuda.mem_get_info(self.device)
        reason = self._preflight()
        if not agree(reason is None):
            self.reason = reason or "another CP rank of this stage cannot capture its decode step"
        pool = None
        for width, rows in sorted(((w, b) for w in self.widths for b in self.buckets), reverse=True):
            if self.reason is not None:
                break
            views = self.inputs.stage_padding(rows, width)
            self._forward(views, rows)                          # warm-up: compiles, workspaces, allocator
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            failure = None
            try:
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(views, rows)
            except RuntimeError as e:
                failure = f"capturing the {rows}-row, {width}-page decode graph failed: {str(e).splitlines()[0]}"
                torch.cuda.synchronize(self.device)
            if not agree(failure is None):
                self.reason = failure or "another CP rank of this stage failed to capture its decode graph"
                break
            pool = graph.pool()
            self.graphs[(rows, width)] = (graph, out)
        if self.reason is not None:
            self.graphs.clear()
        self.graphs = dict(sorted(self.graphs.items()))          # ascending: key_for takes the first fit
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()                                 # what the graphs hold, not the warm-up's cache
        free1, _ = torch.cuda.mem_get_info(self.device)
        self.report = {"buckets": sorted({r for r, _ in self.graphs}), "width_pages": self.width,
                       "width_classes": sorted({w for _, w in self.graphs}),
                       "capture_s": round(time.perf_counter() - t0, 3),
                       "memory_mib": round((free0 - free1) / 2**20, 1), "eager_reason": self.reason}
        return self.report

    # ---- replay ---------------------------------------------------------------------------------------
    def bucket_for(self, n: int) -> int | None:
        """The smallest captured batch-size bucket that holds ``n`` rows (None: run eagerly)."""
        return next((b for b, _ in self.graphs if b >= n), None)    # captured in ascending order (see capture)

    def key_for(self, n: int, pages: int) -> tuple[int, int] | None:
        """The graph of a step of ``n`` rows whose longest block table has ``pages`` pages: the smallest bucket,
        then the narrowest width, that hold it (None: run eagerly)."""
        return next(((b, w) for b, w in self.graphs if b >= n and w >= pages), None)

    def replay(self, key: tuple[int, int], n: int, hidden: torch.Tensor | None, residual: torch.Tensor | None):
        """Run the (rows, width) graph on the staged inputs (and the received activations [n, hidden] after the
        first stage) -> (hidden, residual) [n, hidden] and, on the last stage, logits [n, vocab] fp32."""
        graph, (h, r, logits) = self.graphs[key]
        if not self.first:
            self.hidden_in[:n].copy_(hidden)
            self.residual_in[:n].copy_(residual)
        graph.replay()
        return h[:n], r[:n], (logits[:n] if logits is not None else None)
