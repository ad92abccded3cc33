"""The Gluon indexer logits kernel's host side, on a machine without a GPU (the kernel itself: tests/gpu).

With Triton's JIT hooks set (the engine installs its compile watch on CUDA), Triton serializes every constexpr
argument of a launch to JSON before compiling. A layout object passed as a constexpr broke every launch of this
kernel after an engine had run in the process (H200, 2026-12-03: 23 GPU tests); the launcher now passes plain
ints only and the kernel builds its layouts itself.
"""

import json

import pytest
import torch

pytest.importorskip("triton")
G = pytest.importorskip("dsaserve.kernels.indexer_logits_hopper")
if not G.HAVE_GLUON:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)

from dsaserve.kernels import reference, tile_split  # noqa: E402


@pytest.mark.parametrize("h", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("stages,ordered,regs,knobs", [(4, False, 232, False), (8, False, 232, True),
                                                      (4, True, 232, False), (4, True, 240, True)])
def test_launch_constexprs_are_json_plain_ints(h, stages, ordered, regs, knobs):
    consts, options = G.launch_constexprs(h, 128, G.LogitsHopperConfig(stages, ordered, regs, knobs, knobs))
    json.dumps(consts)  # what triton.runtime.jit.serialize_specialization_data does with them
    assert all(type(v) is int for v in (*consts.values(), *options.values())), consts
    assert consts["BQ"] * h == G.N_COLS and consts["STAGES"] == stages and consts["ORDERED"] == int(ordered)
    assert consts["RELU_ADD"] == consts["BALANCED"] == int(knobs)
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


def _block_tiles(ks, ke, skv, bq):
    """Each query block's live key tiles [kb_lo, kb_hi), as the kernel's ``_block_range`` computes them."""
    out = []
    for b in range(-(-len(ks) // bq)):
        rows = [(max(int(s), 0), min(int(e), skv)) for s, e in zip(ks[b * bq:(b + 1) * bq], ke[b * bq:(b + 1) * bq])]
        live = [(s, e) for s, e in rows if e > s]
        lo = min([s for s, _ in live], default=skv)
        hi = max([e for _, e in live], default=0)
        kb_lo = lo // G.BKV
        out.append((kb_lo, -(-hi // G.BKV) if hi > lo else kb_lo))
    return out


def _plan_cases():
    g = torch.Generator().manual_seed(5)
    cases = []
    for s, skv, bq, programs, kind in [(1000, 5000, 4, 132, "causal"), (777, 3001, 8, 13, "ragged"),
                                       (37, 640, 4, 132, "ragged"), (64, 4096, 4, 7, "empty_blocks"),
                                       (9, 70, 2, 5, "ragged"), (16, 1000, 4, 3, "all_empty"),
                                       (8192, 65536, 4, 132, "causal"), (5, 64, 4, 40, "causal")]:
        if kind == "causal":
            ke = torch.arange(skv - s + 1, skv + 1, dtype=torch.int32)
            ks = torch.zeros(s, dtype=torch.int32)
        else:
            ks = torch.randint(-5, skv, (s,), generator=g, dtype=torch.int32)
            ke = ks + torch.randint(-3, skv // 2, (s,), generator=g, dtype=torch.int32)
            if kind == "empty_blocks":  # whole blocks with no live row, some at the share cuts
                for b in (0, 3, 4, 5, 15):
                    ke[b * bq:(b + 1) * bq] = ks[b * bq:(b + 1) * bq]
            if kind == "all_empty":
                ke = ks.clone()
        cases.append((ks, ke, skv, bq, programs))
    return cases


@pytest.mark.parametrize("impl", [pytest.param("reference", marks=pytest.mark.checks("reference.tile_split")),
                                  pytest.param("triton", marks=pytest.mark.checks("tile_split.tile_split"))])
@pytest.mark.parametrize("case", range(8))
def test_balanced_plan_covers_every_tile_once_and_every_block_duty_once(case, impl):
    """The balanced schedule's plan (``tile_split``: the reference and the Triton kernel under the interpreter),
    read the way the kernel reads it (``_program_blocks``, ``_portion``): every live key tile of every query
    block is computed by exactly one program, every block's -inf tiles are the duty of exactly one program, the
    threshold filter's parts of a block fill disjoint slots that cover each stream, no portion is negative, and
    the programs' shares differ by at most one tile. Causal, ragged, empty rows, whole empty blocks (also at the
    share cuts), more programs than tiles, no live tile."""
    ks, ke, skv, bq, programs = _plan_cases()[case]
    fn = reference.tile_split if impl == "reference" else tile_split.tile_split
    blk, prog = fn(ks, ke, skv, bq, G.BKV, programs)
    tiles = _block_tiles(ks.tolist(), ke.tolist(), skv, bq)
    n_qb = len(tiles)
    assert blk.dtype == prog.dtype == torch.int32 and blk.shape == (2 * n_qb + 1,) and prog.shape == (programs, 4)
    prefix, kb_lo = blk[:n_qb + 1].tolist(), blk[n_qb + 1:].tolist()
    assert kb_lo == [lo for lo, _ in tiles]
    assert [prefix[b + 1] - prefix[b] for b in range(n_qb)] == [hi - lo for lo, hi in tiles]
    computed: dict = {}
    duty = [0] * n_qb
    shares = []
    slots = {caps: [[0] * caps for _ in range(n_qb)] for caps in (448, 61)}
    for b0, b1, t0, t1 in prog.tolist():
        shares.append(t1 - t0)
        for qb in range(b0, b1):
            j0 = max(t0 - prefix[qb], 0)
            n_t = min(t1, prefix[qb + 1]) - prefix[qb] - j0
            assert n_t >= 0, (qb, b0, b1, t0, t1)
            for kb in range(kb_lo[qb] + j0, kb_lo[qb] + j0 + n_t):
                computed[qb, kb] = computed.get((qb, kb), 0) + 1
            duty[qb] += prefix[qb] >= t0
            # the threshold filter's slots of each stream for this part (the kernel's r_lo, r_hi)
            n_blk = prefix[qb + 1] - prefix[qb]
            for caps, used in slots.items():
                r_lo = caps * j0 // max(n_blk, 1)
                r_hi = caps * (j0 + n_t) // max(n_blk, 1) if n_blk > 0 else caps
                for r in range(r_lo, r_hi):
                    used[qb][r] += 1
    assert computed == {(qb, kb): 1 for qb, (lo, hi) in enumerate(tiles) for kb in range(lo, hi)}
    assert duty == [1] * n_qb
    for caps, used in slots.items():  # the parts of a block share its stream slots: each slot exactly once
        assert all(u == [1] * caps for u in used), caps
    assert sum(shares) == prefix[-1] and max(shares) - min(shares) <= 1


@pytest.mark.checks("tile_split.tile_split", "reference.tile_split")
@pytest.mark.parametrize("case", range(8))
def test_tile_split_kernel_equals_the_reference(case):
    """The Triton plan kernel (interpreter) writes exactly the reference's plan, every int32 of it."""
    ks, ke, skv, bq, programs = _plan_cases()[case]
    blk, prog = tile_split.tile_split(ks, ke, skv, bq, G.BKV, programs)
    rblk, rprog = reference.tile_split(ks, ke, skv, bq, G.BKV, programs)
    assert torch.equal(blk, rblk) and torch.equal(prog, rprog)


@pytest.mark.parametrize("h", [16, 32, 64, 128])
def test_relu_add_default_follows_the_measurements(h):
    """relu_add None: the logits kernel always takes 2 relu(s) as s + |s|; the threshold filter only below 64 heads
    (measured slower there at 64, faster at 32); an explicit value wins in both."""
    cfg = G.LogitsHopperConfig()
    assert cfg.relu_add is None and not cfg.balanced and G.default_config(h).balanced
    assert G.launch_constexprs(h, 128, cfg)[0]["RELU_ADD"] == 1
    assert G.launch_constexprs(h, 128, cfg, filter_kernel=True)[0]["RELU_ADD"] == int(h < 64)
    for v in (False, True):
        explicit = G.LogitsHopperConfig(relu_add=v)
        assert G.launch_constexprs(h, 128, explicit, filter_kernel=True)[0]["RELU_ADD"] == int(v)
        assert G.launch_constexprs(h, 128, explicit)[0]["RELU_ADD"] == int(v)
