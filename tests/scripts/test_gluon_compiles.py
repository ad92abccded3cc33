"""The Gluon kernels (sparse MLA prefill, grouped MoE GEMM, indexer logits) compile for Hopper (sm_90a) on a
machine without a GPU.

Gluon has no CPU interpreter, so CI cannot run them; this at least catches a kernel that no longer compiles,
spills registers, outgrows shared memory or has its wgmma pipeline serialized by ptxas (one program per SM needs <= 227 KB), using Triton's bundled
ptxas the way benchmarks/compile_report.py does. Their numerics are tested on the GPU
(tests/gpu/test_sparse_mla_hopper.py, test_moe_gemm_hopper.py, test_indexer_logits_hopper.py).

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


def _stats(variant, call="mla_hopper_stats"):
    """compile_report.<call>(*variant) compiled in a clean subprocess (variant: a value or a tuple of them)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks"), env.get("PYTHONPATH", "")])
    args = ", ".join(repr(v) for v in (variant if isinstance(variant, tuple) else (variant,)))
    code = f"import json, compile_report as cr; print(json.dumps(cr.{call}({args})))"
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", ["one_partition", "ws", "ws_bk32", "seesaw", "roles", "pair"])
def test_sparse_mla_hopper_kernels_compile_without_spills(variant):
    r = _stats(variant)
    assert r["stack"] == 0, f"register spills: {r}"
    assert r["smem"] <= SMEM_LIMIT, f"shared memory {r['smem']} > {SMEM_LIMIT}"
    if variant == "seesaw":
        # S of an own 32-key block = 32 + 4 k-steps (64 x 32 tiles), P V = 2 (64 x 256, k = 32) per block;
        # consumer 0 peels block 0 (S + PV), both have a loop (S + 2 PV) and a tail (PV): 80 + 42
        assert r["wgmma"] == (38 + 40 + 2) + (40 + 2), r
    elif variant == "roles":
        # the score warpgroup: S = 32 + 4 k-steps of 64 x 64; each value warpgroup: P V = 4 k-steps x 2 (N = 128)
        assert r["wgmma"] == 36 + 2 * 8, r
    elif variant == "pair":
        # a math warpgroup's pair: S = 16 + 16 + 4 k-steps of 64 x 64 (its block's early half, late half, rope), its
        # own P V and the other's (4 k-steps of 64 x 256 each); warpgroup 0's rotated loop (early_s) adds a peeled
        # first S + own P V and a last other P V
        assert r["wgmma"] == 2 * (36 + 4 + 4) + (36 + 4 + 4), r
    elif variant == "ws_bk32":  # as "ws" with 32-key blocks: S = 36 k-steps of 64 x 16 tiles, O = 2 (k = 32)
        assert r["wgmma"] == 2 * 36 + 2 * 2, r
    else:
        # per 64-key block and warpgroup: S = 32 + 4 k-steps (latent + rope, 64 x 32 tiles), O = 4 (64 x 256);
        # the first block's S and the last block's O are peeled out of the loop
        assert r["wgmma"] == 2 * 36 + 2 * 4, r
    assert not r["wgmma_serialized"], "ptxas serialized the wgmma pipeline (C7514/C7515): an accumulator in flight is touched"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("gate_up,pair,out,queue,ordered", [
    (True, True, "*bf16", False, False), (False, True, "*bf16", False, False), (False, False, "*bf16", False, False),
    (False, True, "*fp32", False, False), (True, True, "*bf16", True, False), (False, True, "*bf16", True, False),
    (True, True, "*bf16", True, True), (False, True, "*bf16", True, True), (False, False, "*bf16", False, True)],
    ids=["gate_up", "down_pair", "down", "down_pair_fp32_out", "gate_up_queue", "down_pair_queue",
         "gate_up_queue_ordered", "down_pair_queue_ordered", "down_ordered"])
