"""Compile the Triton kernels for Hopper (sm_90a) on a machine without a GPU and report what the compiler
made of them: registers, spill stack, shared memory, instruction mix, MMA layouts.

    PYTHONPATH=. python3 benchmarks/compile_report.py [--only logits,topk,mla] [--dump DIR]

Costs no device time: Triton's bundled ptxas and cuobjdump do the work. Launch-time specialisation is
approximated by marking every pointer 16-byte aligned (the launcher does the same for torch tensors).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_stats(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, dump: str | None = None,
                  name: str = "", div16: tuple = (), gluon: bool = False, maxnreg: int | None = None) -> dict:
    """Compile ``fn`` for sm_90a -> {regs, stack, smem, instructions, top ops, wgmma count and whether ptxas
    serialized them, mma layouts, seconds}.

    Pointers, and the integer arguments named in ``div16``, are marked divisible by 16 the way the launcher
    specialises them at run time (strides and sizes that are multiples of 16 change the code)."""
    names = list(signature)
    marked = [i for i, (n, v) in enumerate(signature.items()) if v.startswith("*") or n in div16]
    attrs = {(i,): [["tt.divisibility", 16]] for i in marked}
    t0 = time.time()
    source = ASTSource
    if gluon:  # Gluon kernels (explicit layouts) enter the compiler at TTGIR
        from triton.experimental.gluon._runtime import GluonASTSource as source
    k = triton.compile(source(fn, signature, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages,
                                                                  **({"maxnreg": maxnreg} if maxnreg else {})})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
        path = f.name
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    # ptxas's own diagnosis: wgmma it had to serialize (C7514 / C7515: an accumulator touched in flight)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
        ptx_path = f.name
    ptxas_log = subprocess.run([PTXAS, f"-arch=sm_{90}a", "-v", ptx_path, "-o", os.devnull], capture_output=True,
                               text=True)
    os.unlink(ptx_path)
    serialized = "serialized" in (ptxas_log.stdout + ptxas_log.stderr)
    sass = subprocess.run([CUOBJDUMP, "--dump-sass", path], capture_output=True, text=True).stdout
    os.unlink(path)
    ops: dict[str, int] = {}
    for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", sass):
        ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    ttgir = k.asm["ttgir"]
    mma = sorted(set(re.findall(r"warpsPerCTA = \[[0-9, ]*\], instrShape = \[[0-9, ]*\]", ttgir)))
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(dump, f"{name}.{ext}"), "w") as f:
                f.write(k.asm[ext])
        with open(os.path.join(dump, f"{name}.sass"), "w") as f:
            f.write(sass)
    return {"regs": int(re.search(r"REG:(\d+)", usage).group(1)), "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "smem": k.metadata.shared, "instructions": sum(ops.values()),
            "top_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:10]), "ops": ops,
            "wgmma": ops.get("HGMMA", 0) + ops.get("QGMMA", 0), "wgmma_serialized": serialized, "mma_layouts": mma,
            "seconds": round(time.time() - t0, 1)}


def logits_signature():
    return {"q_ptr": "*fp8e4nv", "k_ptr": "*fp8e4nv", "ksc_ptr": "*fp32", "w_ptr": "*fp32", "ks_ptr": "*i32",
            "ke_ptr": "*i32", "out_ptr": "*fp32", "S": "i32", "SKV": "i32", "NUM_PROGS": "i32",
            "H": "constexpr", "D": "constexpr", "BQ": "constexpr", "BK": "constexpr", "KEY_STRIDE": "constexpr"}


def topk_signature():
    return {"q_ptr": "*fp8e4nv", "k_ptr": "*fp8e4nv", "ksc_ptr": "*fp32", "w_ptr": "*fp32", "ks_ptr": "*i32",
            "ke_ptr": "*i32", "off_ptr": "*i32", "out_ptr": "*i32", "wkey_ptr": "*i32", "wcol_ptr": "*i32",
            "ring_ptr": "*fp32", "need_ptr": "*i32", "any_ptr": "*i32",
            "S": "i32", "SKV": "i32", "K": "i32", "SLACK": "i32", "NUM_PROGS": "i32", "off_scalar": "i32",
            "SPLITS": "i32", "H": "constexpr", "D": "constexpr", "BQ": "constexpr", "BK": "constexpr",
            "C": "constexpr", "R": "constexpr", "HAS_OFF": "constexpr", "SPLIT": "constexpr", "CUT16": "constexpr",
            "CH": "constexpr", "FILT": "constexpr"}


def merge_signature():
    return {"cand_ptr": "*i32", "off_ptr": "*i32", "out_ptr": "*i32", "S": "i32", "K": "i32", "off_scalar": "i32",
            "SPLITS": "i32", "M": "constexpr", "HAS_OFF": "constexpr", "CUT16": "constexpr", "CH": "constexpr"}


# integer arguments the launchers pass as multiples of 16 at the benchmark shapes (the launcher specialises them)
DIV16 = ("S", "SKV", "T", "H", "TOPK", "SPLIT_LEN", "stride_qt", "stride_qh", "stride_kv", "stride_it", "stride_os",
         "stride_ot", "stride_oh", "stride_ls", "stride_lt", "N", "K", "pair_rows", "b_rows", "stride_am", "stride_cm")


def mla_signature():
    return {"q_ptr": "*bf16", "kv_ptr": "*bf16", "idx_ptr": "*i32", "out_ptr": "*bf16", "lse_ptr": "*fp32",
            "T": "i32", "H": "i32", "TOPK": "i32", "SPLIT_LEN": "i32", "qk_scale": "fp32",
            "stride_qt": "i32", "stride_qh": "i32", "stride_kv": "i32", "stride_it": "i32", "stride_os": "i32",
            "stride_ot": "i32", "stride_oh": "i32", "stride_ls": "i32", "stride_lt": "i32",
            "DV": "constexpr", "DR": "constexpr", "BH": "constexpr", "BK": "constexpr", "N_HB": "constexpr",
            "NSPLIT": "constexpr", "UPCAST": "constexpr", "PREFETCH_IDX": "constexpr"}


def mla_hopper_signature():
    return {"q_ptr": "*bf16", "kv_ptr": "*bf16", "idx_ptr": "*i32", "out_ptr": "*bf16", "lse_ptr": "*fp32",
            "topk": "i32", "n_hb": "i32", "qk_scale": "fp32",
            "stride_qt": "i32", "stride_qh": "i32", "stride_kv": "i32", "stride_it": "i32", "stride_ot": "i32",
            "stride_oh": "i32", "stride_lt": "i32",
            "BH": "constexpr", "BK": "constexpr", "DV": "constexpr", "DR": "constexpr", "PREFETCH_IDS": "constexpr",
            "EARLY_PV": "constexpr", "PROBE": "constexpr", "num_warps": "constexpr"}


FP8_DESC = ("tensordesc<fp8e4nv[{r}, 128],NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2, "
            "transposed=False, fp4_padded=False, cga_layout=[])>")  # an e4m3 [r, 128] TMA block
FP8_DESC_128 = FP8_DESC.format(r=128)


def moe_hopper_job(gate_up: bool, pair: bool = True, ahead: int = 2, blocked: bool = True, out: str = "*bf16",
                   queue: bool = False, ordered: bool = False) -> tuple:
    """(name, kernel, signature, constexprs, warps, stages) of the Gluon grouped MoE GEMM: the gate_up launch
    (gathered rows, fused SiLU + quant, fp8 out) or the down launch (TMA rows, bf16 out), as the launchers
    call it (then compile_stats options); ``queue``: the "queue" schedule (items claimed from a counter);
    ``ordered``: the consumers' MMAs issued in turn."""
    from dsaserve.kernels import moe_gemm_hopper as M

    out = "*fp8e4nv" if gate_up else out
    if not gate_up:  # as the launcher decides it for this output dtype
        blocked = M.blocked_down_epilogue(blocked, torch.float32 if out == "*fp32" else torch.bfloat16)
    sig = {"a_ptr": "*fp8e4nv", "a_desc": FP8_DESC_128, "as_ptr": "*fp32", "tok_ptr": "*i32", "b_desc": FP8_DESC_128,
           "bs_ptr": "*fp32", "tiles_ptr": "*i32", "c_ptr": out, "cs_ptr": "*fp32" if gate_up else out,
           "queue_ptr": "*i32", "N": "i32", "K": "i32", "pair_rows": "i32", "n_tiles": "i32", "b_rows": "i32", "stride_am": "i32",
           "stride_asm": "i32", "stride_bse": "i32", "stride_bsn": "i32", "stride_cm": "i32", "stride_csm": "i32"}
    stages = M.STAGES_GATE_UP if gate_up else (M.STAGES_DOWN_PAIR if pair else M.STAGES_DOWN)
    consts = dict(BM=M.BM, BN=M.BN, BK=M.BK, GROUP_M=8, STAGES=stages, GATHER=gate_up, PAIR=gate_up or pair,
                  FUSE_SILU=gate_up, TMA_BYTES=M.tma_bytes(gate_up, pair),
                  CONSUMER_REGS=M.CONSUMER_REGS, PRODUCER_REGS=M.PRODUCER_REGS, AHEAD=ahead,
                  EPI_BLOCKED=blocked, QUEUE=queue, ID_STAGES=M.ID_STAGES, ORDERED=ordered)
    sig.update({k: "constexpr" for k in consts})
    name = ("moe_hopper_" + ("gate_up" if gate_up else ("down_pair" if pair else "down"))
            + ("_ahead1" if ahead == 1 else "") + ("" if blocked else "_unblocked") + ("_fp32" if out == "*fp32" else "")
            + ("_queue" if queue else "") + ("_ordered" if ordered else ""))
    return (name, M._moe_fp8_gemm_hopper_kernel, sig, consts,
            M.NUM_WARPS, 1, {"maxnreg": M.MAXNREG})


