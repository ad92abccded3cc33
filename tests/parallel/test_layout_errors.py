"""Bad parallel layouts fail before anything is loaded or spawned, with a message naming the problem."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time

import pytest

from dsaserve import LLM
from dsaserve.config import ConfigError
from dsaserve.engine import engine as engine_mod
from dsaserve.parallel.layout import Layout, stage_layer_ranges
from tests.parallel._util import LLM_DEFAULTS, free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the engine gets as far as building an executor (loading weights / spawning)."""

    def boom(*args, **kwargs):
        raise AssertionError("the engine started loading: the layout should have been rejected first")

    monkeypatch.setattr(engine_mod, "make_executor", boom)
    before = len(multiprocessing.active_children())
    yield
    assert len(multiprocessing.active_children()) == before


@pytest.mark.parametrize("pp, cp, partition, match", [
    (5, 1, None, r"pp_size=5 is larger than the model's 4 layers"),
    (2, 1, "4", r"has 1 entries but pp_size is 2"),
    (2, 2, "1,1,2", r"has 3 entries but pp_size is 2"),
    (2, 1, "0,4", r"every stage needs at least one layer"),
    (2, 1, "-1,5", r"every stage needs at least one layer"),
    (2, 1, "1,2", r"sums to 3 layers; the model has 4"),
    (2, 1, "2,3", r"sums to 5 layers; the model has 4"),
    (2, 1, "1.5,2.5", r"must be comma-separated integers"),
    (2, 1, "a,b", r"must be comma-separated integers"),
])
def test_bad_layout_rejected_before_loading(ds_ckpt, no_loading, pp, cp, partition, match):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=match):
        LLM(ds_ckpt, pp_size=pp, cp_size=cp, pp_layer_partition=partition, **LLM_DEFAULTS)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("pp, cp", [(0, 1), (1, 0), (-1, 2)])
def test_nonpositive_sizes(ds_ckpt, no_loading, pp, cp):
    with pytest.raises(ConfigError, match=r"(pp|cp)_size must be an integer >= 1"):
        LLM(ds_ckpt, pp_size=pp, cp_size=cp, **LLM_DEFAULTS)


def test_glm_boundary_on_shared_indexer_layer(glm_ckpt, no_loading):
    """GLM's layer 2 reuses layer 1's top-k ('shared'): an explicit partition may not start a stage there;
    a pp_size with fewer possible boundaries than it needs says how many stages the model allows."""
    from dsaserve.config import ModelConfig

    cfg = ModelConfig.from_hf(glm_ckpt)
    assert not cfg.has_indexer(2) and cfg.has_indexer(1) and cfg.has_indexer(3)
    for pp, partition in ((2, "2,2"), (3, "1,1,2")):
        with pytest.raises(ConfigError, match=r"stage \d would start at layer 2, a 'shared' indexer layer.*"
                                              r"--pp-layer-partition"):
            LLM(glm_ckpt, pp_size=pp, cp_size=1, pp_layer_partition=partition, **LLM_DEFAULTS)
    with pytest.raises(ConfigError, match=r"pp_size=4 needs 3 stage boundaries, but only layers \[1, 3\] can start "
                                          r"a stage .*use pp_size <= 3"):
        LLM(glm_ckpt, pp_size=4, cp_size=1, **LLM_DEFAULTS)


def test_default_partition_starts_every_stage_on_a_full_indexer_layer(glm_ckpt):
    """Issue 14 item 11: the default split used to fail on GLM ('stage 1 would start at layer 2'); it now moves
    each boundary to the nearest layer that computes its own top-k, for any pp_size the model allows."""
    from dsaserve.config import ModelConfig

    cfg = ModelConfig.from_hf(glm_ckpt)
    assert [list(r) for r in Layout.build(cfg, 2, 2).stage_layers] == [[0], [1, 2, 3]]   # README: PP2 x CP2
    assert [list(r) for r in Layout.build(cfg, 3, 1).stage_layers] == [[0], [1, 2], [3]]