def test_moe_hopper_kernels_compile_without_spills(gate_up, pair, out, queue, ordered):
    """The Gluon grouped MoE GEMM as the launchers call it (maxnreg included; scales two steps ahead, the
    epilogue through shared memory, or from the MMA layout for an fp32 output, which would not fit): no spills,
    one program per SM's shared memory, per consumer warpgroup and K step one 64 x 128 x 128 MMA (4 wgmma of k = 32) for the
    weight tile and one more for the second tile of a pair (gate_up's up tile, down's next 128 columns), in both
    consumer partitions, and no serialization; the same with work items claimed from a counter (``queue``) and
    with the consumers' MMAs issued in turn (``ordered``)."""
    r = _stats((gate_up, pair, 2, True, out, queue, ordered), "moe_hopper_stats")
    assert r["stack"] == 0, f"register spills: {r}"
    assert r["smem"] <= SMEM_LIMIT, f"shared memory {r['smem']} > {SMEM_LIMIT}"
    assert r["wgmma"] == 2 * 4 * (2 if pair else 1), r
    assert not r["wgmma_serialized"], "ptxas serialized the wgmma pipeline (C7514/C7515): an accumulator in flight is touched"


# Bytes of stack ptxas may give the threshold filter as launched (relu_add, whole blocks strided), by (H, ordered
# MMA issues, consumer registers), Triton 3.6 ptxas, 2026-12-05: the H = 32 filter keeps a few values of its block
# setup on the stack (a known cost at GLM-5's head count); 232 registers spill more. The logits kernel as launched
# (relu_add, balanced) keeps nothing on the stack, nor does the filter with ``balanced=True``.
FILTER_STACK = {(64, False, 232): 24, (64, True, 232): 32, (32, False, 232): 104, (32, True, 232): 112,
                (64, False, 240): 0, (64, True, 240): 0, (32, False, 240): 56, (32, True, 240): 72}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("interleaved", [False, True])
def test_indexer_query_gluon_kernel_compiles(interleaved):
    """The Gluon indexer query kernel (one row a thread) compiles for sm_90 without spills and without shared
    memory (its rope pairs and butterflies never leave the thread), in under 40 SASS instructions per element
    (the Triton kernel: ~91 at its 16-row blocks, KERNELS_NOTES)."""
    r = _stats((interleaved,), "indexer_query_gluon_stats")
    assert r["stack"] == 0 and r["smem"] == 0, r
    assert r["instructions"] < 40 * 128, r


@pytest.mark.timeout(300)
def test_mla_query_kernel_compiles():
    """The query's W_UK product + RoPE compiles for sm_90 without spills: one 128-deep product a 128-column step
    (8 k = 16 wgmma), not serialized."""
    r = _stats((), "mla_query_stats")
    assert r["stack"] == 0, f"register spills: {r}"
    assert r["wgmma"] == 8 and not r["wgmma_serialized"], r