def moe_hopper_stats(gate_up: bool, pair: bool = True, ahead: int = 2, blocked: bool = True, out: str = "*bf16",
                     queue: bool = False, ordered: bool = False) -> dict:
    """compile_stats of ``moe_hopper_job(...)`` (in a process without TRITON_INTERPRET, as
    ``mla_hopper_stats``)."""
    _, fn, sig, consts, warps, stages, opts = moe_hopper_job(gate_up, pair, ahead, blocked, out, queue, ordered)
    return compile_stats(fn, sig, consts, warps, stages, div16=DIV16, gluon=True, **opts)


def logits_hopper_job(h: int, stages: int = 4, caps: int = 0, ordered: bool = False, regs: int = 232,
                      relu_add: bool | None = None, balanced: bool | None = None) -> tuple:
    """(name, kernel, signature, constexprs, warps, stages, options) of the Gluon indexer logits kernel at H
    heads and a ring depth, as ``mqa_logits_hopper`` launches it; ``caps`` > 0: the threshold filter variant
    (``mqa_threshold_candidates`` with that many slots a stream); ``ordered``: the consumers' MMAs in turn;
    ``regs``: the consumers' registers; ``relu_add`` / ``balanced``: those ``LogitsHopperConfig`` knobs (None: the
    launchers' defaults: balanced for the logits, not the filter; relu_add as ``relu_add``)."""
    from dsaserve.kernels import indexer_logits_hopper as L

    if balanced is None:
        balanced = not caps

    consts, options = L.launch_constexprs(h, 128, L.LogitsHopperConfig(stages, ordered, regs, relu_add, balanced),
                                          filter_kernel=bool(caps))
    relu_add = bool(consts["RELU_ADD"])
    sig = {"q_desc": FP8_DESC.format(r=L.N_COLS), "k_desc": FP8_DESC.format(r=L.BKV), "ksc_ptr": "*fp32",
           "w_ptr": "*fp32", "ks_ptr": "*i32", "ke_ptr": "*i32", "out_ptr": "*fp32", "thr_ptr": "*fp32",
           "cand_ptr": "*i64", "cnt_ptr": "*i32", "blk_ptr": "*i32", "prog_ptr": "*i32", "S": "i32", "SKV": "i32"}
    if caps:
        consts.update(FILTER=True, CAPS=caps)
    sig.update({k: "constexpr" for k in consts})
    name = (f"logits_hopper_h{h}_s{stages}" + (f"_filter{caps}" if caps else "") + ("_ordered" if ordered else "")
            + (f"_regs{regs}" if regs != 232 else "") + ("" if relu_add else "_relumax")
            + ("_balanced" if balanced else "_strided"))
    return (name, L._mqa_logits_hopper_kernel, sig, consts, options["num_warps"], 1, {"maxnreg": options["maxnreg"]})


