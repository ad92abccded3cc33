"""Per-step attention metadata: what one rank's slice of a batch looks like to the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class IndexerLaunches:
    """Indexer kernel launches of one step on this rank (``Indexer.select_kernels``), how many of them ran on a
    reserved SM budget (``ForwardBatch.indexer_num_sms`` set: a PP transfer was in flight), and the rows the
    threshold top-k had to redo exactly (a device counter: reading it is a sync, so only ``stats()`` does)."""

    launches: int = 0
    reserved: int = 0
    redo_rows: torch.Tensor | None = None  # int64 [1] on the device, made on first use

    def add(self, num_sms: int | None) -> None:
        self.launches += 1
        self.reserved += num_sms is not None

    def redo_counter(self, device: torch.device) -> torch.Tensor:
        if self.redo_rows is None:
            self.redo_rows = torch.zeros(1, dtype=torch.int64, device=device)
        return self.redo_rows


@dataclass
class ForwardBatch:
    """Everything a pipeline stage needs to run one step on this rank's tokens.

    Tokens here are this rank's *local* tokens (its CP shard of a prefill, or every decode token).
    Keys are always read back from the paged cache, so chunked prefill, CP prefill and decode share
    one attention path: a query at position p of request r sees keys 0..p of r.

    A *static* batch (``static=True``, decode only, built by ``runtime.decode_inputs``) is the
    CUDA-graph-safe form of a decode step: row i is request i, every tensor has a shape fixed by the
    batch-size bucket and the block-table width, padding rows write to the cache's sink slot and see no
    keys (``context_lens`` 0), and ``req_seq_lens`` is empty. Modules must then read nothing on the host:
    no masks that size their output, no ``.item()``, no per-request Python loops (the graph replays the
    same kernels for other values).
    """

    positions: torch.Tensor          # [n] int64, true global positions (0 for padding)
    token_req: torch.Tensor          # [n] int64, index of the token's request in this batch (-1 = padding)
    req_seq_lens: list[int]          # per request: number of cached keys after this step's writes
    block_tables: torch.Tensor       # [n_req, max_pages] int64 page ids (same on every rank)
    write_slots: torch.Tensor        # [n] int64 cache slot of each local token (-1 = padding, never written)
    gathered_write_slots: torch.Tensor | None = None  # [C*n] slots in rank-major gathered order (CP prefill)
    is_decode: bool = False
    page_size: int = 64
    static: bool = False             # a fixed-shape decode batch (see above)
    context_lens: torch.Tensor | None = None  # static: [n] int32 keys row i sees, its own included (0 = padding)
    # SMs the persistent indexer kernels may use (None = all): a rank with a PP recv or send in flight leaves
    # the SMs that the pending NCCL kernel holds (see dsaserve.parallel.sm_budget).
    indexer_num_sms: int | None = None
    indexer_launches: IndexerLaunches = field(default_factory=IndexerLaunches)   # counted by the indexer
    # Scratch shared between layers of one step (GLM "shared" indexer layers reuse the last top-k).
    scratch: dict = field(default_factory=dict)
    # Host copies of ``positions`` / ``token_req`` (CPU int64 [n]) when the runner built them there: the
    # per-request token lists and key ranges then come from the host, with no device->host sync per layer.
    host_positions: torch.Tensor | None = None
    host_token_req: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_reqs(self) -> int:
        return len(self.req_seq_lens)

    def key_slots(self, req: int) -> torch.Tensor:
        """Cache slots of keys 0..seq_len-1 of request ``req`` -> [seq_len] int64 (the same for every layer)."""
        cached = self.scratch.setdefault("key_slots", {})
        if req not in cached:
            pos = torch.arange(self.req_seq_lens[req], device=self.block_tables.device)
            cached[req] = self.block_tables[req, pos // self.page_size] * self.page_size + pos % self.page_size
        return cached[req]

    def req_token_index(self) -> list[torch.Tensor]:
        """Per request: indices of its local tokens (cached on first use; from the host copies when given)."""
        if "req_token_index" not in self.scratch:
            host = self.req_token_index_host()
            if host is not None:
                dev = self.positions.device
                self.scratch["req_token_index"] = [i.to(dev, non_blocking=True) for i in host]
            else:
                self.scratch["req_token_index"] = [
                    (self.token_req == r).nonzero(as_tuple=True)[0] for r in range(self.num_reqs)
                ]
        return self.scratch["req_token_index"]

    def req_token_index_host(self) -> list[torch.Tensor] | None:
        """``req_token_index`` on the host (CPU int64 tensors), or None without host copies."""
        if self.host_token_req is None:
            return None
        if "req_token_index_host" not in self.scratch:
            self.scratch["req_token_index_host"] = [
                (self.host_token_req == r).nonzero(as_tuple=True)[0] for r in range(self.num_reqs)
            ]
        return self.scratch["req_token_index_host"]

    def req_token_span(self, req: int) -> tuple[int, int] | None:
        """(a, b) when request ``req``'s local tokens are exactly rows a..b-1 of the batch (a request's chunk
        without CP, or with a contiguous CP split), from the host copies; else None (also without them). Lets
        per-request work take row slices (views) instead of gathers and scatters."""
        host = self.req_token_index_host()
        if host is None:
            return None
        spans = self.scratch.get("req_token_span")
        if spans is None:
            spans = []
            for idx in host:
                n = idx.numel()
                a = int(idx[0]) if n else 0
                contiguous = n > 0 and torch.equal(idx, torch.arange(a, a + n, dtype=idx.dtype))
                spans.append((a, a + n) if contiguous else None)
            self.scratch["req_token_span"] = spans
        return spans[req]

    def host_tokens_of(self, reqs: list[int]) -> torch.Tensor | None:
        """Indices of the local tokens of requests ``reqs`` (in request order), on the device, built on the
        host; None without host copies."""
        host = self.req_token_index_host()
        if host is None:
            return None
        key = ("tokens_of", tuple(reqs))                                         # the same for every layer
        if key not in self.scratch:
            idx = torch.cat([host[r] for r in reqs]) if reqs else torch.zeros(0, dtype=torch.long)
            self.scratch[key] = idx.to(self.positions.device, non_blocking=True)
        return self.scratch[key]