@pytest.mark.timeout(300)
@pytest.mark.parametrize("v", [128, 256])
def test_mla_value_kernel_compiles(v):
    """The value up-projection with act_quant in its epilogue compiles for sm_90 without spills, its K loop (L = 512,
    64 deep) on the tensor core: 8 steps x 4 k = 16 wgmma, not serialized."""
    r = _stats((v,), "mla_value_stats")
    assert r["stack"] == 0, f"register spills: {r}"
    assert r["wgmma"] == 32 and not r["wgmma_serialized"], r


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ordered,regs", [(False, 232), (True, 232), (False, 240), (True, 240)])
@pytest.mark.parametrize("h", [64, 32])
def test_logits_hopper_kernel_compiles_without_spills(h, ordered, regs):
    """The Gluon indexer logits kernel as the launcher calls it: no spills, one program per SM's shared memory,
    one 64 x 256 x 128 MMA (4 wgmma of k = 32) per key tile in each of the two consumer partitions, and no
    serialization; the same with the MMAs issued in tile order (``ordered``) and at 240 consumer registers."""
    r = _stats((h, 4, 0, ordered, regs), "logits_hopper_stats")
    assert r["stack"] == 0, f"register spills: {r}"
    assert r["smem"] <= SMEM_LIMIT, f"shared memory {r['smem']} > {SMEM_LIMIT}"
    assert r["wgmma"] == 2 * 4, r
    assert not r["wgmma_serialized"], "ptxas serialized the wgmma pipeline (C7514/C7515): an accumulator in flight is touched"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("relu_add,balanced", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("h", [64, 32])
def test_logits_hopper_knobs_compile(h, relu_add, balanced):
    """The logits kernel without one or both of relu_add (2 relu(s) as s + |s|) and the balanced schedule (the
    defaults: the tests above): no spills, the same MMA pipeline; with relu_add the epilogue has no FMNMX left
    (the ReLU is an FADD on the FMA pipe: its point), without it 2 x 128 a tile."""
    r = _stats((h, 4, 0, False, 240, relu_add, balanced), "logits_hopper_stats")
    assert r["stack"] == 0, f"register spills: {r}"
    assert r["smem"] <= SMEM_LIMIT and r["wgmma"] == 2 * 4 and not r["wgmma_serialized"], r
    assert (r["ops"].get("FMNMX", 0) == 0) == relu_add, r["ops"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["select", "threshold"])
def test_threshold_topk_triton_kernels_compile(which):
    """The threshold top-k's Triton kernels compile for sm_90 as launched (the CPU interpreter accepts things the
    compiler rejects, e.g. a plain global read inside a kernel), without spills. The select keeps only the
    search's one uint32 a slot live (<= 128 registers: 4 programs of 4 warps an SM; it was 227 with the whole
    row's columns and output positions live, 2 programs an SM)."""
    r = _stats(which, "threshold_triton_stats")
    assert r["stack"] == 0, f"register spills: {r}"
    if which == "select":
        assert r["regs"] <= 128, f"the select holds more than the search's row: {r}"


@pytest.mark.timeout(300)
def test_select_gluon_kernel_compiles_within_four_programs_an_sm():
    """The Gluon select compiles for sm_90 at the engine's size without spills, in <= 128 registers (4 programs
    of 4 warps an SM, as the Triton select; holding the search's `real` mask across its fp32 first step had
    taken 188)."""
    r = _stats((), "select_gluon_stats")
    assert r["stack"] == 0, f"register spills: {r}"
    assert r["regs"] <= 128, f"the select holds more than the search's row: {r}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("m", [2048, 4096])
def test_row_threshold_gluon_kernel_compiles(m):
    """The Gluon row threshold compiles for sm_90 at 2048 / 4096 samples a row (one / two warps) without spills."""
    r = _stats(m, "row_threshold_gluon_stats")
    assert r["stack"] == 0, f"register spills: {r}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("parts", [3, 1])
def test_split_gemm_kernel_compiles(parts):
    """The prefill fp32 projections' split GEMM compiles for sm_90 at its widest tiles without spills, over three
    weight parts and over one (a weight stored as bf16): one tensor-core product a part and 64-deep K step (four
    k = 16 wgmma), and the step's sum added to the fp32 accumulator by the CUDA cores (one FADD per accumulator
    register, 128 x 128 / 256 threads = 64). With one part Triton would otherwise fold that add into the wgmma's
    accumulator (tensor-core accumulation over all of K: another result), which shows here as no FADD."""
    r = _stats((parts,), "split_gemm_stats")
    assert r["stack"] == 0, f"register spills: {r}"
    assert r["wgmma"] == 4 * parts and not r["wgmma_serialized"], r
    assert r["top_ops"].get("FADD") == 64, r


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ordered,regs", [(False, 232), (True, 232), (False, 240), (True, 240)])
@pytest.mark.parametrize("h", [64, 32])
def test_logits_hopper_threshold_filter_compiles(h, ordered, regs):
    """The same kernel with the threshold filter in place of the store (``mqa_threshold_candidates``): it fits,
    keeps the MMA pipeline, and each consumer's filter votes once per register of the [64, BQ] logits
    (2 VOTE a tile at H = 64, 4 at H = 32: one ballot per 8-lane group stream)."""
    r = _stats((h, 4, 320, ordered, regs), "logits_hopper_stats")
    assert r["stack"] <= FILTER_STACK[h, ordered, regs], f"register spills: {r}"
    assert r["smem"] <= SMEM_LIMIT, f"shared memory {r['smem']} > {SMEM_LIMIT}"
    assert r["wgmma"] == 2 * 4, r
    assert not r["wgmma_serialized"], "ptxas serialized the wgmma pipeline (C7514/C7515): an accumulator in flight is touched"
