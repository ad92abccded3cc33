"""The stage's collectives: what ``model.parallelize`` needs from a CP group, over torch.distributed.

Every call counts its bytes by kind (cp_kv_gather, cp_index_gather, moe_gather, moe_scatter,
moe_allreduce, pp_gather) in ``CommCounters``, which ``llm.stats()`` reports per rank.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
import torch.distributed as dist

# torch 2.13 renames these collectives (*_single) but 2.11 lacks the new names: keep the old ones, quietly.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", category=FutureWarning)


class CommCounters:
    """Bytes moved by this rank, by kind: pp_send / pp_recv / cp_kv_gather / cp_index_gather / moe_* ."""

    def __init__(self):
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1

    def snapshot(self) -> dict:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls)}

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def _as_wire(x: torch.Tensor) -> torch.Tensor:
    """fp8 goes over the wire as bytes (not every backend reduces or gathers float8)."""
    return x.view(torch.uint8) if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else x


class GroupStageComm:
    """``model.parallelize.StageComm`` over the stage's process group, counting the bytes each call receives
    from / sends to peers. ``size`` is the group's (the stage's C ranks)."""

    def __init__(self, group, counters: CommCounters):
        self.group, self.counters = group, counters
        self.size = dist.get_world_size(group)

    def all_gather_tokens(self, x, kind):
        wire = _as_wire(x.contiguous())
        out = torch.empty((self.size * wire.shape[0],) + tuple(wire.shape[1:]), dtype=wire.dtype, device=wire.device)
        dist.all_gather_into_tensor(out, wire, group=self.group)
        self.counters.add(kind, wire.nbytes * (self.size - 1))             # received from peers
        return out.view(x.dtype) if wire.dtype != x.dtype else out

    def reduce_scatter_tokens(self, x, kind):
        x = x.contiguous()
        out = torch.empty((x.shape[0] // self.size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, group=self.group)
        self.counters.add(kind, out.nbytes * (self.size - 1))              # partials sent to peers
        return out

    def all_reduce(self, x, kind):
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        self.counters.add(kind, x.nbytes * (self.size - 1) // self.size * 2)
        return x
