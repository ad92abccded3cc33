"""The world's store and the start-up agreement: every rank runs the same layout, model and options.

Every rank connects to one torch.distributed ``TCPStore`` (rank 0 hosts it when dsaserve spawns the
ranks; under torchrun the agent of node 0 does, exactly as torch's env:// rendezvous decides). The
process groups are built on it, and dsaserve keeps a few keys of its own under ``dsaserve/<run>/``:

* ``startup/<rank>``: what the rank was started with (``startup_summary``: layout, model config, engine
  options, host, pid), or the error that stopped it before it could join;
* ``startup/verdict``: rank 0's comparison of all of them: "ok", or a message naming every mismatch;
* ``hb/<rank>`` and ``error/<rank>``: heartbeats and reported errors (``parallel/heartbeat.py``).

``agree_on_startup`` runs before any process group exists, so nodes started with different flags
(``--pp-size 2 --cp-size 2`` on one, ``--pp-size 1 --cp-size 4`` on the other) fail in seconds with a
message naming the difference, instead of hanging in the group set-up until a timeout.

Trust: the store and the control channel are not authenticated and carry pickled objects; run them on a
trusted network only (README, "Security").
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from datetime import timedelta

import torch.distributed as dist

from dsaserve.config import ConfigError

VERDICT_OK = "ok"
_POLL_S = 0.05


class StartupMismatchError(ConfigError):
    """The ranks of one world were started with different settings (or one of them could not start)."""


def run_prefix() -> str:
    """Key prefix of this run: a torchrun agent's store outlives a restart of its workers."""
    return f"dsaserve/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def world_store(rank: int, world_size: int, addr: str, port: int, *, external: bool, timeout_s: float,
                client: bool = False) -> dist.Store:
    """The TCPStore the world meets at. ``external`` (torchrun): torch's env:// rule decides who hosts it
    (the node-0 agent, or rank 0); otherwise rank 0 hosts it. ``client=True`` opens one more connection
    to it (e.g. for a background thread), never a server."""
    agent_hosts = external and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    master = rank == 0 and not agent_hosts and not client
    return dist.TCPStore(addr, port, world_size, is_master=master, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False, multi_tenant=master)


def dsaserve_keys(store: dist.Store) -> dist.Store:
    return dist.PrefixStore(run_prefix(), store)


def startup_summary(cfg, layout, args, dtype, max_model_len: int, world_size: int) -> dict:
    """What must be equal on every rank, plus where this rank runs (for messages)."""
    engine = dataclasses.asdict(args)
    engine.pop("master_port", None)                          # only rank 0's matters
    engine["device"] = str(engine.get("device", "cpu")).split(":")[0]   # cuda:3 on one node = cuda
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "world_size": world_size,
        "layout": {"pp_size": layout.pp_size, "cp_size": layout.cp_size,
                   "stage_layers": [[r.start, r.stop] for r in layout.stage_layers]},
        "model": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "engine": json.loads(json.dumps(engine, default=str)),
        "dtype": str(dtype), "max_model_len": int(max_model_len),
    }


def _where(rank: int, summary: dict) -> str:
    return f"rank {rank} (host {summary.get('host', '?')}, pid {summary.get('pid', '?')})"


def describe_mismatch(mine: dict, ref: dict) -> list[str]:
    """Each setting where a rank's startup summary ``mine`` differs from rank 0's ``ref``, as 'name X vs Y'."""
    out = []
    if mine.get("world_size") != ref.get("world_size"):
        out.append(f"world size {mine.get('world_size')} vs {ref.get('world_size')}")
    for section, label in (("layout", "{}"), ("engine", "--{}"), ("model", "model config {}")):
        a, b = mine.get(section, {}), ref.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                name = label.format(key.replace("_", "-") if section == "engine" else key)
                out.append(f"{name} {a.get(key)!r} vs {b.get(key)!r}")
    for key in ("dtype", "max_model_len"):
        if mine.get(key) != ref.get(key):
            out.append(f"{key} {mine.get(key)!r} vs {ref.get(key)!r}")
    return out