def logits_hopper_stats(h: int, stages: int = 4, caps: int = 0, ordered: bool = False, regs: int = 232,
                        relu_add: bool | None = None, balanced: bool | None = None) -> dict:
    """compile_stats of ``logits_hopper_job(...)`` (in a process without TRITON_INTERPRET)."""
    _, fn, sig, consts, warps, st, opts = logits_hopper_job(h, stages, caps, ordered, regs, relu_add, balanced)
    return compile_stats(fn, sig, consts, warps, st, div16=DIV16, gluon=True, **opts)


def threshold_triton_stats(which: str) -> dict:
    """compile_stats of the threshold top-k's Triton kernels as their launchers call them at k = 2048 and the
    default config: "select" (16 streams x 448 slots a row, M = 8192, with the redo flag) or
    "threshold" (a 4096-key sample row)."""
    from dsaserve.kernels import threshold_topk as T

    if which == "select":
        sig = {"words_ptr": "*i32", "cnt_ptr": "*i32", "ks_ptr": "*i32", "ke_ptr": "*i32", "redo_ptr": "*i32",
               "any_ptr": "*i32", "off_ptr": "*i32", "out_ptr": "*i32", "N": "i32", "K": "i32",
               "off_scalar": "i32", "CAPS": "i32", "skv": "i32", "M": "constexpr", "NS": "constexpr",
               "FLAG": "constexpr", "HAS_OFF": "constexpr", "CH": "constexpr"}
        return compile_stats(T._select_candidates_kernel, sig, {"M": 8192, "NS": 16, "FLAG": True, "HAS_OFF": True,
                                                                "CH": 1024}, 4, 1)
    sig = {"x_ptr": "*fp32", "thr_ptr": "*fp32", "N": "i32", "R": "i32", "M": "constexpr"}
    return compile_stats(T._row_threshold_kernel, sig, {"M": 4096}, 8, 1)


