"""ParallelState: the one object that owns every process group of a rank, and the comm counters.

world = PP x C ranks; rank r is stage r // C, CP index r % C.
  * stage group (C ranks): CP gathers of KV / indexer keys and MoE gather / reduce-scatter,
  * pp group: point-to-point links rank -> rank + C (NCCL: created with few CTAs, see sm_budget),
  * control groups (gloo, all ranks): step plans from rank 0, sampled tokens back to rank 0.
Every group is created with a timeout, so no collective waits forever. All of them are built on the
world's store (``rendezvous.world_store``), after every rank agreed on its settings with rank 0.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from dsaserve.parallel.layout import Layout
from dsaserve.parallel.rendezvous import agree_on_startup, world_store
from dsaserve.parallel.sm_budget import make_pp_group_options
from dsaserve.parallel.stage_comm import CommCounters, GroupStageComm

log = logging.getLogger(__name__)

# Control receivers block until the next plan arrives, which may be hours on an idle server; a dead
# peer still breaks the wait at once (the TCP connection closes), and a parent watchdog covers the rest.
CONTROL_TIMEOUT = timedelta(days=7)


class ParallelState:
    """All process groups of one rank. Create one per process; ``destroy()`` tears everything down."""

    def __init__(self, rank: int, layout: Layout, *, device: str, master_addr: str, master_port: int,
                 timeout_s: float, pp_comm_ctas: int = 1, env_init: bool = False, startup: dict | None = None):
        """``startup``: this rank's ``rendezvous.startup_summary``; every rank's is compared with rank 0's
        before any process group is made (a mismatch raises ``StartupMismatchError`` on every rank)."""
        self.rank = rank
        self.layout = layout
        self.view = layout.rank_view(rank)           # stage, CP index, peers: asked of the layout, not copied
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
        # torchrun: the store env:// would use (the node-0 agent's, or rank 0's); local spawn: rank 0 hosts it
        world_size = int(os.environ["WORLD_SIZE"]) if env_init else layout.world_size
        self.store = world_store(rank, world_size, master_addr, master_port, external=env_init, timeout_s=timeout_s)
        # more connections to the same store, for background threads (heartbeats)
        self.connect_store = lambda: world_store(rank, world_size, master_addr, master_port, external=env_init,
                                                 timeout_s=min(timeout_s, 10.0), client=True)
        self.summaries: dict[int, dict] = {}         # rank 0: every rank's start-up summary
        if startup is not None:
            self.summaries = agree_on_startup(self.store, rank, world_size, startup, timeout_s)
        world = list(range(layout.world_size))
        dist.init_process_group(self.backend, store=dist.PrefixStore("default_pg", self.store), rank=rank,
                                world_size=layout.world_size, timeout=timeout)
        # Every rank creates every group, in the same order (a torch.distributed rule).
        stage_groups = [dist.new_group(layout.stage_ranks(s), timeout=timeout) for s in range(layout.pp_size)]
        self.stage_group = stage_groups[self.view.stage]
        self.pp_group = None
        if layout.pp_size > 1:
            options = make_pp_group_options(pp_comm_ctas) if cuda else None
            self.pp_group = dist.new_group(world, timeout=timeout, pg_options=options)
        self.plan_group = dist.new_group(world, backend="gloo", timeout=CONTROL_TIMEOUT)
        self.result_group = dist.new_group(world, backend="gloo", timeout=CONTROL_TIMEOUT)
        self.stage_comm = GroupStageComm(self.stage_group, self.counters)

    # ---- pipeline links ---------------------------------------------------------------------------------
    def pp_isend(self, payload: torch.Tensor):
        """Send this rank's own (hidden, residual) shard [2, n, hidden] to its peer in the next stage."""
        self.counters.add("pp_send", payload.nbytes)
        return dist.isend(payload.contiguous(), self.view.next_rank, group=self.pp_group)

    def pp_irecv(self, payload: torch.Tensor):
        self.counters.add("pp_recv", payload.nbytes)
        return dist.irecv(payload, self.view.prev_rank, group=self.pp_group)

    def destroy(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # a broken group (dead peer) must not block shutdown
                log.debug("destroy_process_group failed: %s", e)
