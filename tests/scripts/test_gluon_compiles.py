"""The Gluon sparse MLA kernels compile for Hopper (sm_90a) on a machine without a GPU.

Gluon has no CPU interpreter, so CI cannot run them; this at least catches a kernel that no longer compiles,
spills registers, outgrows shared memory or has its wgmma pipeline serialized by ptxas (one program per SM needs <= 227 KB), using Triton's bundled
ptxas the way benchmarks/compile_report.py does. Their numerics are tested on the GPU
(tests/gpu/test_sparse_mla_hopper.py).
"""

import importlib.util
import os
import sys

import pytest

pytest.importorskip("triton")
if importlib.util.find_spec("triton.experimental.gluon") is None:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import compile_report as cr  # noqa: E402

SMEM_LIMIT = 227 * 1024


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ws", [False, True], ids=["one_partition", "warp_specialized"])
def test_sparse_mla_hopper_kernels_compile_without_spills(ws):
    from dsaserve.kernels import sparse_mla_hopper as H

    consts = {"BH": 64, "BK": 64, "DV": 512, "DR": 64, "num_warps": 8}
    sig = dict(cr.mla_hopper_signature())
    if ws:
        for k in ("PREFETCH_IDS", "EARLY_PV", "PROBE"):
            sig.pop(k)
        sig["PRODUCER_REGS"] = "constexpr"
        consts["PRODUCER_REGS"] = H.WS_PRODUCER_REGS
        fn = H._sparse_mla_prefill_ws_kernel
    else:
        consts.update(PREFETCH_IDS=True, EARLY_PV=True, PROBE=0)
        fn = H._sparse_mla_prefill_kernel
    r = cr.compile_stats(fn, sig, consts, 8, 1, div16=cr.DIV16, gluon=True)
    assert r["stack"] == 0, f"register spills: {r}"
    assert r["smem"] <= SMEM_LIMIT, f"shared memory {r['smem']} > {SMEM_LIMIT}"
    # per 64-key block and warpgroup: S = 32 + 4 k-steps (latent + rope, 64 x 32 tiles), O = 4 (64 x 256);
    # the first block's S and the last block's O are peeled out of the loop
    assert r["wgmma"] == 2 * 36 + 2 * 4, r
    assert not r["wgmma_serialized"], "ptxas serialized the wgmma pipeline (C7514/C7515): an accumulator in flight is touched"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("gate_up,pair", [(True, True), (False, True), (False, False)],
                         ids=["gate_up", "down_pair", "down"])
def test_moe_hopper_kernels_compile_without_spills(gate_up, pair):
    """The Gluon grouped MoE GEMM as the launchers call it (maxnreg included): no spills, one program per SM's
    shared memory, per consumer warpgroup and K step one 64 x 128 x 128 MMA (4 wgmma of k = 32) for the
    weight tile and one more for the second tile of a pair (gate_up's up tile, down's next 128 columns), in both
    consumer partitions, and no serialization."""
    name, fn, sig, consts, warps, stages, opts = cr.moe_hopper_job(gate_up, pair)
    r = cr.compile_stats(fn, sig, consts, warps, stages, div16=cr.DIV16, gluon=True, **opts)
    assert r["stack"] == 0, f"register spills: {r}"
    assert r["smem"] <= SMEM_LIMIT, f"shared memory {r['smem']} > {SMEM_LIMIT}"
    assert r["wgmma"] == 2 * 4 * (2 if pair else 1), r
    assert not r["wgmma_serialized"], "ptxas serialized the wgmma pipeline (C7514/C7515): an accumulator in flight is touched"