def select_gluon_stats(slots_per_thread: int = 8, **kw) -> dict:
    """compile_stats of the Gluon select (``select_gluon._select_gluon_kernel``) as its launcher calls it at the
    engine's size (16 streams x 448 slots: ``select_pieces`` 32 + 16 + 8 rows a warp, k = 2048, with the redo
    flag)."""
    from dsaserve.kernels import select_gluon as SG

    sig = {"words_ptr": "*i32", "cand_ptr": "*i64", "cnt_ptr": "*i32", "ks_ptr": "*i32", "ke_ptr": "*i32",
           "redo_ptr": "*i32", "any_ptr": "*i32", "off_ptr": "*i32", "out_ptr": "*i32", "N": "i32", "K": "i32",
           "off_scalar": "i32", "CAPS": "i32", "skv": "i32", "R0": "constexpr", "R1": "constexpr",
           "R2": "constexpr", "NS": "constexpr", "FLAG": "constexpr", "HAS_OFF": "constexpr", "SPT": "constexpr",
           "EVEN": "constexpr"}
    r0, r1, r2 = SG.select_pieces(16 * 448, 4)
    return compile_stats(SG._select_gluon_kernel, sig, {"R0": r0, "R1": r1, "R2": r2, "NS": 16, "FLAG": True,
                                                        "HAS_OFF": True, "SPT": slots_per_thread,
                                                        "EVEN": (r0 + r1 + r2) % slots_per_thread == 0}, 4, 1, gluon=True,
                         **kw)


def row_threshold_gluon_stats(m: int = 2048) -> dict:
    """compile_stats of the Gluon row threshold (``select_gluon._row_threshold_gluon_kernel``) at M samples a row,
    with the launcher's warps (one per 2048)."""
    from dsaserve.kernels import select_gluon as SG

    sig = {"x_ptr": "*fp32", "thr_ptr": "*fp32", "N": "i32", "R": "i32", "M": "constexpr"}
    return compile_stats(SG._row_threshold_gluon_kernel, sig, {"M": m}, SG.row_threshold_warps(m), 1, gluon=True)


def split_gemm_stats(parts: int = 3, n: int = 256, **opts) -> dict:
    """compile_stats of the prefill fp32 projections' split GEMM (``f32_linear._split_gemm_kernel``) over ``parts``
    bf16 weight parts with the tiles of N = n columns (``split_gemm_config``; 256, the 256-expert router: its widest,
    128 x 128 and 8 warps), K and the row stride multiples of 16 as at hidden size 7168. ``opts``: compile_stats'
    (dump=, name=)."""
    from dsaserve.kernels import f32_linear as F32

    sig = {"x_ptr": "*bf16", "p_ptr": "*bf16", "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "stride_x": "i32", "scale": "fp32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr",
           "UPCAST": "constexpr", "N_FASTEST": "constexpr", "PARTS": "constexpr"}
    bm, bn, warps, stages, n_fastest = F32.split_gemm_config(n)
    return compile_stats(F32._split_gemm_kernel, sig, {"BM": bm, "BN": bn, "BK": 64, "UPCAST": False,
                                                      "N_FASTEST": n_fastest, "PARTS": parts}, warps, stages,
                         div16=("x_ptr", "p_ptr", "y_ptr", "N", "K", "stride_x"), **opts)


