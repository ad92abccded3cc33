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
@pytest.mark.parametrize("stages,ordered,regs", [(4, False, 232), (8, False, 232), (4, True, 232), (4, True, 240)])
def test_launch_constexprs_are_json_plain_ints(h, stages, ordered, regs):
    consts, options = G.launch_constexprs(h, 128, G.LogitsHopperConfig(stages, ordered, regs))
    json.dumps(consts)  # what triton.runtime.jit.serialize_specialization_data does with them
    assert all(type(v) is int for v in (*consts.values(), *options.values())), consts
    assert consts["BQ"] * h == G.N_COLS and consts["STAGES"] == stages and consts["ORDERED"] == int(ordered)
    assert consts["CONSUMER_REGS"] == regs and consts["PRODUCER_REGS"] == 3 * G.MAXNREG - 2 * regs


@pytest.mark.parametrize("regs", [232, 240])
def test_register_split_fits_the_file(regs):
    """Three warpgroups at the launch's budget fit the 64K-register file, and the consumers get what the
    producer gives up (setmaxnreg takes multiples of 8, from 24 to 256)."""
    cfg = G.LogitsHopperConfig(consumer_regs=regs)
    assert G.LogitsHopperConfig().consumer_regs == G.CONSUMER_REGS and G.CONSUMER_REGS == 240
    assert 3 * 128 * G.MAXNREG <= 65536
    assert 128 * (2 * cfg.consumer_regs + cfg.producer_regs) <= 3 * 128 * G.MAXNREG
    assert all(r % 8 == 0 and 24 <= r <= 256 for r in (G.MAXNREG, cfg.consumer_regs, cfg.producer_regs))


@pytest.mark.parametrize("regs", [236, 248, 120])
def test_register_split_outside_the_file_is_refused(regs):
    with pytest.raises(ValueError, match="consumer_regs"):
        G.LogitsHopperConfig(consumer_regs=regs)