def _brute_force_largest_stage(types: list[str], pp: int) -> int:
    n = len(types)
    starts = [i for i in range(1, n) if types[i] == "full"]
    best = n
    for bounds in itertools.combinations(starts, pp - 1):
        edges = [0, *bounds, n]
        best = min(best, max(edges[i + 1] - edges[i] for i in range(pp)))
    return best


@pytest.mark.parametrize("num_layers", [7, 12, 21])
def test_default_partition_is_as_even_as_the_shared_layers_allow(num_layers):
    """Against brute force on GLM-style patterns (full, full, shared, full, shared, ...) and a denser one:
    every stage starts on a 'full' layer, the largest stage is as small as possible, and where the plain even
    split is already valid it is kept unchanged."""
    glm = ["full" if max(i - 1, 0) % 2 == 0 else "shared" for i in range(num_layers)]
    sparse = ["full" if i % 3 == 0 else "shared" for i in range(num_layers)]
    for types in (glm, sparse):
        n_starts = sum(t == "full" for t in types[1:])
        for pp in range(1, n_starts + 2):
            ranges = stage_layer_ranges(num_layers, pp, can_start=lambda i: types[i] == "full")
            assert [r.start for r in ranges][0] == 0 and ranges[-1].stop == num_layers
            assert all(types[r.start] == "full" for r in ranges), (types, pp, ranges)
            assert max(len(r) for r in ranges) == _brute_force_largest_stage(types, pp), (types, pp, ranges)
            plain = stage_layer_ranges(num_layers, pp)
            if all(types[r.start] == "full" for r in plain):
                assert ranges == plain
        with pytest.raises(ConfigError, match=f"use pp_size <= {n_starts + 1}"):
            stage_layer_ranges(num_layers, n_starts + 2, can_start=lambda i: types[i] == "full")


def test_stage_layer_ranges():
    assert stage_layer_ranges(4, 1) == [range(0, 4)]
    assert stage_layer_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layer_ranges(4, 3) == [range(0, 1), range(1, 2), range(2, 4)]   # remainder on later stages
    assert stage_layer_ranges(61, 2) == [range(0, 30), range(30, 61)]
    assert stage_layer_ranges(4, 2, "1,3") == [range(0, 1), range(1, 4)]
    assert stage_layer_ranges(4, 2, [3, 1]) == [range(0, 3), range(3, 4)]
    assert stage_layer_ranges(4, 4) == [range(i, i + 1) for i in range(4)]


def test_torchrun_world_size_mismatch(ds_ckpt):
    """Under torchrun env vars with WORLD_SIZE != pp x cp: rank 0 (the engine) and a worker rank both stop
    at once with a message naming both numbers; nothing is spawned or loaded, no rendezvous is waited on."""
    script = textwrap.dedent(f"""
        import multiprocessing, os, time
        from dsaserve import LLM
        from dsaserve.args import EngineArgs
        from dsaserve.parallel.launch import run_worker_if_torchrun
        t0 = time.monotonic()
        try:
            LLM({ds_ckpt!r}, pp_size=2, cp_size=2, kv_cache_tokens=4096)
            print("RANK0: no error")
        except Exception as e:
            print("RANK0:", type(e).__name__, e)
        os.environ["RANK"] = os.environ["LOCAL_RANK"] = "1"
        try:
            run_worker_if_torchrun({ds_ckpt!r}, EngineArgs(pp_size=2, cp_size=2))
            print("RANK1: no error")
        except SystemExit as e:
            print("RANK1: SystemExit", e)
        print("CHILDREN:", len(multiprocessing.active_children()))
        print("SECONDS:", time.monotonic() - t0)
    """)
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="3", LOCAL_WORLD_SIZE="3",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=90,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one check (Layout.check_world_size), one message, on rank 0 and on a worker rank
    assert "RANK0: ConfigError torchrun started 3 processes but pp_size x cp_size = 2 x 2 = 4" in out, out
    assert "RANK1: SystemExit torchrun started 3 processes but pp_size x cp_size = 2 x 2 = 4" in out, out
    assert "CHILDREN: 0" in out
    assert float(out.split("SECONDS:")[1]) < 15, out