def indexer_query_gluon_stats(interleaved: bool = False, **opts) -> dict:
    """compile_stats of the Gluon indexer query kernel (``key_path_gluon._indexer_query_gluon_kernel``) at the
    engine's shape (D = 128, 64 rope dims, 4 warps: 128 rows a program, one a thread)."""
    from dsaserve.kernels import key_path_gluon as KG

    sig = {"x_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "out_ptr": "*fp8e4nv", "hw_ptr": "*fp32",
           "hw_out_ptr": "*fp32", "R": "i32", "G": "i32", "stride_xt": "i32", "stride_xg": "i32", "stride_c": "i32",
           "stride_ot": "i32", "stride_og": "i32", "D": "constexpr", "LOG2_D": "constexpr", "HALF": "constexpr",
           "INTERLEAVED": "constexpr", "num_warps": "constexpr"}
    consts = {"D": 128, "LOG2_D": 7, "HALF": 32, "INTERLEAVED": interleaved, "num_warps": 4}
    return compile_stats(KG._indexer_query_gluon_kernel, sig, consts, 4, 1, gluon=True,
                         div16=("stride_xt", "stride_xg", "stride_c", "stride_ot", "stride_og"), **opts)


def mla_query_stats(config: tuple[int, int, int, int] | None = None, **opts) -> dict:
    """compile_stats of the query's W_UK product + RoPE (``mla_query._query_proj_rope_kernel``) as its launcher
    specialises it for bf16 at V3.2's widths (nope 128, rope 64, L 512) and ``config`` (BM, BN, warps, stages;
    default ``DEFAULT_CONFIG``)."""
    from dsaserve.kernels import mla_query as MQ

    bm, bn, warps, stages = config or MQ.DEFAULT_CONFIG
    sig = {"q_ptr": "*bf16", "w_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "out_ptr": "*bf16", "T": "i32",
           "stride_qt": "i32", "stride_qh": "i32", "stride_wh": "i32", "stride_wk": "i32", "stride_c": "i32",
           "stride_ot": "i32", "stride_oh": "i32", "NOPE": "constexpr", "L": "constexpr", "HALF": "constexpr",
           "BM": "constexpr", "BN": "constexpr", "ROUND": "constexpr", "UPCAST": "constexpr"}
    consts = {"NOPE": 128, "L": 512, "HALF": 32, "BM": bm, "BN": bn, "ROUND": 1, "UPCAST": False}
    return compile_stats(MQ._query_proj_rope_kernel, sig, consts, warps, stages,
                         div16=("stride_qt", "stride_qh", "stride_wh", "stride_wk", "stride_c", "stride_ot",
                                "stride_oh"), **opts)


def mla_value_stats(v: int = 128, **opts) -> dict:
    """compile_stats of the value up-projection with act_quant in its epilogue (``mla_value._value_proj_fp8_kernel``)
    as its launcher specialises it for bf16, L = 512 and v = 128 (DeepSeek-V3.2) or 256 (GLM-5)."""
    from dsaserve.kernels import mla_value as MV

    sig = {"lat_ptr": "*bf16", "w_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "T": "i32",
           "stride_lt": "i32", "stride_lh": "i32", "stride_wh": "i32", "stride_wv": "i32", "stride_qt": "i32",
           "stride_st": "i32", "L": "constexpr", "V": "constexpr", "BM": "constexpr", "BK": "constexpr",
           "ROUND": "constexpr", "UPCAST": "constexpr", "MANUAL_E4M3": "constexpr"}
    consts = {"L": 512, "V": v, "BM": MV.block_rows(v), "BK": 64, "ROUND": 1, "UPCAST": False, "MANUAL_E4M3": False}
    return compile_stats(MV._value_proj_fp8_kernel, sig, consts, 8, 3,
                         div16=("stride_lt", "stride_lh", "stride_wh", "stride_wv", "stride_qt", "stride_st"), **opts)


