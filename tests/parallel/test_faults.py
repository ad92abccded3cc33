"""A worker that fails while loading makes ``LLM(...)`` raise a clear EngineDeadError at once: no hang, no
orphaned process. (Workers killed mid-generation: ``test_layouts.py::test_worker_killed_mid_generation``,
run on every layout's engine once its other tests are done.)"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest

from dsaserve import LLM
from dsaserve.engine.types import EngineDeadError
from tests.parallel._util import LLM_DEFAULTS
from tests.parallel.conftest import wait_all_gone

pytestmark = pytest.mark.timeout(180)


def _without(src: str, dst: str, tensor: str) -> str:
    """A copy of checkpoint ``src`` whose index no longer lists ``tensor`` (shards are symlinked)."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if f == "model.safetensors.index.json":
            with open(os.path.join(src, f)) as fh:
                index = json.load(fh)
            del index["weight_map"][tensor]
            with open(os.path.join(dst, f), "w") as fh:
                json.dump(index, fh)
        else:
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    return dst


def _spawned_pids_during(fn):
    """Run ``fn`` and return (its exception, pids of the child processes it started)."""
    seen: set[int] = set()
    import dsaserve.parallel.multiprocess as ex_mod

    orig = ex_mod.MultiProcessExecutor._spawn

    def spawn(self, spec):
        orig(self, spec)
        seen.update(p.pid for p in self._procs)

    ex_mod.MultiProcessExecutor._spawn = spawn
    try:
        fn()
    except BaseException as e:
        return e, sorted(seen)
    finally:
        ex_mod.MultiProcessExecutor._spawn = orig
    return None, sorted(seen)


@pytest.mark.parametrize("tensor, stage_rank", [
    ("model.norm.weight", 1),            # only the last stage (rank 1) loads the final norm
    ("model.embed_tokens.weight", 0),    # only the first stage (rank 0, this process) loads the embedding
], ids=["last-stage-worker", "rank0"])
def test_load_failure_on_one_stage(pool, ds_ckpt, tmp_path, tensor, stage_rank):
    pool.shutdown()                                   # one distributed world per process at a time
    bad = _without(ds_ckpt, str(tmp_path / "bad"), tensor)
    before = {p.pid for p in multiprocessing.active_children()}
    t0 = time.monotonic()
    err, pids = _spawned_pids_during(lambda: LLM(bad, pp_size=2, cp_size=1, **LLM_DEFAULTS))
    took = time.monotonic() - t0
    assert isinstance(err, EngineDeadError), f"expected EngineDeadError, got {err!r}"
    msg = str(err)
    assert tensor in msg and "not found in checkpoint" in msg, msg
    if stage_rank == 0:
        assert msg.startswith("startup failed on rank 0"), msg
    else:
        assert msg.startswith(f"rank {stage_rank} failed: CheckpointError"), msg
    assert took < 60, f"the load failure took {took:.1f} s to surface"
    assert len(pids) == 1
    assert not wait_all_gone(pids, timeout_s=15), f"orphaned workers: {pids}"
    assert {p.pid for p in multiprocessing.active_children()} <= before
    # the process can start a healthy world again (the failed one was torn down completely)
    llm = LLM(ds_ckpt, pp_size=2, cp_size=1, **LLM_DEFAULTS)
    try:
        assert len(llm.generate([[5, 6, 7]])[0].token_ids) > 0
    finally:
        llm.shutdown()
