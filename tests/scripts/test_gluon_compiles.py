"""The Gluon sparse MLA kernels compile for Hopper (sm_90a) on a machine without a GPU.

Gluon has no CPU interpreter, so CI cannot run them; this at least catches a kernel that no longer compiles,
spills registers, outgrows shared memory or has its wgmma pipeline serialized by ptxas (one program per SM needs <= 227 KB), using Triton's bundled
ptxas the way benchmarks/compile_report.py does. Their numerics are tested on the GPU
(tests/gpu/test_sparse_mla_hopper.py).

Each compile runs in a subprocess without TRITON_INTERPRET: tests/conftest.py sets it for the whole pytest
process on a machine without a GPU, and the Gluon frontend then refuses triton.language's interpreted jit
helpers (gl.max). In-process, the test only passed when Triton's cache already held the kernels.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
if importlib.util.find_spec("triton.experimental.gluon") is None:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SMEM_LIMIT = 227 * 1024


def _stats(variant):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks"), env.get("PYTHONPATH", "")])
    code = f"import json, compile_report as cr; print(json.dumps(cr.mla_hopper_stats({variant!r})))"
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", ["one_partition", "ws", "ws_bk32", "seesaw"])
def test_sparse_mla_hopper_kernels_compile_without_spills(variant):
    r = _stats(variant)
    assert r["stack"] == 0, f"register spills: {r}"
    assert r["smem"] <= SMEM_LIMIT, f"shared memory {r['smem']} > {SMEM_LIMIT}"
    if variant == "seesaw":
        # S of an own 32-key block = 32 + 4 k-steps (64 x 32 tiles), P V = 2 (64 x 256, k = 32) per block;
        # consumer 0 peels block 0 (S + PV), both have a loop (S + 2 PV) and a tail (PV): 80 + 42
        assert r["wgmma"] == (38 + 40 + 2) + (40 + 2), r
    elif variant == "ws_bk32":  # as "ws" with 32-key blocks: S = 36 k-steps of 64 x 16 tiles, O = 2 (k = 32)
        assert r["wgmma"] == 2 * 36 + 2 * 2, r
    else:
        # per 64-key block and warpgroup: S = 32 + 4 k-steps (latent + rope, 64 x 32 tiles), O = 4 (64 x 256);
        # the first block's S and the last block's O are peeled out of the loop
        assert r["wgmma"] == 2 * 36 + 2 * 4, r
    assert not r["wgmma_serialized"], "ptxas serialized the wgmma pipeline (C7514/C7515): an accumulator in flight is touched"
