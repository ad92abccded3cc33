"""ParallelState: the one object that owns every process group of a rank, and the comm counters.

world = PP x C ranks; rank r is stage r // C, CP index r % C.
  * stage group (C ranks): CP gathers of KV / indexer keys and MoE gather / reduce-scatter,
  * pp group: point-to-point links rank -> rank + C (NCCL: created with few CTAs, see sm_budget),
  * control groups (gloo, all ranks): step plans from rank 0, sampled tokens back to rank 0.
Every group is created with a timeout, so no collective waits forever.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist

from dsaserve.model.parallelize import StageComm
from dsaserve.parallel.layout import Layout

log = logging.getLogger(__name__)
# torch 2.13 renames these collectives (*_single) but 2.11 lacks the new names: keep the old ones, quietly.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", category=FutureWarning)

# Control receivers block until the next plan arrives, which may be hours on an idle server; a dead
# peer still breaks the wait at once (the TCP connection closes), and a parent watchdog covers the rest.
CONTROL_TIMEOUT = timedelta(days=7)


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


class GroupStageComm(StageComm):
    """StageComm over a real process group, counting the bytes each call receives from / sends to peers."""

    def __init__(self, group, cp_rank: int, cp_size: int, counters: CommCounters):
        self.group, self.cp_rank, self.cp_size, self.counters = group, cp_rank, cp_size, counters

    def all_gather_tokens(self, x, kind):
        wire = _as_wire(x.contiguous())
        out = torch.empty((self.cp_size * wire.shape[0],) + tuple(wire.shape[1:]), dtype=wire.dtype, device=wire.device)
        dist.all_gather_into_tensor(out, wire, group=self.group)
        self.counters.add(kind, wire.nbytes * (self.cp_size - 1))             # received from peers
        return out.view(x.dtype) if wire.dtype != x.dtype else out

    def reduce_scatter_tokens(self, x, kind):
        x = x.contiguous()
        out = torch.empty((x.shape[0] // self.cp_size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, group=self.group)
        self.counters.add(kind, out.nbytes * (self.cp_size - 1))              # partials sent to peers
        return out

    def all_reduce(self, x, kind):
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        self.counters.add(kind, x.nbytes * (self.cp_size - 1) // self.cp_size * 2)
        return x


class ParallelState:
    """All process groups of one rank. Create one per process; ``destroy()`` tears everything down."""

    def __init__(self, rank: int, layout: Layout, *, device: str, master_addr: str, master_port: int,
                 timeout_s: float, pp_comm_ctas: int = 1, env_init: bool = False):
        self.rank = rank
        self.layout = layout
        self.world_size = layout.world_size
        self.stage = layout.stage_of(rank)
        self.cp_rank = layout.cp_rank_of(rank)
        self.cp_size = layout.cp_size
        self.pp_size = layout.pp_size
        self.pp_comm_ctas = pp_comm_ctas
        self.counters = CommCounters()
        cuda = str(device).startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.backend = "nccl" if cuda else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if dist.is_initialized():
            raise RuntimeError("a torch.distributed process group already exists in this process (is another "
                               "LLM / engine still running?): call its shutdown() before starting a new one")
        # torchrun: join its rendezvous store (env://); local spawn: rank 0 hosts a store at addr:port
        init = "env://" if env_init else f"tcp://{master_addr}:{master_port}"
        dist.init_process_group(self.backend, init_method=init, rank=rank, world_size=self.world_size, timeout=timeout)
        # Every rank creates every group, in the same order (a torch.distributed rule).
        stage_groups = [dist.new_group(layout.stage_ranks(s), timeout=timeout) for s in range(self.pp_size)]
        self.stage_group = stage_groups[self.stage]
        self.pp_group = None
        if self.pp_size > 1:
            options = None
            if cuda:
                from dsaserve.parallel.sm_budget import make_pp_group_options

                options = make_pp_group_options(pp_comm_ctas)
            self.pp_group = dist.new_group(list(range(self.world_size)), timeout=timeout, pg_options=options)
        self.plan_group = dist.new_group(list(range(self.world_size)), backend="gloo", timeout=CONTROL_TIMEOUT)
        self.result_group = dist.new_group(list(range(self.world_size)), backend="gloo", timeout=CONTROL_TIMEOUT)
        self.stage_comm = GroupStageComm(self.stage_group, self.cp_rank, self.cp_size, self.counters)

    # ---- who is where --------------------------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp_size - 1

    @property
    def prev_rank(self) -> int:
        return self.rank - self.cp_size

    @property
    def next_rank(self) -> int:
        return self.rank + self.cp_size

    def last_stage_ranks(self) -> list[int]:
        return self.layout.stage_ranks(self.pp_size - 1)

    # ---- pipeline links ---------------------------------------------------------------------------------
    def pp_isend(self, payload: torch.Tensor):
        """Send this rank's own (hidden, residual) shard [2, n, hidden] to its peer in the next stage."""
        self.counters.add("pp_send", payload.nbytes)
        return dist.isend(payload.contiguous(), self.next_rank, group=self.pp_group)

    def pp_irecv(self, payload: torch.Tensor):
        self.counters.add("pp_recv", payload.nbytes)
        return dist.irecv(payload, self.prev_rank, group=self.pp_group)

    def destroy(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # a broken group (dead peer) must not block shutdown
                log.debug("destroy_process_group failed: %s", e)
