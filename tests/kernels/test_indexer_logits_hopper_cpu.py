"""The Gluon indexer logits kernel's host side, on a machine without a GPU (the kernel itself: tests/gpu).

With Triton's JIT hooks set (the engine installs its compile watch on CUDA), Triton serializes every constexpr
argument of a launch to JSON before compiling. A layout object passed as a constexpr broke every launch of this
kernel after an engine had run in the process (H200, 2026-12-03: 23 GPU tests); the launcher now passes plain
ints only and the kernel builds its layouts itself.
"""

import json

import pytest

pytest.importorskip("triton")
G = pytest.importorskip("dsaserve.kernels.indexer_logits_hopper")
if not G.HAVE_GLUON:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)


@pytest.mark.parametrize("h", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("cfg", [G.LogitsHopperConfig(), G.LogitsHopperConfig(3, 128, 8), G.LogitsHopperConfig(4, 128, 8)])
def test_launch_constexprs_are_json_plain_ints(h, cfg):
    consts, options = G.launch_constexprs(h, 128, cfg)
    json.dumps(consts)  # what triton.runtime.jit.serialize_specialization_data does with them
    assert all(type(v) is int for v in (*consts.values(), *options.values())), consts
    assert consts["BQ"] * h == max(cfg.n_cols, h) and consts["NC"] == cfg.consumers


@pytest.mark.parametrize("consumers,maxnreg,consumer,producer", [(2, 168, 232, 40), (3, 128, 160, 24), (4, 96, 112, 24)])
def test_register_split_fits_the_file(consumers, maxnreg, consumer, producer):
    """The launch's per-thread budget x (consumers + 1) warpgroups fits the 64K-register file, and the consumers
    get what the producer gives up (setmaxnreg takes multiples of 8)."""
    got = G.LogitsHopperConfig(consumers=consumers).registers()
    assert got == (maxnreg, consumer, producer)
    assert 128 * (consumers + 1) * maxnreg <= G.REGISTER_FILE
    assert 128 * (consumers * consumer + producer) <= G.REGISTER_FILE
    assert all(r % 8 == 0 for r in got)