def publish_startup_error(store: dist.Store, rank: int, message: str) -> None:
    """A rank that cannot start (bad flags on its node) tells rank 0, which fails the whole world at once."""
    try:
        dsaserve_keys(store).set(f"startup/{rank}", json.dumps({"error": message, "host": socket.gethostname(),
                                                                "pid": os.getpid()}))
    except Exception:  # noqa: BLE001 - best effort: the rank fails anyway
        pass


def _wait_keys(store: dist.Store, keys: list[str], deadline: float) -> list[str]:
    """The keys still missing at ``deadline`` (none: all present)."""
    missing = list(keys)
    while missing:
        missing = [k for k in missing if not store.check([k])]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(_POLL_S)
    return missing


def agree_on_startup(store: dist.Store, rank: int, world_size: int, summary: dict,
                     timeout_s: float) -> dict[int, dict]:
    """Publish this rank's summary; rank 0 compares all and publishes the verdict; everyone raises
    ``StartupMismatchError`` (the same message on every rank) unless it is "ok". Returns, on rank 0,
    every rank's summary (empty elsewhere)."""
    summaries: dict[int, dict] = {rank: summary}
    keys = dsaserve_keys(store)
    keys.set(f"startup/{rank}", json.dumps(summary))
    deadline = time.monotonic() + timeout_s
    if rank == 0:
        missing = _wait_keys(keys, [f"startup/{r}" for r in range(world_size)], deadline)
        problems = []
        if missing:
            problems.append(f"ranks {', '.join(k.split('/')[-1] for k in missing)} did not start within "
                            f"{timeout_s:.0f} s")
        for r in range(1, world_size):
            if f"startup/{r}" in missing:
                continue
            other = summaries[r] = json.loads(keys.get(f"startup/{r}"))
            if "error" in other:
                problems.append(f"{_where(r, other)} could not start: {other['error']}")
                continue
            diff = describe_mismatch(other, summary)
            if diff:
                problems.append(f"{_where(r, other)} differs from rank 0 ({summary['host']}): " + "; ".join(diff))
        verdict = VERDICT_OK if not problems else (
            "the ranks were not started with the same settings; run the same command with the same flags on "
            "every node. " + " | ".join(problems))
        keys.set("startup/verdict", verdict)
        if verdict != VERDICT_OK:
            # rank 0 may host the store: give the others a moment to read the verdict before it exits
            present = [f"startup/ack/{r}" for r in range(1, world_size) if "error" not in summaries.get(r, {"error": 1})]
            _wait_keys(keys, present, time.monotonic() + 3.0)
    else:
        if _wait_keys(keys, ["startup/verdict"], deadline):
            raise StartupMismatchError(f"rank 0 did not check the world's settings within {timeout_s:.0f} s: did it "
                                       "fail to start? (see its log)")
        verdict = keys.get("startup/verdict").decode()
        keys.set(f"startup/ack/{rank}", "1")
    if verdict != VERDICT_OK:
        raise StartupMismatchError(verdict)
    return summaries if rank == 0 else {}


def publish_error(store: dist.Store, rank: int, message: str) -> None:
    """A worker's fatal error, for rank 0 (under torchrun there is no other channel before it dies)."""
    dsaserve_keys(store).set(f"error/{rank}", message[-4000:])


def reported_errors(store: dist.Store, ranks: list[int]) -> dict[int, str]:
    """The errors workers published so far, by rank."""
    keys = dsaserve_keys(store)
    return {r: keys.get(f"error/{r}").decode(errors="replace") for r in ranks if keys.check([f"error/{r}"])}


def describe_rank(rank: int, summaries: dict[int, dict]) -> str:
    """'rank 2 (host node-b, pid 4242)' when the rank's start-up summary is known, else 'rank 2'."""
    return _where(rank, summaries[rank]) if rank in summaries else f"rank {rank}"