def mla_hopper_job(variant: str):
    """(kernel, signature, constexprs, num_warps) of a Gluon prefill kernel as its launcher specialises it:
    "one_partition" (ids prefetched, early P V), "ws", "ws_bk32" or "seesaw" (sparse_mla_hopper's variants)."""
    from dsaserve.kernels import sparse_mla_hopper as H

    sig = {k: v for k, v in mla_hopper_signature().items() if k not in ("PREFETCH_IDS", "EARLY_PV", "PROBE")}
    consts = {"BH": 64, "BK": 64, "DV": 512, "DR": 64, "num_warps": 8}
    if variant == "one_partition":
        consts.update(PREFETCH_IDS=True, EARLY_PV=True, PROBE=0)
        return H._sparse_mla_prefill_kernel, mla_hopper_signature(), consts, 8
    if variant in ("ws", "ws_bk32"):
        sig.update(NBUF="constexpr", PRODUCER_REGS="constexpr")
        consts.update(NBUF=2, PRODUCER_REGS=H.WS_PRODUCER_REGS)
        if variant == "ws_bk32":
            consts.update(BK=H.WS32_BK, NBUF=H.WS32_NBUF, PRODUCER_REGS=H.WS32_PRODUCER_REGS)
        return H._sparse_mla_prefill_ws_kernel, sig, consts, 8
    if variant == "roles":
        sig.update(NBUF="constexpr", VALUE_REGS="constexpr", PRODUCER_REGS="constexpr", WIDE="constexpr",
                   PROBE="constexpr")
        consts.update(NBUF=2, VALUE_REGS=H.ROLES_VALUE_REGS, PRODUCER_REGS=H.ROLES_PRODUCER_REGS, WIDE=False,
                      PROBE=0, num_warps=4)
        return H._sparse_mla_prefill_roles_kernel, sig, consts, 4
    if variant == "pair":
        sig.update(MATH_REGS="constexpr", WIDE="constexpr", PROBE="constexpr", EARLY_S="constexpr")
        consts.update(MATH_REGS=H.PAIR_MATH_REGS, WIDE=False, PROBE=0, num_warps=4, EARLY_S=True)
        return H._sparse_mla_prefill_pair_kernel, sig, consts, 4
    assert variant == "seesaw", variant
    sig.update(NBUF="constexpr", REGS0="constexpr", REGS1="constexpr")
    consts.update(BK=H.SEESAW_BK, NBUF=H.SEESAW_NBUF, REGS0=H.SEESAW_CONSUMER_REGS[0],
                  REGS1=H.SEESAW_CONSUMER_REGS[1], num_warps=4)
    return H._sparse_mla_prefill_seesaw_kernel, sig, consts, 4


