"""Indexer prefill logits for Hopper (sm_90) in Gluon: a producer / two-consumer schedule.

Why: the Triton kernel (``indexer_logits._mqa_logits_kernel``) stops at ~0.7 of the fp8 ceiling because a
program waits for its own MMA before the epilogue (ReLU, head weights, head sum, key scale, store: ~420 issue
cycles per 64-key tile against ~550 of MMA), so only the two programs resident on an SM overlap, and a third
does not fit in the registers (benchmarks/KERNELS_NOTES.md, "mqa_logits: why 916"). Here the overlap is
explicit, as in the grouped MoE GEMM (``moe_gemm_hopper``):

* One program per SM, persistent over blocks of BQ queries (BQ * H = 256: one MMA's N dimension).
* A producer partition loads each block's queries [BQ * H, D] once (TMA, two buffers so the next block's
  arrive while this one's last tiles run) and streams the block's key tiles [64, D] (TMA) through a ring.
* Two consumer partitions (one warpgroup each) take the block's key tiles in turn (tile j goes to consumer
  j % 2). Per tile: S = K Q^T [64 keys, BQ * H] (one async MMA), the key scales loaded while it runs, then
  the epilogue; meanwhile the other consumer's MMA runs. The head sum runs along the MMA's N dimension, which
  each thread mostly holds in its own registers; a reduce-scatter over the quad of lanes that share a key row
  finishes it, so each (key, query) ends in one lane (``_quad_scatter_sum``; 4+ queries a block).
* Key tiles wholly outside every row's [ks, ke) get -inf stores only (no loads, no MMA), split the same way.

Same contract and the same result as the Triton kernel (``mqa_logits_triton``): the same MMA, and the ReLU,
head weights and head sums as the same fp32 operations in the same order (bit-identical on H200, 2026-12-03;
tests/gpu/test_indexer_logits_hopper.py allows 1e-6 of the largest logit). Measured: 951 TFLOPS at H = 64 vs
Triton's 906 (benchmarks/KERNELS_NOTES.md, "Indexer logits in Gluon"); 1003-1021 with ``relu_add`` and the
``balanced`` schedule (session 21, ``LogitsHopperConfig``). Gluon has no CPU interpreter: CI
compiles the kernel (tests/scripts/test_gluon_compiles.py); the numerics are tested on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import device_sm_count
from .tile_split import tile_split

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from .mma_turns import end_turn, take_turn, turn_barrier

    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

BKV = 64  # keys per tile: one warpgroup's MMA M
N_COLS = 256  # (query, head) columns of one MMA: BQ = N_COLS // H queries a block (at most 256 heads)
NUM_WARPS = 4  # the default partition (consumer 0); consumer 1 and the producer add 4 warps each
# 240 / 24 since session 20 (H200, 2026-12-05, same run): logits 912 vs 879-886 TFLOPS at H = 32, 957 vs 951-952 at
# H = 64; the H = 32 threshold path 1.104x the logits kernel vs 1.161x (docs/BENCHMARKS.md)
CONSUMER_REGS = 240
PRODUCER_REGS = 24   # setmaxnreg's floor: the producer only issues TMA copies and waits
MAXNREG = 168  # (240 + 240 + 24) / 3: the register file of 384 threads
# Measured and dropped (H200 2026-12-03, commit f5f804e): 3 consumers x 128 columns (160 registers each) 827
# TFLOPS at H = 64, 4 x 128 (112 registers, spills) 677, against 945 for 2 x 256 in the same run.


@dataclass(frozen=True)
class LogitsHopperConfig:
    """Launch knobs: ``stages`` key tiles in the producer's ring (8 KB each at D = 128); ``ordered``: the two
    consumers issue their MMAs in tile order (``mma_turns``); ``consumer_regs``: each consumer warpgroup's
    registers, the producer getting the rest of 3 x MAXNREG (232 / 40, or 240 / 24: setmaxnreg's floor, where
    ptxas stops spilling at H = 32: compile_report, sm_90, the logits kernel 16 -> 0 bytes of stack, the threshold
    filter 104 -> 48; the default since it was measured). ``ordered`` measured slower (session 20).

    ``relu_add``: the epilogue takes 2 relu(s) as s + |s| (an FADD on the FMA pipe) instead of max(s, 0) (an
    FMNMX on the half-rate ALU pipe) and halves the head sums (exact); None (the default): on for the logits, and
    for the filter below 64 heads only (H200 2026-12-05, call 2: at H = 64 the filter took 9.08 / 9.25 ms with
    it, 8.94 without, the whole top-k path 9.69 / 9.49; at H = 32 4.82 / 4.89 with, 4.92 without).

    ``balanced``: the query blocks' key tiles split evenly over the programs (``tile_split``) instead of whole
    blocks strided over them. With relu_add 1003 / 1021 TFLOPS at H = 64 against 937-962 without (H200,
    2026-12-05, session 21). The logits do not change. The threshold filter's candidates stay the same set, in
    other slots for the rows of split blocks, but a split block's parts get only their share of each stream's
    slots, and in the engine the overflows this caused cost more redone rows (top-k phase 38 -> 83 ms at 64K) than
    the split saved (indexer 366 -> 341 ms): balanced is on in ``default_config`` (the logits), off here (the
    filter's default) until the parts share slots better."""

    stages: int = 4
    ordered: bool = False
    consumer_regs: int = CONSUMER_REGS
    relu_add: bool | None = None
    balanced: bool = False

    def __post_init__(self):
        if self.consumer_regs % 8 or not 24 <= self.producer_regs <= 256:
            raise ValueError(f"LogitsHopperConfig: consumer_regs must be a multiple of 8 leaving the producer 24 to "
                             f"256 of {3 * MAXNREG} registers (232 or 240), got {self.consumer_regs}")

    @property
    def producer_regs(self) -> int:
        return 3 * MAXNREG - 2 * self.consumer_regs


if HAVE_GLUON:

    @gluon.constexpr_function
    def _logits_layout(h, n_cols):
        """LS, the layout of the consumers' logits, for H heads and n_cols MMA columns (4 warps). Made inside the
        kernel from constexpr ints, not passed as an argument: with Triton's JIT hooks set (the engine's compile
        watch) Triton serializes every constexpr argument to JSON, which a layout object is not. Self-contained:
        a constexpr function may call no other Python function.

        BQ = n_cols // h >= 4: the [64 keys, BQ] logits after ``_quad_scatter_sum``. The four lanes of a quad,
        which share a key row's partial head sums in the MMA layout, each end with a different query (lane bit
        0 -> query bit 1, lane bit 1 -> query bit 0), the higher query bits in registers, rows as in the MMA
        layout: every (key, query) in exactly one thread (no replicated lanes, no predicated stores).

        Otherwise the [64 keys, BQ, H] view of the MMA's [64, BQ * H] fp32 result: column c = q * H + h of the
        wgmma accumulator (m64nNk32, warps along M) is held by register bit 0 (c & 1), lanes 0-1 (c bits 1-2) and
        register bits 2.. (c bits 3..); rows by lanes 2-4, register bit 1 (+8) and the warps (+16, +32).
        Reshaping into it moves no data."""
        h, n_cols = int(h), int(n_cols)
        lh, lc = h.bit_length() - 1, n_cols.bit_length() - 1
        bq = n_cols // h
        if bq >= 4:
            return gl.DistributedLinearLayout(
                reg_bases=[[8, 0]] + [[0, 1 << i] for i in range(2, lc - lh)],
                lane_bases=[[0, 2], [0, 1], [1, 0], [2, 0], [4, 0]], warp_bases=[[16, 0], [32, 0]],
                block_bases=[], shape=[64, bq])
        col = [[0, 1 << i] if i < lh else [1 << (i - lh), 0] for i in range(lc)]  # [dq, dh] of column bit i
        return gl.DistributedLinearLayout(
            reg_bases=[[0] + col[0], [8, 0, 0]] + [[0] + c for c in col[3:]],
            lane_bases=[[0] + col[1], [0] + col[2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[64, bq, h])


if HAVE_GLUON:

    @gluon.jit
    def _shfl_xor1(x):
        return gl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 1, 0x1f, -1;", "=r,r", [x], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _shfl_xor2(x):
        return gl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 2, 0x1f, -1;", "=r,r", [x], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _group_mask(x):
        """Per element (any int32 tensor x of the logits' layout): the lanes of this lane's query group, the 8
        lanes of the warp with the same lane bits 0-1 (``_logits_layout``, BQ >= 4: they hold one query's 8 keys
        of a register)."""
        return gl.inline_asm_elementwise(
            """{
            .reg .b32 l;
            mov.u32 l, %laneid;
            and.b32 l, l, 3;
            shl.b32 $0, 0x11111111, l;
            }""", "=r,r", [x], dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _group_prefix(passed, gmask):
        """Per element of the [64 keys, BQ] logits in LS with ``passed`` (int32 0 / 1) and its ``_group_mask``:
        the passing elements of the same register in lower lanes of the group in bits 0-15 (the element's rank
        among its group's appends), the group's total in bits 16-31. A warp vote: every lane of the warp must
        execute it."""
        return gl.inline_asm_elementwise(
            """{
            .reg .pred p;
            .reg .b32 b, m, t;
            setp.ne.b32 p, $1, 0;
            vote.sync.ballot.b32 b, p, -1;
            and.b32 b, b, $2;
            popc.b32 t, b;
            mov.u32 m, %lanemask_lt;
            and.b32 b, b, m;
            popc.b32 m, b;
            shl.b32 t, t, 16;
            or.b32 $0, t, m;
            }""", "=r,r,r", [passed, gmask], dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _candidate_key64(lg, kk):
        """A candidate as one int64: the logit's raw fp32 bits in the high word, the column (< 2^31) in the low
        word (the select orders them as (logit, column); EMPTY_KEY = -1 has a low word no column has)."""
        return (lg.to(gl.int32, bitcast=True).to(gl.int64) << 32) | kk.to(gl.int64)

    @gluon.jit
    def _quad_scatter_sum(v, BKV: gl.constexpr, BQ: gl.constexpr, H: gl.constexpr, LS: gl.constexpr):
        """[BKV, BQ * H] weighted ReLU products (MMA layout) -> [BKV, BQ] head sums in LS (``_logits_layout``).

        Head h = 8 hh + 2 hm + hl: a thread holds hl and hh, the quad's four lanes hm. Each thread first sums
        its own heads (the order the MMA-layout reduction uses), then a reduce-scatter over the quad: lanes l and
        l ^ 2 swap the halves of their partials split by query bit 0 and add, then lanes l and l ^ 1 by query
        bit 1. Every lane ends with the complete sums of its own queries, added as
        (p_l + p_l^2) + (p_l^1 + p_l^3): the bits of the shuffle butterfly ``gl.sum`` makes (xor 2, then xor 1),
        with 6 shuffles a thread instead of 2 per (key, query) and no lane holding a copy."""
        v5 = gl.reshape(v, [BKV, BQ, H // 8, 4, 2])
        part = gl.sum(gl.reshape(gl.permute(v5, [0, 1, 3, 2, 4]), [BKV, BQ, 4, H // 4]), axis=3)  # [BKV, BQ, hm]
        # lanes l, l ^ 2 (hm bit 1) split query bit 0: the lane keeps queries 2 j + hm1
        q_even, q_odd = gl.split(gl.permute(gl.reshape(part, [BKV, BQ // 2, 2, 4]), [0, 1, 3, 2]))
        hm = gl.expand_dims(gl.expand_dims(
            gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, q_even.type.layout))), 0), 0)
        hi = (hm & 2) != 0
        s1 = gl.where(hi, q_odd, q_even) + _shfl_xor2(gl.where(hi, q_even, q_odd))  # [BKV, BQ // 2, hm]
        # lanes l, l ^ 1 (hm bit 0) split query bit 1: the lane keeps queries 4 i + 2 hm0 + hm1
        j_even, j_odd = gl.split(gl.permute(gl.reshape(s1, [BKV, BQ // 4, 2, 4]), [0, 1, 3, 2]))
        hm2 = gl.expand_dims(gl.expand_dims(
            gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, j_even.type.layout))), 0), 0)
        lo = (hm2 & 1) != 0
        s2 = gl.where(lo, j_odd, j_even) + _shfl_xor1(gl.where(lo, j_even, j_odd))  # [BKV, BQ // 4, hm]
        z = gl.permute(gl.reshape(s2, [BKV, BQ // 4, 2, 2]), [0, 1, 3, 2])  # [BKV, i, hm0, hm1]
        return gl.convert_layout(gl.reshape(z, [BKV, BQ]), LS)  # query 4 i + 2 hm0 + hm1: no data movement

    @gluon.jit
    def _block_range(qb, ks_ptr, ke_ptr, S, SKV, BQ: gl.constexpr, BKV: gl.constexpr, layout: gl.constexpr):
        """Key tiles [kb_lo, kb_hi) that hold a key some row of query block ``qb`` sees (empty: kb_lo == kb_hi);
        every partition computes the same range."""
        qi = qb * BQ + gl.arange(0, BQ, layout=layout)
        qim = qi < S
        ks = gl.maximum(gl.load(ks_ptr + qi, mask=qim, other=0), 0)
        ke = gl.minimum(gl.load(ke_ptr + qi, mask=qim, other=0), SKV)
        live = qim & (ke > ks)
        lo = gl.min(gl.where(live, ks, SKV), axis=0)
        hi = gl.max(gl.where(live, ke, 0), axis=0)
        kb_lo = lo // BKV
        kb_hi = gl.where(hi > lo, (hi + BKV - 1) // BKV, kb_lo)
        return kb_lo, kb_hi

    @gluon.jit
    def _program_blocks(prog_ptr, n_qb, BALANCED: gl.constexpr):
        """(first block, end block, step, t0, t1): the query blocks this program visits. Strided: every
        num_programs-th block, whole. BALANCED: the contiguous blocks that hold a tile of this program's share
        [t0, t1) of all the blocks' live tiles in order (``tile_split``), or whose -inf tiles are its duty."""
        if BALANCED:
            row = prog_ptr + 4 * gl.program_id(0)
            b0 = gl.load(row)
            b1 = gl.load(row + 1)
            t0 = gl.load(row + 2)
            t1 = gl.load(row + 3)
            step = 1
        else:
            b0 = gl.program_id(0)
            b1 = n_qb
            step = gl.num_programs(0)
            t0 = 0
            t1 = 0
        return b0, b1, step, t0, t1

    @gluon.jit
    def _portion(qb, blk_ptr, n_qb, n_kb, t0, t1, ks_ptr, ke_ptr, S, SKV, BQ: gl.constexpr, BKV: gl.constexpr,
                 layout: gl.constexpr, BALANCED: gl.constexpr):
        """This program's part of query block ``qb``: (first key tile, tile count, the -inf tiles [PART..neg_end)
        and [neg_start + PART..n_kb) dealt to the consumers, the part's first tile j0 within the block's live
        tiles, their count n_blk). Strided: the whole block. BALANCED: the block's live tiles [kb_lo, kb_lo +
        n_blk) are numbered from its prefix pre0 in the sequence of all blocks' tiles, this program computes those
        in [t0, t1), and the block's -inf tiles only if the block starts in its share (pre0 >= t0: exactly one
        program's duty)."""
        if BALANCED:
            pre0 = gl.load(blk_ptr + qb)
            pre1 = gl.load(blk_ptr + qb + 1)
            kb_lo = gl.load(blk_ptr + (n_qb + 1) + qb)
            j0 = gl.maximum(t0 - pre0, 0)
            k_first = kb_lo + j0
            n_t = gl.minimum(t1, pre1) - pre0 - j0
            duty = pre0 >= t0
            neg_end = gl.where(duty, kb_lo, 0)
            neg_start = gl.where(duty, kb_lo + (pre1 - pre0), n_kb)
            n_blk = pre1 - pre0
        else:
            kb_lo, kb_hi = _block_range(qb, ks_ptr, ke_ptr, S, SKV, BQ, BKV, layout)
            k_first = kb_lo
            n_t = kb_hi - kb_lo
            neg_end = kb_lo
            neg_start = kb_hi
            j0 = 0
            n_blk = n_t
        return k_first, n_t, neg_end, neg_start, j0, n_blk

    @gluon.jit
    def _producer(q_desc, k_desc, ks_ptr, ke_ptr, blk_ptr, prog_ptr, q_bufs, k_bufs, q_ready, q_empty, k_ready,
                  k_empty, S, SKV, n_qb, H: gl.constexpr, D: gl.constexpr, BQ: gl.constexpr, BKV: gl.constexpr,
                  STAGES: gl.constexpr, BALANCED: gl.constexpr):
        """Per query block: its queries into Q buffer ``n % 2``, then its key tiles into ring slots ``it % STAGES``."""
        idx_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        n_kb = (SKV + BKV - 1) // BKV
        it = 0
        n = 0
        b0, b1, step, t0, t1 = _program_blocks(prog_ptr, n_qb, BALANCED)
        for qb in range(b0, b1, step):
            k_first, n_t, neg_end, neg_start, j0, n_blk = _portion(qb, blk_ptr, n_qb, n_kb, t0, t1, ks_ptr, ke_ptr, S,
                                                                   SKV, BQ, BKV, idx_l, BALANCED)
            qs = n % 2
            mbarrier.wait(q_empty.index(qs), ((n // 2) & 1) ^ 1)  # a fresh barrier passes phase 1
            mbarrier.expect(q_ready.index(qs), BQ * H * D)
            tma.async_copy_global_to_shared(q_desc, [qb * BQ * H, 0], q_ready.index(qs), q_bufs.index(qs))
            for kb in range(k_first, k_first + n_t):
                s = it % STAGES
                mbarrier.wait(k_empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(k_ready.index(s), BKV * D)  # rows past SKV arrive as zeros, counted in full
                tma.async_copy_global_to_shared(k_desc, [kb * BKV, 0], k_ready.index(s), k_bufs.index(s))
                it += 1
            n += 1

    @gluon.jit
    def _consumer(q_bufs, k_bufs, q_ready, q_empty, k_ready, k_empty, turn, ksc_ptr, w_ptr, ks_ptr, ke_ptr,
                  out_ptr, thr_ptr, cand_ptr, cnt_ptr, blk_ptr, prog_ptr, S, SKV, n_qb, PART: gl.constexpr,
                  H: gl.constexpr, BQ: gl.constexpr, BKV: gl.constexpr, STAGES: gl.constexpr, FILTER: gl.constexpr,
                  CAPS: gl.constexpr, ORDERED: gl.constexpr, RELU_ADD: gl.constexpr, BALANCED: gl.constexpr):
        """Key tiles j = PART, PART + 2, ... of every query block: MMA, then ReLU / weights / head sum / scale of
        a [64 keys, BQ] logits tile, then either the masked store (logits) or, with FILTER, the threshold filter:
        each valid logit >= thr[q] is appended to the query's candidates (see ``mqa_threshold_candidates``).
        ORDERED: the two consumers issue their MMAs in turn (``mma_turns``): this consumer's i-th (``turns``) is
        issue 2 i + PART; in a block of an odd tile count consumer 1 passes one turn at the end, so both take
        ceil(n_t / 2) a block and the issues stay in the ring's tile order."""
        N: gl.constexpr = BQ * H
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, N, 32])
        LS: gl.constexpr = _logits_layout(H, BQ * H)
        SCATTER: gl.constexpr = BQ >= 4  # LS: the [BKV, BQ] logits, else the [BKV, BQ, H] products
        if SCATTER:
            lg_l: gl.constexpr = LS
        else:
            lg_l: gl.constexpr = gl.SliceLayout(2, LS)  # [BKV, BQ] logits
        key_l: gl.constexpr = gl.SliceLayout(1, lg_l)
        qry_l: gl.constexpr = gl.SliceLayout(0, lg_l)
        idx_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        kr = gl.arange(0, BKV, layout=key_l)
        n_kb = (SKV + BKV - 1) // BKV
        acc = gl.zeros([BKV, N], gl.float32, layout=acc_l)
        NSTREAM: gl.constexpr = 2 * (BKV // 8)  # candidate streams a query (STREAMS)
        if FILTER:  # candidate stream of each key row: this consumer's 8-row group (8 lanes of one warp)
            stream = PART * (BKV // 8) + kr // 8  # [BKV]
            slot_in = kr % 8  # the row's lane within its group
            gmask = _group_mask(gl.zeros([BKV, BQ], gl.int32, layout=lg_l))  # [BKV, BQ], the same every tile
        it = 0
        n = 0
        turns = 0
        b0, b1, step, t0, t1 = _program_blocks(prog_ptr, n_qb, BALANCED)
        for qb in range(b0, b1, step):
            k_first, n_t, neg_end, neg_start, j0, n_blk = _portion(qb, blk_ptr, n_qb, n_kb, t0, t1, ks_ptr, ke_ptr, S,
                                                                   SKV, BQ, BKV, idx_l, BALANCED)
            q0 = qb * BQ
            qloc = gl.arange(0, BQ, layout=qry_l)
            qim = qloc < S - q0
            out_blk = out_ptr + q0.to(gl.int64) * SKV  # the block's first row; rows then go by 32-bit offsets
            row_off = qloc * SKV  # [BQ]
            # a tile [k0, k0 + BKV) inside every row's range needs no mask (most tiles): k0 >= ks_max and
            # k0 + BKV <= ke_min; a block with a row past S or an empty row has no such tile
            ks_b = gl.load(ks_ptr + q0 + qloc, mask=qim, other=2147483647)
            ke_b = gl.load(ke_ptr + q0 + qloc, mask=qim, other=-1)
            ks_max = gl.max(ks_b, axis=0)
            ke_min = gl.minimum(gl.min(ke_b, axis=0), SKV)
            # tiles outside every row's range: -inf only, no MMA
            if FILTER:  # per (stream, query) candidates so far; the lanes of a group hold the same count
                thr = gl.load(thr_ptr + q0 + qloc, mask=qim, other=float("inf"))  # [BQ]
                cand_blk = cand_ptr + q0.to(gl.int64) * (NSTREAM * CAPS)  # [BQ, NSTREAM, CAPS] int64
                base = gl.zeros([BKV, BQ], gl.int32, layout=lg_l)
                if BALANCED:  # this part's slots [r_lo, r_hi) of each stream: its share of the block's live tiles
                    r_lo = (CAPS * j0) // gl.maximum(n_blk, 1)
                    r_hi = gl.where(n_blk > 0, (CAPS * (j0 + n_t)) // gl.maximum(n_blk, 1), CAPS)
            else:
                neg = gl.full([BKV, BQ], float("-inf"), gl.float32, layout=lg_l)
                for kb in range(PART, neg_end, 2):
                    kk = kb * BKV + kr
                    gl.store(out_blk + row_off[None, :] + kk[:, None], neg, mask=(kk < SKV)[:, None] & qim[None, :])
                for kb in range(neg_start + PART, n_kb, 2):
                    kk = kb * BKV + kr
                    gl.store(out_blk + row_off[None, :] + kk[:, None], neg, mask=(kk < SKV)[:, None] & qim[None, :])
            # head weights of the block's (query, head) columns: [N]
            cols = gl.arange(0, N, layout=gl.SliceLayout(0, acc_l))
            w = gl.load(w_ptr + q0.to(gl.int64) * H + cols, mask=cols < (S - q0) * H, other=0.0)  # [N]
            qs = n % 2
            mbarrier.wait(q_ready.index(qs), (n // 2) & 1)
            q_t = q_bufs.index(qs).permute((1, 0))  # [D, N]: K-major B operand
            for j in range(PART, n_t, 2):
                s = (it + j) % STAGES
                mbarrier.wait(k_ready.index(s), ((it + j) // STAGES) & 1)
                if ORDERED:
                    take_turn(turn, 2 * turns + PART)
                acc = warpgroup_mma(k_bufs.index(s), q_t, acc, use_acc=False, is_async=True)
                if ORDERED:
                    end_turn(turn)
                    turns += 1
                k0 = (k_first + j) * BKV
                kk = k0 + kr
                kmask = kk < SKV
                ksc = gl.load(ksc_ptr + kk, mask=kmask, other=0.0)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(k_empty.index(s), count=1)  # the slot's one owner is done with it
                if RELU_ADD:  # 2 relu(s) = s + |s| (exact): an FADD on the FMA pipe for the ALU pipe's FMNMX
                    v = (acc + gl.abs(acc)) * w[None, :]
                else:
                    v = gl.maximum(acc, 0.0) * w[None, :]
                if SCATTER:
                    lg = _quad_scatter_sum(v, BKV, BQ, H, LS)  # [BKV, BQ], each (key, query) in one thread
                else:
                    v3 = gl.convert_layout(gl.reshape(v, [BKV, BQ, H]), LS)  # no data movement (same linear layout)
                    lg = gl.sum(v3, axis=2)  # [BKV, BQ]
                if RELU_ADD:  # the sums are exactly twice relu's: halving is exact, so the logits' bits are the same
                    lg = lg * 0.5
                lg = lg * ksc[:, None]
                if FILTER:
                    passed = lg >= thr[None, :]
                    if (k0 < ks_max) | (k0 + BKV > ke_min):  # an edge tile: each row's own range
                        ks = gl.load(ks_ptr + q0 + qloc, mask=qim, other=0)
                        ke = gl.load(ke_ptr + q0 + qloc, mask=qim, other=0)
                        passed = passed & (kk[:, None] >= ks[None, :]) & (kk[:, None] < ke[None, :])
                        passed = passed & kmask[:, None] & qim[None, :]
                    pre = _group_prefix(passed.to(gl.int32), gmask)  # [BKV, BQ]: rank in the group | total << 16
                    # (offsets made here from the aranges, not kept across the loop: registers are short at H = 32)
                    cand_off = (qloc[None, :] * NSTREAM + stream[:, None]) * CAPS  # [BKV, BQ]
                    if BALANCED:
                        slot = r_lo + base + (pre & 0xFFFF)
                        store_ok = passed & (slot < r_hi)
                    else:
                        slot = base + (pre & 0xFFFF)
                        store_ok = passed & (slot < CAPS)
                    gl.store(cand_blk + cand_off + slot, _candidate_key64(lg, kk[:, None]), mask=store_ok)
                    base = base + (pre >> 16)
                else:
                    ptrs = out_blk + row_off[None, :] + kk[:, None]
                    if (k0 >= ks_max) & (k0 + BKV <= ke_min):
                        gl.store(ptrs, lg)
                    else:  # an edge tile: each row's own range (reloaded: rare, and keeps registers free)
                        ks = gl.load(ks_ptr + q0 + qloc, mask=qim, other=0)
                        ke = gl.load(ke_ptr + q0 + qloc, mask=qim, other=0)
                        valid = (kk[:, None] >= ks[None, :]) & (kk[:, None] < ke[None, :])
                        gl.store(ptrs, gl.where(valid, lg, float("-inf")), mask=kmask[:, None] & qim[None, :])
            if FILTER:  # each (stream, query): its count, and the slots it did not fill marked empty
                first = (slot_in == 0)[:, None] & qim[None, :]
                empty = gl.full([BKV, BQ], -1, gl.int64, layout=lg_l)  # EMPTY_KEY
                cand_off = (qloc[None, :] * NSTREAM + stream[:, None]) * CAPS  # [BKV, BQ]
                if BALANCED:  # the parts of a split block add their counts; one past its slots poisons the row's
                    # count (> CAPS: the select flags the row for the exact redo, as any overflow)
                    over = gl.where(base > r_hi - r_lo, CAPS + 1, 0)
                    gl.atomic_add(cnt_ptr + (q0 + qloc)[None, :] * NSTREAM + stream[:, None], base + over, mask=first)
                    for c0 in range(r_lo, r_hi, 8):
                        slot = c0 + slot_in[:, None]
                        gl.store(cand_blk + cand_off + slot, empty,
                                 mask=(slot >= r_lo + base) & (slot < r_hi) & qim[None, :])
                else:
                    gl.store(cnt_ptr + (q0 + qloc)[None, :] * NSTREAM + stream[:, None], base, mask=first)
                    for c0 in range(0, CAPS, 8):
                        slot = c0 + slot_in[:, None]
                        # (slot < CAPS: the last 8 may pass the stream's end when CAPS is not a multiple of 8)
                        gl.store(cand_blk + cand_off + slot, empty, mask=(slot >= base) & (slot < CAPS) & qim[None, :])
            if ORDERED and PART == 1:
                if n_t % 2 == 1:  # consumer 0 took the block's last tile: the turn that pairs with it, no MMA
                    take_turn(turn, 2 * turns + PART)
                    end_turn(turn)
                    turns += 1
            mbarrier.arrive(q_empty.index(qs), count=1)  # this consumer's MMAs on the block's queries are done
            it += n_t
            n += 1

    @gluon.jit
    def _mqa_logits_hopper_kernel(q_desc, k_desc, ksc_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr, thr_ptr, cand_ptr,
                                  cnt_ptr, blk_ptr, prog_ptr, S, SKV, H: gl.constexpr, D: gl.constexpr,
                                  BQ: gl.constexpr,
                                  BKV: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                  PRODUCER_REGS: gl.constexpr, FILTER: gl.constexpr = False, CAPS: gl.constexpr = 0,
                                  ORDERED: gl.constexpr = False, RELU_ADD: gl.constexpr = False,
                                  BALANCED: gl.constexpr = False):
        """Persistent indexer logits: query blocks of BQ strided over the programs, their key tiles dealt to the
        two consumer warpgroups in turn (see the module docstring). FILTER: no logits; each valid logit >=
        thr[q] goes to the query's candidates instead (``mqa_threshold_candidates``)."""
        n_qb = (S + BQ - 1) // BQ
        q_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2, BQ * H, D], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BKV, D], k_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # both consumers
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=1)  # the tile's one consumer
        if ORDERED:  # the order of the consumers' MMA issues
            turn = turn_barrier()
        else:
            turn = q_ready  # unused: no allocation, so the default kernel's code stays as it was
        fence_async_shared()
        gl.thread_barrier()  # barriers initialised before any partition uses them
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, q_ready, q_empty, k_ready, k_empty, turn, ksc_ptr, w_ptr, ks_ptr,
                         ke_ptr, out_ptr, thr_ptr, cand_ptr, cnt_ptr, blk_ptr, prog_ptr, S, SKV, n_qb, 0, H, BQ, BKV,
                         STAGES, FILTER, CAPS, ORDERED, RELU_ADD, BALANCED)),
            (_consumer, (q_bufs, k_bufs, q_ready, q_empty, k_ready, k_empty, turn, ksc_ptr, w_ptr, ks_ptr,
                         ke_ptr, out_ptr, thr_ptr, cand_ptr, cnt_ptr, blk_ptr, prog_ptr, S, SKV, n_qb, 1, H, BQ, BKV,
                         STAGES, FILTER, CAPS, ORDERED, RELU_ADD, BALANCED)),
            (_producer, (q_desc, k_desc, ks_ptr, ke_ptr, blk_ptr, prog_ptr, q_bufs, k_bufs, q_ready, q_empty, k_ready,
                         k_empty, S, SKV, n_qb, H, D, BQ, BKV, STAGES, BALANCED)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


def unsupported_reason(q_fp8: torch.Tensor) -> str | None:
    """Why this kernel cannot take the input (None = it can): Gluon, an sm_90 GPU, D = 128, H a power of two
    from 16 to 256 (BQ * H = 256 columns per MMA)."""
    if not HAVE_GLUON:
        return "this Triton has no Gluon"
    if not q_fp8.is_cuda or torch.cuda.get_device_capability(q_fp8.device)[0] != 9:
        return "not an sm_90 (Hopper) GPU"
    _, h, d = q_fp8.shape
    if d != 128:
        return f"the head dim must be 128, got {d}"
    if h < 16 or h > N_COLS or h & (h - 1):
        return f"the head count must be a power of two in [16, {N_COLS}], got {h}"
    return None


def _desc(t: torch.Tensor, block: list[int]):
    """Gluon tensor descriptor over a 2-D e4m3 tensor, blocks ``block`` (128-byte swizzle)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)
    return TensorDescriptor.from_tensor(t, block, layout)


# ``kernels.mqa_logits(kernel="auto")`` takes this kernel from this many keys: a query block's setup (its queries,
# head weights, -inf tiles, two partitions' hand-over) is paid per block by one program per SM, so on short
# ranges the Triton kernel's two programs per SM win (H200 2026-12-03: causal 4096^2 0.220 vs 0.184 ms; 8K
# queries at 64K keys 8.67 vs 9.10 ms)
AUTO_MIN_KEYS = 16384


def default_config(h: int) -> LogitsHopperConfig:
    """The logits kernel's launch: a 4-tile ring at every head count (H200 2026-12-03, 8K x 64K causal: 951
    TFLOPS at H = 64, 879 at H = 32; 8 tiles 945 / 873), relu_add and the balanced schedule (2026-12-05: 1003 at
    H = 64, 912 at H = 32)."""
    return LogitsHopperConfig(stages=4, balanced=True)


def relu_add(cfg: LogitsHopperConfig, h: int, filter_kernel: bool) -> bool:
    """``cfg.relu_add``, or where it is None the measured choice: the logits always, the filter below 64 heads."""
    return cfg.relu_add if cfg.relu_add is not None else (not filter_kernel or h < 64)


def launch_constexprs(h: int, d: int, cfg: LogitsHopperConfig, filter_kernel: bool = False) -> tuple[dict, dict]:
    """(constexpr arguments, launch options) of the kernel (``filter_kernel``: the threshold filter's launch) for H
    heads, head dim D and a config: plain ints only (Triton JSON-serializes them when JIT hooks are set;
    tests/kernels/test_indexer_logits_hopper_cpu.py)."""
    return (dict(H=h, D=d, BQ=N_COLS // h, BKV=BKV, STAGES=cfg.stages, CONSUMER_REGS=cfg.consumer_regs,
                 PRODUCER_REGS=cfg.producer_regs, ORDERED=int(cfg.ordered),
                 RELU_ADD=int(relu_add(cfg, h, filter_kernel)),
                 BALANCED=int(cfg.balanced)),
            dict(num_warps=NUM_WARPS, maxnreg=MAXNREG))


def _schedule(cfg: LogitsHopperConfig, ks, ke, s: int, skv: int, bq: int, num_sms: int | None, device):
    """(grid, blk, prog): the persistent grid and, for the balanced schedule, its plan (``tile_split``; strided:
    placeholders the kernel does not read)."""
    n_qb = -(-s // bq)
    n_kb = -(-skv // BKV)
    sms = num_sms if num_sms is not None else device_sm_count(device)
    if not cfg.balanced:
        return max(1, min(sms, n_qb)), ks, ks
    if n_qb * n_kb >= 2 ** 31:
        raise ValueError(f"indexer logits kernel: {s} queries x {skv} keys is {n_qb * n_kb} key tiles, past the "
                         f"balanced schedule's int32 tile numbers; split the queries or use balanced=False")
    grid = max(1, min(sms, n_qb * n_kb))  # blocks may split between programs: up to one program per tile
    blk, prog = tile_split(ks, ke, skv, bq, BKV, grid)
    return grid, blk, prog


def mqa_logits_hopper(q_fp8, k_fp8, k_scale, weights, ks, ke, num_sms: int | None = None,
                      config: LogitsHopperConfig | None = None) -> torch.Tensor:
    """As ``indexer_logits.mqa_logits_triton`` (contiguous inputs already checked by ``kernels.mqa_logits``):
    q [S, H, D] e4m3, k [SKV, D] e4m3, k_scale [SKV] fp32, weights [S, H] fp32, ks / ke int32 [S] -> fp32
    [S, SKV]. ``num_sms``: programs (SMs) the persistent grid may use."""
    s, h, d = q_fp8.shape
    skv = k_fp8.shape[0]
    out = torch.empty(s, skv, dtype=torch.float32, device=q_fp8.device)
    if s == 0 or skv == 0:
        return out
    cfg = config or default_config(h)
    consts, options = launch_constexprs(h, d, cfg)
    grid, blk, prog = _schedule(cfg, ks, ke, s, skv, consts["BQ"], num_sms, q_fp8.device)
    _mqa_logits_hopper_kernel[(grid,)](
        _desc(q_fp8.view(s * h, d), [consts["BQ"] * h, d]), _desc(k_fp8, [BKV, d]), k_scale, weights, ks, ke, out,
        out, out, out, blk, prog, s, skv, **consts, **options,
    )
    return out


STREAMS = 2 * BKV // 8  # candidate streams per query: (consumer, 8-row group of a key tile)
EMPTY_KEY = -1  # an empty candidate slot: low word 0xFFFFFFFF, which no column (< 2^31) has


def mqa_threshold_candidates(q_fp8, k_fp8, k_scale, weights, ks, ke, thr, caps: int, num_sms: int | None = None,
                             config: LogitsHopperConfig | None = None):
    """The logits kernel with a filter in place of the store: the keys of each row whose logit is >= thr[row]
    (inside the row's [ks, ke)), as int64 candidates (``_candidate_key64``: raw logit bits high, column low).

    Each query's candidates go to STREAMS = 16 streams of ``caps`` slots: a stream is one consumer's 8-row group
    of every key tile it takes (8 lanes of one warp), so a stream appends with a warp vote and a running count
    held in registers, no atomics; the streams split a row's keys evenly (rows j of every other tile).
    -> (cand int64 [S, STREAMS, caps], EMPTY_KEY in unfilled slots; count int32 [S, STREAMS], every key that
    passed, stored or not: a count > caps means the stream overflowed). Needs 256 / H >= 4 queries a block
    (H <= 64).

    Schedules (``config.balanced``): strided whole blocks (the default) fill each stream's first count slots.
    Balanced may split a block between programs; each part then fills the slots of its share of the block's live
    tiles ([caps j0 / n, caps j1 / n) for tiles [j0, j1) of n), adds its count atomically, and adds caps + 1 more
    when it overflows its slots, so that the select redoes the row as for any overflow. A row's stored keys are
    the same set either way."""
    s, h, d = q_fp8.shape
    skv = k_fp8.shape[0]
    if N_COLS // h < 4:
        raise ValueError(f"the threshold filter needs H <= {N_COLS // 4} heads, got {h}")
    cand = torch.empty(s, STREAMS, caps, dtype=torch.int64, device=q_fp8.device)
    count = torch.zeros(s, STREAMS, dtype=torch.int32, device=q_fp8.device)
    if s == 0:
        return cand, count
    if skv == 0:
        cand.fill_(EMPTY_KEY)
        return cand, count
    cfg = config or LogitsHopperConfig()
    consts, options = launch_constexprs(h, d, cfg, filter_kernel=True)
    grid, blk, prog = _schedule(cfg, ks, ke, s, skv, consts["BQ"], num_sms, q_fp8.device)
    _mqa_logits_hopper_kernel[(grid,)](
        _desc(q_fp8.view(s * h, d), [consts["BQ"] * h, d]), _desc(k_fp8, [BKV, d]), k_scale, weights, ks, ke,
        k_scale, thr, cand, count, blk, prog, s, skv, **consts, FILTER=True, CAPS=caps, **options,
    )
    return cand, count