def mla_hopper_stats(variant: str, **kw) -> dict:
    """compile_stats of ``mla_hopper_job(variant)``. Needs a process without TRITON_INTERPRET: the interpreter
    wraps triton.language's own jit helpers (gl.max's combine function) at import, which the Gluon frontend
    then refuses (tests/scripts/test_gluon_compiles.py runs this in a clean subprocess)."""
    fn, sig, consts, warps = mla_hopper_job(variant)
    from dsaserve.kernels.sparse_mla_hopper import LAUNCH_MAXNREG

    return compile_stats(fn, sig, consts, warps, 1, div16=DIV16, gluon=True, maxnreg=LAUNCH_MAXNREG.get(variant), **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="logits,topk,mla,mla_hopper,moe_hopper,logits_hopper",
                    help="comma list: logits, topk, mla, mla_hopper (the Gluon sparse MLA prefill kernel), "
                         "moe_hopper (the Gluon grouped MoE GEMM), logits_hopper (the Gluon indexer logits)")
    ap.add_argument("--dump", default=None, help="write ttgir / ptx / sass per kernel here")
    args = ap.parse_args()
    only = set(args.only.split(","))
    jobs = []
    if "logits" in only:
        from dsaserve.kernels.indexer_logits import _mqa_logits_kernel

        for h, bq, bk, w, st in [(64, 4, 64, 4, 3), (32, 8, 64, 4, 3), (32, 4, 64, 4, 3)]:
            jobs.append((f"logits_h{h}_bq{bq}_bk{bk}_w{w}_s{st}", _mqa_logits_kernel, logits_signature(),
                         {"H": h, "D": 128, "BQ": bq, "BK": bk, "KEY_STRIDE": 1}, w, st))
    if "topk" in only:
        from dsaserve.kernels.indexer_topk import (_merge_splits_topk, _mqa_topk_kernel, cut_chunk, filter_parts,
                                                   list_slots)

        for cut in ("radix16", "bisect"):  # the chunked 16-ary list cut (default) and the old bisection
            shapes = [(64, 4, 16, 2, False), (32, 8, 16, 2, False), (64, 4, 16, 2, True)]
            if cut == "radix16":  # capacity factor 4 (C = 16384, chunks of 2048): fewer cuts, cost ~ live entries
                shapes += [(64, 4, 16, 4, False), (64, 4, 32, 4, False), (32, 8, 32, 4, False)]
            for h, bq, r, cf, split in shapes:
                c = list_slots(2048, 64, r, cf)
                jobs.append((f"topk_{cut}_h{h}_bq{bq}_r{r}_cf{cf}{'_split' if split else ''}", _mqa_topk_kernel,
                             topk_signature(), {"H": h, "D": 128, "BQ": bq, "BK": 64, "C": c, "R": r, "HAS_OFF": False,
                                                "SPLIT": split, "CUT16": cut == "radix16", "CH": cut_chunk(c, 1024),
                                                "FILT": filter_parts(bq, 64, r, 4)},
                             4, 3))
            jobs.append((f"topk_{cut}_merge", _merge_splits_topk, merge_signature(),
                         {"M": 8 * 2048, "HAS_OFF": False, "CUT16": cut == "radix16", "CH": 1024}, 16, 1))
    if "mla" in only:
        from dsaserve.kernels.sparse_attention import _sparse_mla_kernel

        for bk, st in [(64, 2), (32, 3)]:
            jobs.append((f"mla_orig_bh64_bk{bk}_s{st}", _sparse_mla_kernel, mla_signature(),
                         {"DV": 512, "DR": 64, "BH": 64, "BK": bk, "N_HB": 2, "NSPLIT": 1, "UPCAST": False,
                          "PREFETCH_IDX": False}, 8, st))
    if "mla_hopper" in only:
        from dsaserve.kernels.sparse_mla_hopper import _sparse_mla_prefill_kernel

        for pre, early in ((True, True), (True, False), (False, False)):
            jobs.append((f"mla_hopper_bh64_bk64{'' if pre else '_noprefetch'}{'' if early else '_latepv'}",
                         _sparse_mla_prefill_kernel, mla_hopper_signature(),
                         {"BH": 64, "BK": 64, "DV": 512, "DR": 64, "PREFETCH_IDS": pre, "EARLY_PV": early, "PROBE": 0,
                          "num_warps": 8}, 8, 1))
    if "mla_hopper" in only:
        from dsaserve.kernels.sparse_mla_hopper import WS_PRODUCER_REGS

        fn, sig, consts, w = mla_hopper_job("ws")
        jobs.append((f"mla_hopper_ws_r{WS_PRODUCER_REGS}", fn, sig, consts, w, 1))
        fn, sig, consts, w = mla_hopper_job("ws_bk32")
        jobs.append((f"mla_hopper_ws_bk{consts['BK']}_nbuf{consts['NBUF']}_r{consts['PRODUCER_REGS']}", fn, sig, consts,
                     w, 1))
        fn, sig, consts, w = mla_hopper_job("seesaw")
        jobs.append((f"mla_hopper_seesaw_bk{consts['BK']}_nbuf{consts['NBUF']}_r{consts['REGS0']}_{consts['REGS1']}",
                     fn, sig, consts, w, 1))
    if "moe_hopper" in only:
        jobs += [moe_hopper_job(True), moe_hopper_job(False), moe_hopper_job(False, pair=False),
                 moe_hopper_job(False, out="*fp32"), moe_hopper_job(True, ahead=1, blocked=False),
                 moe_hopper_job(False, ahead=1, blocked=False)]
    if "logits_hopper" in only:
        jobs += [logits_hopper_job(h) for h in (64, 32, 128)]
    for name, fn, sig, consts, w, st, *opts in jobs:
        try:
            r = compile_stats(fn, sig, consts, w, st, args.dump, name, div16=DIV16, gluon="hopper" in name,
                              **(opts[0] if opts else {}))
        except Exception as e:  # report and go on
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        layouts = "; ".join(r.pop("mma_layouts"))
        print(f"{name}: {r}\n    mma: {layouts}", flush=True)


if __name__ == "__main__":
    main()
