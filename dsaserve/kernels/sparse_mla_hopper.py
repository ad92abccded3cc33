"""Sparse MLA prefill for Hopper (sm_90) in Gluon, Triton's explicit-layout dialect.

Why a second kernel: the Triton kernel (``sparse_attention``) stays at ~250 TFLOPS on H200 because Triton
lays out a dot whose result feeds another dot along M only, so with 64 heads (M = one warpgroup) both
warpgroups compute the same S = Q K^T (benchmarks/KERNELS_NOTES.md). Gluon lets the layouts be chosen:

* One program = (token, 64 heads). In the "ws" kernel (8 compute warps) S [64 heads, 64 keys] is split over
  the two warpgroups by keys (``warps_per_cta=[4, 2]``): each computes its own 32 columns, no duplicate S.
  O [64, 512] is split by value columns the same way (each warpgroup owns 64 x 256 fp32 = 128 registers a
  thread).
* The selected latent rows are gathered with cp.async into two shared-memory key buffers (each
  [64, 512] + [64, 64] bf16); Q [64, 576] stays in shared memory. 216 KB in all: one program per SM.
* Per key block j the tensor core runs O += P_{j} V_{j} and S_{j+1} back to back (both issued async);
  the gather of block j+2 is issued as soon as O's MMA has released block j's buffer, and the softmax of
  j+1 runs on the CUDA cores after S_{j+1} lands. P goes to shared memory in the place of block j+1's
  rope columns (dead once S_{j+1} is done), which is what makes the two buffers fit.
* Row sums are kept as a [64, 64] tensor (one FMA per score) and reduced once at the end, so a block
  costs one cross-warpgroup reduction (the row max), not two.
* ``variant="ws"``: the warp-specialized form (``_sparse_mla_prefill_ws_kernel``): a third warpgroup (56
  registers) issues the gathers and hands buffers over with mbarriers, so the two compute warpgroups (224
  registers) no longer spend issue slots on 18 cp.async a thread per block nor stall on the load queue.
  Timing probes of the one-partition kernel (session 7): without the gathers 488, without the softmax 418,
  without both 595 TFLOPS (bf16 ceiling ~700).
* Default, ``variant="roles"`` (``_sparse_mla_prefill_roles_kernel``, session 17): one warpgroup per job. The
  score warpgroup computes S over all 64 keys of a block (N = 64, so Q is read from shared memory once per 64
  keys where "ws" reads it once per 32 in each of two warpgroups) and the softmax, and publishes P_j and the
  rescale alpha_j; two value warpgroups each own half of O's columns and do O *= alpha_j, O += P_j V_j while the
  score warpgroup works on block j+1; a fourth gathers. 512 threads: the kernel is compiled against 128
  registers a thread, and ptxas refuses any instruction that needs more even inside a partition that raised its
  limit, so the P V MMAs use N = 128 (an N = 256 fp32 accumulator needs 154).

Measured on H200 (t = 4096, 128 heads, top-k 2048, 64K-slot pool; docs/BENCHMARKS.md, sessions 7 and 17): "ws"
402-406 TFLOPS with random indices, "roles" 438-448 (1.08-1.11x; 64 heads 1.13-1.18x), Triton 248-251. Timing
probes of "roles" (session 17, wrong results on purpose; 128 heads, random, 5.25 ms in all): without the softmax
4.64 ms, without the gathers 4.41, without P V 3.84, without S 3.55, with none of S, P V and the gathers (the
softmax and the hand-overs alone) 1.73. The parts add up rather than overlap: with two key buffers (all that fits
beside Q) block j+2's gather can only start once P_j V_j is done, and the softmax of a block runs while the
tensor core has at most the previous block's P V.

Opt-in variant ``variant="pair"`` (``_sparse_mla_prefill_pair_kernel``, session 18; compiled and checked on the CPU,
not yet run on a GPU): the schedule FlashMLA's sparse prefill kernel describes, written here in Gluon. Two math
warpgroups (216 registers) work on alternate 64-key blocks (2i in buffer 0, 2i+1 in buffer 1), each computing its
own block's S (N = 64) and owning half of O's columns; a producer (72 registers) gathers. Per pair of blocks:
warpgroup 0 publishes its row max, warpgroup 1 folds in its own and publishes the pair's joint max, so P_1 is final
at once and P_0 is rescaled to it; each warpgroup does O += P V for its own block with P from registers (no
shared-memory round trip) and for the other's block with P from shared memory (over that buffer's rope columns).
Each buffer is refilled in two halves with their own barriers: the latent columns only its owner's P V reads are
freed right after that P V, the rest (other half, rope columns with P, slot ids) after the other warpgroup's.
Warpgroup 0's loop is rotated (``early_s``) so that a pair's S is queued behind the previous pair's P V without an
MMA in flight across the loop's back edge (which makes ptxas serialize every wgmma).
``benchmarks/pair_protocol_sim.py`` replays this protocol in Python threads (barrier indices, phases, buffer reuse,
the joint-max algebra) against a float64 reference.

Opt-in variant ``variant="seesaw"`` (``_sparse_mla_prefill_seesaw_kernel``; no faster than "ws": session 8), after the
probes above (the gathers cost more than the softmax): 32-key blocks, so a key buffer is 36 KB and four fit
beside Q (4 x 36 + 72 = 216 KB, + 1.8 KB of ids, row stats and barriers) and the producer runs up to three
blocks ahead; and the two consumer warpgroups in *separate* 4-warp partitions working on alternate blocks,
so one's softmax overlaps the other's MMAs. Protocol (W = 0 / 1, block j is owned by warpgroup j % 2):

* Warpgroup W keeps O's value columns [256 W, 256 W + 256) for every block (64 x 256 fp32: 128 registers),
  the running row max m and its own blocks' row sums l (both rescaled at every block).
* Its iteration for own block j: issue S_j = Q K_j^T (36 wgmma, N = 32, all 576 dims) async; take the other's
  block j-1: wait ``pready[1-W]`` for m_{j-1}, alpha_{j-1} = exp2(m_{j-2} - m_{j-1}) (m_{j-2} was its own, so
  both warpgroups compute bit-identical alphas), O *= alpha, l *= alpha, issue O += P_{j-1} V_{j-1} (P read
  from shared memory); wait for S_j only; softmax with m_{j-1}; publish P_j (bf16, written over block j's rope
  columns, dead once S_j is done: the existing kernels' trick, [64, 32] bf16 = [32, 64] bf16) and m_j, then
  ``pready[W]``; wait for P_{j-1} V_{j-1}, release its buffer (``empty``, count 2: one arrive per consumer);
  O *= alpha_j; O += P_j V_j; wait; release. No MMA is in flight across the loop's back edge (ptxas C7514).
  Consumer 0 peels block 0 (no predecessor); a consumer whose last block is the other's takes it alone.
* Syncs per block: one mbarrier hand-over between the consumers (``pready``, the owner's single arrive after a
  128-thread named barrier), the ``full`` / ``empty`` ring with the producer, no CTA-wide barrier. The owner
  publishes m_j before its P V MMAs finish, and the other warpgroup's S_{j+1} is already queued, so the
  softmax chain (j -> j+1 needs m_j) costs one softmax + one hand-over per block, not the MMAs.
* The slot ids of each block go to shared memory by cp.async under the same ``full`` barrier (the owner reads
  its mask there: eight global-load addresses a thread made the consumers spill); ids past the top-k read as
  0, so the mask also checks the position. At the end the consumers exchange l through shared memory (one
  mbarrier each way; l_0 + l_1 is the same in both), divide their O half by it, consumer 0 writes the lse.
* Partitions: the 4-warp producer is the default partition (56 registers), the consumers are workers with
  216 / 232 registers (SEESAW_CONSUMER_REGS: 224 / 224 and 232 / 216 spill).

``variant="ws_bk32"``: the warp-specialized kernel with 32-key blocks in four buffers and its [4, 2] key split
(S 64 x 16 a warpgroup), i.e. the deeper gather ring without the seesaw, so the A/B can tell the two apart.

Same contract as ``sparse_attention.sparse_mla_triton`` at one split: out [t, h, 512] bf16, lse [t, h] fp32
(natural log); -1 indices are skipped; a row with no valid key gives out = 0, lse = -inf. Gluon has no CPU
interpreter: the Triton kernel is the CPU-tested reference of the same math, and tests/gpu compares this
kernel with it and with the PyTorch reference at ragged / padded / empty shapes.
"""

from __future__ import annotations

import torch

from ._common import check

try:  # Gluon ships with Triton >= 3.4; absent (or a CPU-only wheel without it) means the Triton kernel runs
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

BH = 64  # heads per program (one warpgroup's MMA height)
BK = 64  # selected keys per block
DQK = 576
DV = 512
NUM_WARPS = 8
WS_PRODUCER_REGS = 56  # the gather warpgroup's registers (8 row pointers, 16 copies a thread per half block)
# the "ws_bk32" variant: the warp-specialized kernel with 32-key blocks in four buffers (the deeper ring without the
# seesaw); its producer needs 64 registers (56 spills the row pointers of its single 32-row copy), consumers 216
WS32_BK, WS32_NBUF, WS32_PRODUCER_REGS = 32, 4, 64
SEESAW_BK = 32  # keys per block of the seesaw variant
SEESAW_NBUF = 4  # its key buffers (4 x 36 KB beside Q's 72 KB)
# registers of its consumer warpgroups 0 and 1 (O half: 128 each); the producer (default partition) gets the rest
# of 3 x 168: 56. 224 / 224 makes ptxas spill the shared-memory base (4 bytes, one local load a block) and
# 232 / 216 spills more; 216 / 232 and 208 / 240 compile without spills (compile_report)
SEESAW_CONSUMER_REGS = (216, 232)
# the "roles" variant: 4 score + 2 x 4 value + 4 producer warps = 512 threads, 128 registers a thread at launch; the
# value warpgroups (O half: 128 registers a thread) and the producer get these, the score warpgroup the rest
# (4 x 128 - 2 x 160 - 64 = 128; value 152 spills and serializes the wgmma)
ROLES_VALUE_REGS, ROLES_PRODUCER_REGS = 160, 64
# the "pair" variant: 2 x 4 math + 4 producer warps = 384 threads, 168 registers a thread at launch; the math
# warpgroups (O half 128 + S 32 + P) get these, the producer the rest (3 x 168 - 2 x 216 = 72)
PAIR_MATH_REGS = 216
LOG2E = 1.4426950408889634

if HAVE_GLUON:

    @gluon.jit
    def _block_ids(idx_base, blk, topk, BK: gl.constexpr, layout: gl.constexpr):
        """[BK] int32 slot ids of key block ``blk`` of the top-k list (-1 past its end)."""
        kk = blk * BK + gl.arange(0, BK, layout=layout)
        return gl.load(idx_base + kk, mask=kk < topk, other=-1)

    @gluon.jit
    def _gather_rows(kv_ptr, ids_n, ids_r, stride_kv, nope_dst, rope_dst, DV: gl.constexpr, DR: gl.constexpr,
                     num_warps: gl.constexpr):
        """cp.async the latent rows of one key block into shared memory (ids_n / ids_r: its slot ids in the
        two pointer layouts). Padding (-1) copies nothing and reads as zeros, so P V stays finite. One copy
        per buffer: copies into slices of one allocation would each be fenced by a CTA barrier (the barrier
        pass treats a slice as the whole buffer)."""
        nope_l: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        rope_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        row = kv_ptr + ids_n.to(gl.int64)[:, None] * stride_kv  # [BK, 1]
        cols = gl.arange(0, DV, layout=gl.SliceLayout(0, nope_l))
        cp.async_copy_global_to_shared(nope_dst, row + cols[None, :], mask=(ids_n >= 0)[:, None])
        row_r = kv_ptr + ids_r.to(gl.int64)[:, None] * stride_kv
        cols_r = gl.arange(0, DR, layout=gl.SliceLayout(0, rope_l))
        cp.async_copy_global_to_shared(rope_dst, row_r + (DV + cols_r)[None, :], mask=(ids_r >= 0)[:, None])

    @gluon.jit
    def _block_valid(idx_base, blk, topk, BK: gl.constexpr, layout: gl.constexpr):
        """[BK] bool: which slots of key block ``blk`` hold a key (layout = S's column slice)."""
        kk = blk * BK + gl.arange(0, BK, layout=layout)
        return gl.load(idx_base + kk, mask=kk < topk, other=-1) >= 0

    @gluon.jit
    def _softmax_block(s, valid, qk_scale, m, l_acc):
        """Online softmax of one key block in base 2: s [BH, BK] raw scores -> (p, alpha, m, l_acc).

        l_acc [BH, BK] holds per-column partial row sums (rescaled like O); rows that have seen no valid key
        keep m = -inf and produce p = 0, alpha = 0 without NaNs."""
        p, alpha, m_new = _softmax_rows(s, valid, qk_scale, m)
        l_acc = l_acc * alpha[:, None] + p
        return p, alpha, m_new, l_acc

    @gluon.jit
    def _softmax_rows(s, valid, qk_scale, m):
        """The row max update of ``_softmax_block`` without the sums: s [BH, BK] -> (p, alpha, m_new)."""
        s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m, gl.max(s, axis=1))
        p, alpha = _exp_at_max(s, m, m_new)
        return p, alpha, m_new

    @gluon.jit
    def _exp_at_max(s, m, m_new):
        """Scaled, masked scores s [BH, BK] at the new row max m_new (>= the old m) -> (p = exp2(s - m_new), alpha =
        exp2(m - m_new)); a row with m_new = -inf (no key yet) gets p = 0, alpha = 0 without NaNs."""
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        return gl.exp2(s - m_safe[:, None]), gl.exp2(m - m_safe)

    @gluon.constexpr_function
    def _mma_layouts(BK, DV):
        """(S [BH, BK], O [BH, DV]) register layouts: both split over the two warpgroups by columns."""
        return (gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BK // 2, 16]),
                gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, DV // 2, 16]))

    @gluon.jit
    def _load_q(q_ptr, t, hb, stride_qt, stride_qh, q_nope, q_rope, BH: gl.constexpr, DV: gl.constexpr,
                DR: gl.constexpr, num_warps: gl.constexpr):
        """cp.async this head block's query rows [BH, 512] and [BH, 64] into shared memory (no commit)."""
        q_l: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        qr_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        heads = hb * BH + gl.arange(0, BH, layout=gl.SliceLayout(1, q_l))
        q_row = q_ptr + t.to(gl.int64) * stride_qt + heads.to(gl.int64)[:, None] * stride_qh
        cp.async_copy_global_to_shared(q_nope, q_row + gl.arange(0, DV, layout=gl.SliceLayout(0, q_l))[None, :])
        heads_r = hb * BH + gl.arange(0, BH, layout=gl.SliceLayout(1, qr_l))
        q_row_r = q_ptr + t.to(gl.int64) * stride_qt + heads_r.to(gl.int64)[:, None] * stride_qh
        cp.async_copy_global_to_shared(q_rope, q_row_r + (DV + gl.arange(0, DR, layout=gl.SliceLayout(0, qr_l)))[None, :])

    @gluon.jit
    def _first_block(q_nope, q_rope, k_nope, k_rope, p_buf, valid, qk_scale, m, l_acc, s_init):
        """S_0, its softmax and P_0 (in buffer 0's rope columns: ``p_buf`` is ``k_rope`` itself for 64-key blocks,
        its [BH, BK] reinterpretation otherwise), once block 0 is in shared memory."""
        s = warpgroup_mma(q_nope, k_nope.index(0).permute((1, 0)), s_init, use_acc=False, is_async=True)
        s = warpgroup_mma(q_rope, k_rope.index(0).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        p, alpha, m, l_acc = _softmax_block(s, valid, qk_scale, m, l_acc)
        p_buf.index(0).store(p.to(gl.bfloat16))
        fence_async_shared()
        return m, l_acc

    @gluon.jit
    def _store_out(o, m, l, out_ptr, lse_ptr, t, hb, col0, stride_ot, stride_oh, stride_lt, BH: gl.constexpr,
                   DVN: gl.constexpr, row_layout: gl.constexpr, o_layout: gl.constexpr, STORE_LSE: gl.constexpr):
        """out[:, col0:col0 + DVN] = O / l (bf16) and, with STORE_LSE, lse = ln(sum exp) of this head block, from
        the row max m and the row sums l (``row_layout``); rows without a key: 0 and -inf."""
        has = l > 0.0
        if STORE_LSE:
            lse = gl.where(has, (m + gl.log2(gl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
        inv = gl.convert_layout(1.0 / gl.where(has, l, 1.0), gl.SliceLayout(1, o_layout))
        o = o * inv[:, None]
        heads_o = hb * BH + gl.arange(0, BH, layout=gl.SliceLayout(1, o_layout))
        cols_o = col0 + gl.arange(0, DVN, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = out_ptr + t.to(gl.int64) * stride_ot + heads_o.to(gl.int64)[:, None] * stride_oh + cols_o[None, :]
        gl.store(o_ptrs, o.to(gl.bfloat16))
        if STORE_LSE:
            heads_l = hb * BH + gl.arange(0, BH, layout=row_layout)
            gl.store(lse_ptr + t.to(gl.int64) * stride_lt + heads_l, lse)

    @gluon.jit
    def _store_rows(o, m, l_acc, out_ptr, lse_ptr, t, hb, stride_ot, stride_oh, stride_lt, BH: gl.constexpr,
                    DV: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
        """out = O / l (bf16) and lse of this head block, l = the row sums of the per-column partials l_acc."""
        _store_out(o, m, gl.sum(l_acc, axis=1), out_ptr, lse_ptr, t, hb, 0, stride_ot, stride_oh, stride_lt, BH, DV,
                   gl.SliceLayout(1, s_layout), o_layout, True)

    @gluon.jit
    def _sparse_mla_prefill_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
        topk, n_hb, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
        BH: gl.constexpr, BK: gl.constexpr, DV: gl.constexpr, DR: gl.constexpr, PREFETCH_IDS: gl.constexpr,
        EARLY_PV: gl.constexpr, PROBE: gl.constexpr, num_warps: gl.constexpr,
    ):
        """One program = (token, BH heads): softmax over the token's top-k latent rows, out = P V."""
        pid = gl.program_id(0)
        t = pid // n_hb
        hb = pid % n_hb
        n_blocks = gl.cdiv(topk, BK)

        s_layout: gl.constexpr = _mma_layouts(BK, DV)[0]
        o_layout: gl.constexpr = _mma_layouts(BK, DV)[1]
        wide_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        q_nope = gl.allocate_shared_memory(gl.bfloat16, [BH, DV], wide_smem)
        q_rope = gl.allocate_shared_memory(gl.bfloat16, [BH, DR], wide_smem)
        k_nope = gl.allocate_shared_memory(gl.bfloat16, [2, BK, DV], wide_smem)  # key block j in buffer j % 2
        k_rope = gl.allocate_shared_memory(gl.bfloat16, [2, BK, DR], wide_smem)  # its rope columns, then its P

        # Q rows of this head block, then the first two key blocks (two cp.async groups)
        _load_q(q_ptr, t, hb, stride_qt, stride_qh, q_nope, q_rope, BH, DV, DR, num_warps)
        idx_base = idx_ptr + t.to(gl.int64) * stride_it
        nope_l: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        rope_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        idn_l: gl.constexpr = gl.SliceLayout(1, nope_l)
        idr_l: gl.constexpr = gl.SliceLayout(1, rope_l)
        _gather_rows(kv_ptr, _block_ids(idx_base, 0, topk, BK, idn_l), _block_ids(idx_base, 0, topk, BK, idr_l),
                     stride_kv, k_nope.index(0), k_rope.index(0), DV, DR, num_warps)
        cp.commit_group()
        _gather_rows(kv_ptr, _block_ids(idx_base, 1, topk, BK, idn_l), _block_ids(idx_base, 1, topk, BK, idr_l),
                     stride_kv, k_nope.index(1), k_rope.index(1), DV, DR, num_warps)
        cp.commit_group()
        # slot ids of the next block to gather, loaded a block ahead so the gather's addresses are ready
        # when its buffer frees (an id load in front of the copies stalls them by a memory latency)
        ids_n = _block_ids(idx_base, 2, topk, BK, idn_l)
        ids_r = _block_ids(idx_base, 2, topk, BK, idr_l)

        col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
        valid = _block_valid(idx_base, 0, topk, BK, col_l)
        m = gl.full([BH], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_acc = gl.zeros([BH, BK], gl.float32, layout=s_layout)
        o = gl.zeros([BH, DV], gl.float32, layout=o_layout)
        s_init = gl.zeros([BH, BK], gl.float32, layout=s_layout)

        cp.wait_group(1)  # Q and block 0 are in shared memory (this thread's copies) ...
        fence_async_shared()  # ... visible to the tensor core's (async) reads ...
        gl.thread_barrier()  # ... and everyone's copies are done
        m, l_acc = _first_block(q_nope, q_rope, k_nope, k_rope, k_rope, valid, qk_scale, m, l_acc, s_init)

        for j in range(0, n_blocks - 1):
            cur = j % 2
            nxt = 1 - cur
            valid = _block_valid(idx_base, j + 1, topk, BK, col_l)  # used after S_{j+1}: latency hidden
            if EARLY_PV:
                # O += P_j V_j needs only P_j (written by both warpgroups): it goes to the tensor core before
                # the wait for block j+1's gather, which then overlaps it
                gl.thread_barrier()
                o = warpgroup_mma(k_rope.index(cur), k_nope.index(cur), o, is_async=True)
                cp.wait_group(0)  # block j+1 landed (issued one block ago) ...
                fence_async_shared()
                gl.thread_barrier()  # ... for every thread
            else:
                cp.wait_group(0)
                fence_async_shared()
                gl.thread_barrier()
                o = warpgroup_mma(k_rope.index(cur), k_nope.index(cur), o, is_async=True)
            s = warpgroup_mma(q_nope, k_nope.index(nxt).permute((1, 0)), s_init, use_acc=False, is_async=True)
            s = warpgroup_mma(q_rope, k_rope.index(nxt).permute((1, 0)), s, is_async=True)
            o = warpgroup_mma_wait(2, deps=(o,))  # P_j V_j done in this warpgroup ...
            gl.thread_barrier()  # ... and in the other: buffer `cur` is free
            if PROBE >= 2:  # timing probe: no gathers after the first two blocks (wrong results)
                pass
            elif PREFETCH_IDS:
                _gather_rows(kv_ptr, ids_n, ids_r, stride_kv, k_nope.index(cur), k_rope.index(cur), DV, DR, num_warps)
                ids_n = _block_ids(idx_base, j + 3, topk, BK, idn_l)
                ids_r = _block_ids(idx_base, j + 3, topk, BK, idr_l)
            else:
                _gather_rows(kv_ptr, _block_ids(idx_base, j + 2, topk, BK, idn_l),
                             _block_ids(idx_base, j + 2, topk, BK, idr_l), stride_kv, k_nope.index(cur),
                             k_rope.index(cur), DV, DR, num_warps)
            cp.commit_group()
            s = warpgroup_mma_wait(0, deps=(s,))
            if PROBE == 1 or PROBE == 3:  # timing probe: no softmax, no rescale (wrong results)
                p = s
            else:
                p, alpha, m, l_acc = _softmax_block(s, valid, qk_scale, m, l_acc)
                o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            # S_{j+1} no longer needs its rope columns, in either warpgroup: p needs the row max over both
            # warpgroups' columns, so the other one has waited for its half of S_{j+1} before this store
            k_rope.index(nxt).store(p.to(gl.bfloat16))
            fence_async_shared()

        last = (n_blocks - 1) % 2
        gl.thread_barrier()
        o = warpgroup_mma(k_rope.index(last), k_nope.index(last), o, is_async=True)
        o = warpgroup_mma_wait(0, deps=(o,))
        cp.wait_group(0)  # the (empty) gather past the last block must land before the program exits

        _store_rows(o, m, l_acc, out_ptr, lse_ptr, t, hb, stride_ot, stride_oh, stride_lt, BH, DV, s_layout, o_layout)

    # ---- warp-specialized variant: a producer warpgroup gathers, the two consumer warpgroups compute ----------

    @gluon.jit
    def _ws_producer(kv_ptr, idx_base, topk, stride_kv, k_nope, k_rope, full, empty, ids_dst,
                     BK: gl.constexpr, DV: gl.constexpr, DR: gl.constexpr, NBUF: gl.constexpr):
        """Gathers key block j into buffer j % NBUF once the consumers have released it (``empty``) and signals
        ``full`` when this warpgroup's copies have landed (cp.async's own mbarrier arrive, one per thread).
        Copies of 32 rows (two per 64-key buffer, one per 32-key buffer) keep the copy addresses at 8 row
        pointers a thread. ``ids_dst`` (None or an [NBUF, BK] int32 ring): the block's slot ids go there too,
        under the same ``full`` barrier, so the consumers read their masks from shared memory (ids past the
        top-k read as 0: the consumer masks those by position)."""
        HALF: gl.constexpr = 32  # rows per copy
        TWO: gl.constexpr = BK == 2 * HALF  # 64-key blocks: two copies per buffer; 32-key blocks: one
        nope_l: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])  # 4 producer warps
        rope_l: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        idn_l: gl.constexpr = gl.SliceLayout(1, nope_l)
        idr_l: gl.constexpr = gl.SliceLayout(1, rope_l)
        cols = gl.arange(0, DV, layout=gl.SliceLayout(0, nope_l))
        cols_r = DV + gl.arange(0, DR, layout=gl.SliceLayout(0, rope_l))
        n_blocks = gl.cdiv(topk, BK)
        gl.static_assert(BK == HALF or TWO, "the producer gathers 32- or 64-key blocks")
        ids_lo = _block_ids(idx_base, 0, topk, HALF, idn_l)
        if TWO:
            ids_hi = _block_ids(idx_base, 1, topk, HALF, idn_l)
        ids_r = _block_ids(idx_base, 0, topk, BK, idr_l)
        if ids_dst is not None:
            idc_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
            id_cols = gl.arange(0, BK, layout=idc_l)
        for j in range(n_blocks):
            b = j % NBUF
            mbarrier.wait(empty.index(b), ((j // NBUF) & 1) ^ 1)  # a fresh barrier passes phase 1 at once
            dst = k_nope.index(b)
            row = kv_ptr + ids_lo.to(gl.int64)[:, None] * stride_kv
            if TWO:
                cp.async_copy_global_to_shared(dst.slice(0, HALF, dim=0), row + cols[None, :],
                                               mask=(ids_lo >= 0)[:, None])
                row = kv_ptr + ids_hi.to(gl.int64)[:, None] * stride_kv
                cp.async_copy_global_to_shared(dst.slice(HALF, HALF, dim=0), row + cols[None, :],
                                               mask=(ids_hi >= 0)[:, None])
            else:
                cp.async_copy_global_to_shared(dst, row + cols[None, :], mask=(ids_lo >= 0)[:, None])
            row_r = kv_ptr + ids_r.to(gl.int64)[:, None] * stride_kv
            cp.async_copy_global_to_shared(k_rope.index(b), row_r + cols_r[None, :], mask=(ids_r >= 0)[:, None])
            if ids_dst is not None:
                kk = j * BK + id_cols
                cp.async_copy_global_to_shared(ids_dst.index(b), idx_base + kk, mask=kk < topk)
            cp.mbarrier_arrive(full.index(b), increment_count=False)
            if TWO:  # the next block's ids, loaded early
                ids_lo = _block_ids(idx_base, 2 * j + 2, topk, HALF, idn_l)
                ids_hi = _block_ids(idx_base, 2 * j + 3, topk, HALF, idn_l)
            else:
                ids_lo = _block_ids(idx_base, j + 1, topk, HALF, idn_l)
            ids_r = _block_ids(idx_base, j + 1, topk, BK, idr_l)

    @gluon.jit
    def _ws_consumer(q_nope, q_rope, k_nope, k_rope, p_buf, full, empty, idx_base, topk, qk_scale,
                     out_ptr, lse_ptr, t, hb, stride_ot, stride_oh, stride_lt,
                     BH: gl.constexpr, BK: gl.constexpr, DV: gl.constexpr, DR: gl.constexpr, NBUF: gl.constexpr):
        """The softmax and both MMAs of every key block (8 warps, S and O split over the two warpgroups as in
        ``_sparse_mla_prefill_kernel``), then the output rows. Block j is in buffer j % NBUF."""
        n_blocks = gl.cdiv(topk, BK)
        s_layout: gl.constexpr = _mma_layouts(BK, DV)[0]
        o_layout: gl.constexpr = _mma_layouts(BK, DV)[1]
        col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
        valid = _block_valid(idx_base, 0, topk, BK, col_l)
        m = gl.full([BH], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_acc = gl.zeros([BH, BK], gl.float32, layout=s_layout)
        o = gl.zeros([BH, DV], gl.float32, layout=o_layout)
        s_init = gl.zeros([BH, BK], gl.float32, layout=s_layout)

        mbarrier.wait(full.index(0), 0)
        fence_async_shared()  # cp.async (generic proxy) writes, read by the tensor core (async proxy)
        m, l_acc = _first_block(q_nope, q_rope, k_nope, k_rope, p_buf, valid, qk_scale, m, l_acc, s_init)
        for j in range(0, n_blocks - 1):
            cur = j % NBUF
            if NBUF == 2:
                nxt = 1 - cur
            else:
                nxt = (j + 1) % NBUF
            valid = _block_valid(idx_base, j + 1, topk, BK, col_l)
            gl.thread_barrier()  # P_j (written by both warpgroups) is in place
            o = warpgroup_mma(p_buf.index(cur), k_nope.index(cur), o, is_async=True)  # O += P_j V_j
            mbarrier.wait(full.index(nxt), ((j + 1) // NBUF) & 1)  # block j+1 gathered
            fence_async_shared()
            s = warpgroup_mma(q_nope, k_nope.index(nxt).permute((1, 0)), s_init, use_acc=False, is_async=True)
            s = warpgroup_mma(q_rope, k_rope.index(nxt).permute((1, 0)), s, is_async=True)
            o = warpgroup_mma_wait(2, deps=(o,))
            gl.thread_barrier()  # both warpgroups are done with buffer `cur` ...
            mbarrier.arrive(empty.index(cur), count=1)  # ... the producer may refill it
            s = warpgroup_mma_wait(0, deps=(s,))
            p, alpha, m, l_acc = _softmax_block(s, valid, qk_scale, m, l_acc)
            o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p_buf.index(nxt).store(p.to(gl.bfloat16))  # as in the one-partition kernel: S_{j+1} is done
            fence_async_shared()
        last = (n_blocks - 1) % NBUF
        gl.thread_barrier()
        o = warpgroup_mma(p_buf.index(last), k_nope.index(last), o, is_async=True)
        o = warpgroup_mma_wait(0, deps=(o,))

        _store_rows(o, m, l_acc, out_ptr, lse_ptr, t, hb, stride_ot, stride_oh, stride_lt, BH, DV, s_layout, o_layout)

    @gluon.jit
    def _sparse_mla_prefill_ws_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
        topk, n_hb, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
        BH: gl.constexpr, BK: gl.constexpr, DV: gl.constexpr, DR: gl.constexpr, NBUF: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """``_sparse_mla_prefill_kernel`` with the gathers moved to a producer warpgroup (warp specialization):
        the consumers no longer issue 18 cp.async a thread per block nor stall on the load queue; buffers are
        handed over with mbarriers (full: gathered; empty: both MMAs of the block done). The default: 64-key
        blocks in two buffers; ``variant="ws_bk32"``: 32-key blocks in four (the deeper ring alone, no
        seesaw: S is then 64 x 16 a warpgroup)."""
        pid = gl.program_id(0)
        t = pid // n_hb
        hb = pid % n_hb
        wide_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        q_nope = gl.allocate_shared_memory(gl.bfloat16, [BH, DV], wide_smem)
        q_rope = gl.allocate_shared_memory(gl.bfloat16, [BH, DR], wide_smem)
        k_nope = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BK, DV], wide_smem)
        k_rope = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BK, DR], wide_smem)
        gl.static_assert(BH == DR, "P [BH, BK] bf16 goes in the place of the block's rope columns [BK, DR]: BH == DR")
        if BK == DR:
            p_buf = k_rope
        else:  # [BK, DR] -> [BH, BK], same bytes
            p_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=2 * BK, element_bitwidth=16, rank=2)
            p_buf = k_rope._reinterpret(gl.bfloat16, [NBUF, BH, BK], p_smem)
        full = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NBUF):
            mbarrier.init(full.index(i), count=128)  # one cp.async arrive per producer thread
            mbarrier.init(empty.index(i), count=1)
        _load_q(q_ptr, t, hb, stride_qt, stride_qh, q_nope, q_rope, BH, DV, DR, num_warps)
        cp.commit_group()
        cp.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()  # Q in place and the barriers initialised before any partition uses them
        idx_base = idx_ptr + t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_ws_consumer, (q_nope, q_rope, k_nope, k_rope, p_buf, full, empty, idx_base, topk, qk_scale, out_ptr,
                            lse_ptr, t, hb, stride_ot, stride_oh, stride_lt, BH, BK, DV, DR, NBUF)),
            (_ws_producer, (kv_ptr, idx_base, topk, stride_kv, k_nope, k_rope, full, empty, None, BK, DV, DR, NBUF)),
        ], [4], [PRODUCER_REGS])


    # ---- seesaw variant: 32-key blocks, a 4-deep gather ring, the two consumer warpgroups on alternate blocks ----

    @gluon.jit
    def _seesaw_pv(p_buf, k_nope, o, b, W: gl.constexpr, DVH: gl.constexpr):
        """O_W += P_b V_b[:, W half] (async): P [BH, BK] from the block's rope place, V this warpgroup's columns."""
        return warpgroup_mma(p_buf.index(b), k_nope.index(b).slice(W * DVH, DVH, dim=1), o, is_async=True)

    @gluon.jit
    def _seesaw_release(empty_b):
        """This warpgroup's MMAs that read the buffer are done (wgmma_wait by every warp): one arrive of two."""
        gl.thread_barrier()
        mbarrier.arrive(empty_b, count=1)

    @gluon.jit
    def _seesaw_receive(m, l, o, m_xchg, pready, k, W: gl.constexpr, o_layout: gl.constexpr):
        """Block k belongs to the other warpgroup: wait for its row max m_k (its P_k is then in shared memory
        too), rescale this warpgroup's O half and row sums by alpha_k = exp2(m_{k-1} - m_k) exactly as the owner
        did (m_{k-1} was this warpgroup's own, so both halves see bit-identical alphas)."""
        mbarrier.wait(pready.index(1 - W), (k // 2) & 1)  # the owner's (k // 2)-th publication
        m_new = m_xchg.index(1 - W).load(m.type.layout)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m - m_safe)
        l = l * alpha
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        return m_new, l, o

    @gluon.jit
    def _seesaw_publish(p, m, p_dst, m_xchg, pready, W: gl.constexpr):
        """P_j (bf16, in the place of block j's rope columns: dead once S_j is done) and m_j for the other
        warpgroup; the fence makes the generic-proxy stores visible to both warpgroups' wgmma reads."""
        p_dst.store(p.to(gl.bfloat16))
        m_xchg.index(W).store(m)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(pready.index(W), count=1)

    @gluon.jit
    def _smem_block_valid(ids_smem, b, j, topk, BK: gl.constexpr, layout: gl.constexpr):
        """[BK] bool: which slots of key block j (in buffer b, after its ``full`` wait) hold a key. The ids come
        from shared memory (copied by the producer) rather than global loads, whose eight addresses a thread
        made the consumers spill."""
        kk = j * BK + gl.arange(0, BK, layout=layout)
        return (ids_smem.index(b).load(layout) >= 0) & (kk < topk)

    @gluon.jit
    def _seesaw_consumer(q_nope, q_rope, k_nope, k_rope, p_buf, m_xchg, l_xchg, ids_smem, full, empty, pready,
                         done, topk, qk_scale, out_ptr, lse_ptr, t, hb, stride_ot, stride_oh, stride_lt,
                         W: gl.constexpr, BH: gl.constexpr, BK: gl.constexpr, DV: gl.constexpr, DR: gl.constexpr,
                         NBUF: gl.constexpr):
        """Consumer warpgroup W (a 4-warp worker partition): owns key blocks j with j % 2 == W (their S,
        softmax and the publication of P_j / m_j) and O's value columns [W * 256, W * 256 + 256) for every
        block. Iteration j (an own block) = the other's block j-1 then block j: S_j is issued first, so it
        runs while this warpgroup waits for m_{j-1} and while the other warpgroup computes its softmax."""
        DVH: gl.constexpr = DV // 2
        n_blocks = gl.cdiv(topk, BK)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BK, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DVH, 16])
        col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        m = gl.full([BH], float("-inf"), gl.float32, layout=row_l)
        l = gl.zeros([BH], gl.float32, layout=row_l)  # row sums of this warpgroup's blocks, rescaled by all
        o = gl.zeros([BH, DVH], gl.float32, layout=o_layout)
        s_init = gl.zeros([BH, BK], gl.float32, layout=s_layout)

        if W == 0:  # block 0 has no predecessor: S_0, its softmax, P_0 V_0
            mbarrier.wait(full.index(0), 0)
            fence_async_shared()
            valid = _smem_block_valid(ids_smem, 0, 0, topk, BK, col_l)
            s = warpgroup_mma(q_nope, k_nope.index(0).permute((1, 0)), s_init, use_acc=False, is_async=True)
            s = warpgroup_mma(q_rope, k_rope.index(0).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s,))
            p, alpha, m = _softmax_rows(s, valid, qk_scale, m)
            l = l * alpha + gl.sum(p, axis=1)
            _seesaw_publish(p, m, p_buf.index(0), m_xchg, pready, W)
            o = _seesaw_pv(p_buf, k_nope, o, 0, W, DVH)  # O is 0: no rescale
            o = warpgroup_mma_wait(0, deps=(o,))
            _seesaw_release(empty.index(0))

        # own block j = 2 + W, 4 + W, ... (W = 1 starts at 1); each iteration also takes the other's block j-1
        for j in range(2 - W, n_blocks, 2):
            b = j % NBUF
            bp = (j - 1) % NBUF
            mbarrier.wait(full.index(b), (j // NBUF) & 1)
            fence_async_shared()
            s = warpgroup_mma(q_nope, k_nope.index(b).permute((1, 0)), s_init, use_acc=False, is_async=True)
            s = warpgroup_mma(q_rope, k_rope.index(b).permute((1, 0)), s, is_async=True)
            # the other's block j-1 (O is idle: its last MMA was waited for at the end of the last iteration)
            m, l, o = _seesaw_receive(m, l, o, m_xchg, pready, j - 1, W, o_layout)
            mbarrier.wait(full.index(bp), ((j - 1) // NBUF) & 1)  # V_{j-1} landed (the owner waited too)
            fence_async_shared()
            o = _seesaw_pv(p_buf, k_nope, o, bp, W, DVH)
            valid = _smem_block_valid(ids_smem, b, j, topk, BK, col_l)
            s = warpgroup_mma_wait(1, deps=(s,))  # S_j done; P_{j-1} V_{j-1} may still run
            p, alpha, m = _softmax_rows(s, valid, qk_scale, m)
            l = l * alpha + gl.sum(p, axis=1)
            _seesaw_publish(p, m, p_buf.index(b), m_xchg, pready, W)
            o = warpgroup_mma_wait(0, deps=(o,))
            _seesaw_release(empty.index(bp))
            o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            o = _seesaw_pv(p_buf, k_nope, o, b, W, DVH)
            o = warpgroup_mma_wait(0, deps=(o,))  # nothing in flight across the back edge (ptxas C7514/C7515)
            _seesaw_release(empty.index(b))

        last = n_blocks - 1
        if last % 2 != W:  # the last block is the other's: receive it alone
            b = last % NBUF
            m, l, o = _seesaw_receive(m, l, o, m_xchg, pready, last, W, o_layout)
            mbarrier.wait(full.index(b), (last // NBUF) & 1)
            fence_async_shared()
            o = _seesaw_pv(p_buf, k_nope, o, b, W, DVH)
            o = warpgroup_mma_wait(0, deps=(o,))
            _seesaw_release(empty.index(b))

        # both warpgroups now hold m = m_{n-1}; each l has its own blocks' sums: exchange them (a + b == b + a,
        # so both halves divide by the same l)
        l_xchg.index(W).store(l)
        gl.thread_barrier()
        mbarrier.arrive(done.index(W), count=1)
        mbarrier.wait(done.index(1 - W), 0)
        l = l + l_xchg.index(1 - W).load(row_l)
        _store_out(o, m, l, out_ptr, lse_ptr, t, hb, W * DVH, stride_ot, stride_oh, stride_lt, BH, DVH, row_l,
                   o_layout, W == 0)  # this warpgroup's half of O's columns; warpgroup 0 writes the lse

    @gluon.jit
    def _sparse_mla_prefill_seesaw_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
        topk, n_hb, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
        BH: gl.constexpr, BK: gl.constexpr, DV: gl.constexpr, DR: gl.constexpr, NBUF: gl.constexpr,
        REGS0: gl.constexpr, REGS1: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Seesaw: 32-key blocks in an NBUF-deep ring (the producer runs up to NBUF - 1 blocks ahead) and two
        consumer warpgroups in separate partitions on alternate blocks, each owning half of O's columns (see
        the module docstring for the protocol). num_warps = 4: the default partition is the producer (it gets
        the registers the two consumers, REGS0 / REGS1, leave), the consumers are 4-warp workers."""
        gl.static_assert(num_warps == 4, "the default partition is the 4-warp producer")
        gl.static_assert(BH == DR, "P [BH, BK] bf16 goes in the place of the block's rope columns [BK, DR]: BH == DR")
        pid = gl.program_id(0)
        t = pid // n_hb
        hb = pid % n_hb
        wide_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        p_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=2 * BK, element_bitwidth=16, rank=2)
        row_smem: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        q_nope = gl.allocate_shared_memory(gl.bfloat16, [BH, DV], wide_smem)
        q_rope = gl.allocate_shared_memory(gl.bfloat16, [BH, DR], wide_smem)
        k_nope = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BK, DV], wide_smem)
        k_rope = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BK, DR], wide_smem)
        p_buf = k_rope._reinterpret(gl.bfloat16, [NBUF, BH, BK], p_smem)  # block j's P over its rope columns
        m_xchg = gl.allocate_shared_memory(gl.float32, [2, BH], row_smem)  # row max published by warpgroup w
        l_xchg = gl.allocate_shared_memory(gl.float32, [2, BH], row_smem)  # final row sums of warpgroup w
        ids_smem = gl.allocate_shared_memory(gl.int32, [NBUF, BK], row_smem)  # block j's slot ids (its mask)
        full = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        pready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        done = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NBUF):
            mbarrier.init(full.index(i), count=128)  # one cp.async arrive per producer thread
            mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warpgroup
        for i in gl.static_range(2):
            mbarrier.init(pready.index(i), count=1)
            mbarrier.init(done.index(i), count=1)
        _load_q(q_ptr, t, hb, stride_qt, stride_qh, q_nope, q_rope, BH, DV, DR, num_warps)
        cp.commit_group()
        cp.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()  # Q in place and the barriers initialised before any partition uses them
        idx_base = idx_ptr + t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_ws_producer, (kv_ptr, idx_base, topk, stride_kv, k_nope, k_rope, full, empty, ids_smem, BK, DV, DR,
                            NBUF)),
            (_seesaw_consumer, (q_nope, q_rope, k_nope, k_rope, p_buf, m_xchg, l_xchg, ids_smem, full, empty,
                                pready, done, topk, qk_scale, out_ptr, lse_ptr, t, hb, stride_ot, stride_oh, stride_lt,
                                0, BH, BK, DV, DR, NBUF)),
            (_seesaw_consumer, (q_nope, q_rope, k_nope, k_rope, p_buf, m_xchg, l_xchg, ids_smem, full, empty,
                                pready, done, topk, qk_scale, out_ptr, lse_ptr, t, hb, stride_ot, stride_oh, stride_lt,
                                1, BH, BK, DV, DR, NBUF)),
        ], [4, 4], [REGS0, REGS1])


    # ---- roles variant: one warpgroup scores, two accumulate O, one gathers -------------------------------------

    @gluon.jit
    def _row_offsets(ids, stride_kv, WIDE: gl.constexpr):
        """Element offsets of latent rows ``ids`` in the pool: 32-bit, or 64-bit when the pool has 2^31 elements or
        more (WIDE)."""
        if WIDE:
            return ids.to(gl.int64) * stride_kv
        else:
            return ids * stride_kv

    @gluon.jit
    def _roles_producer(kv_ptr, idx_base, topk, stride_kv, k_nope, k_rope, full, empty, ids_dst,
                        BK: gl.constexpr, DV: gl.constexpr, DR: gl.constexpr, NBUF: gl.constexpr,
                        WIDE: gl.constexpr, PROBE: gl.constexpr = 0):
        """The roles kernel's gathers: ``_ws_producer``'s protocol (block j into buffer j % NBUF once the value
        warpgroups have released it, ``full`` on landing, the block's slot ids into ``ids_dst`` too) with fewer
        instructions between the ``empty`` wait and the copies: block j+1's row offsets are worked out while
        block j's copies fly, one copy per buffer (no partition barrier between halves), 32-bit offsets unless
        the pool needs more (WIDE). An L2 prefetch of the block after next, which added ~200 instructions a
        block here, made the kernel 15% slower on H200; this leaner version measured within noise of the
        ``_ws_producer`` one (docs/BENCHMARKS.md, session 17)."""
        nope_l: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])  # 4 producer warps
        rope_l: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        idn_l: gl.constexpr = gl.SliceLayout(1, nope_l)
        idr_l: gl.constexpr = gl.SliceLayout(1, rope_l)
        idc_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        id_cols = gl.arange(0, BK, layout=idc_l)
        base_n = kv_ptr + gl.arange(0, DV, layout=gl.SliceLayout(0, nope_l))[None, :]  # [1, DV] per-lane columns
        base_r = kv_ptr + (DV + gl.arange(0, DR, layout=gl.SliceLayout(0, rope_l)))[None, :]
        n_blocks = gl.cdiv(topk, BK)
        ids_n = _block_ids(idx_base, 0, topk, BK, idn_l)
        ids_r = _block_ids(idx_base, 0, topk, BK, idr_l)
        off_n = _row_offsets(ids_n, stride_kv, WIDE)
        off_r = _row_offsets(ids_r, stride_kv, WIDE)
        for j in range(n_blocks):
            b = j % NBUF
            mbarrier.wait(empty.index(b), ((j // NBUF) & 1) ^ 1)  # a fresh barrier passes phase 1 at once
            if (PROBE & 2) == 0 or j < NBUF:  # PROBE 2 (timing only): no gathers after the first NBUF blocks
                cp.async_copy_global_to_shared(k_nope.index(b), base_n + off_n[:, None], mask=(ids_n >= 0)[:, None])
                cp.async_copy_global_to_shared(k_rope.index(b), base_r + off_r[:, None], mask=(ids_r >= 0)[:, None])
                kk = j * BK + id_cols
                cp.async_copy_global_to_shared(ids_dst.index(b), idx_base + kk, mask=kk < topk)
            cp.mbarrier_arrive(full.index(b), increment_count=False)
            ids_n = _block_ids(idx_base, j + 1, topk, BK, idn_l)
            ids_r = _block_ids(idx_base, j + 1, topk, BK, idr_l)
            off_n = _row_offsets(ids_n, stride_kv, WIDE)
            off_r = _row_offsets(ids_r, stride_kv, WIDE)

    @gluon.jit
    def _roles_scores(q_ptr, stride_qt, stride_qh, q_nope, q_rope, k_nope, k_rope, p_buf, alpha_ring, l_out,
                      ids_smem, full, pready, done, topk, qk_scale, lse_ptr, t, hb, stride_lt,
                      BH: gl.constexpr, BK: gl.constexpr, DV: gl.constexpr, DR: gl.constexpr, NBUF: gl.constexpr,
                      PROBE: gl.constexpr = 0):
        """The score warpgroup (the default partition, 4 warps): for every key block j, S_j = Q K_j^T over all
        576 dims and all 64 keys (N = 64: Q is read from shared memory once per 64 keys, where the "ws" kernel's
        two warpgroups each read it once per 32), the online softmax, then P_j (bf16, over block j's rope
        columns, dead once S_j is done) and alpha_j = exp2(m_{j-1} - m_j) for the value partition (``pready``).
        At the end: the row sums for the value partition (``done``) and the lse. Q is loaded here, so its
        latency overlaps the producer's first gathers."""
        _load_q(q_ptr, t, hb, stride_qt, stride_qh, q_nope, q_rope, BH, DV, DR, 4)
        cp.commit_group()
        cp.wait_group(0)
        fence_async_shared()  # cp.async (generic proxy) writes of Q, read by the tensor core
        gl.thread_barrier()  # every warp's part of Q landed
        n_blocks = gl.cdiv(topk, BK)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BK, 16])
        col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        m = gl.full([BH], float("-inf"), gl.float32, layout=row_l)
        l = gl.zeros([BH], gl.float32, layout=row_l)
        s_init = gl.zeros([BH, BK], gl.float32, layout=s_layout)
        for j in range(n_blocks):
            b = j % NBUF
            mbarrier.wait(full.index(b), (j // NBUF) & 1)
            fence_async_shared()
            if (PROBE & 8) == 0:  # PROBE 8 (timing only): no S MMA
                s = warpgroup_mma(q_nope, k_nope.index(b).permute((1, 0)), s_init, use_acc=False, is_async=True)
                s = warpgroup_mma(q_rope, k_rope.index(b).permute((1, 0)), s, is_async=True)
            else:
                s = s_init + j
            valid = _smem_block_valid(ids_smem, b, j, topk, BK, col_l)
            s = warpgroup_mma_wait(0, deps=(s,))
            if (PROBE & 1) == 0:
                p, alpha, m = _softmax_rows(s, valid, qk_scale, m)
            else:  # PROBE 1 (timing only): no softmax
                p = s
                alpha = gl.max(s, axis=1)
            l = l * alpha + gl.sum(p, axis=1)
            p_buf.index(b).store(p.to(gl.bfloat16))
            alpha_ring.index(b).store(alpha)
            fence_async_shared()  # generic-proxy P stores, read by the value partition's wgmma
            gl.thread_barrier()  # every warp's P and alpha stored before the one arrive
            mbarrier.arrive(pready.index(b), count=1)
        l_out.store(l)
        gl.thread_barrier()
        mbarrier.arrive(done.index(0), count=1)
        has = l > 0.0
        lse = gl.where(has, (m + gl.log2(gl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
        heads_l = hb * BH + gl.arange(0, BH, layout=row_l)
        gl.store(lse_ptr + t.to(gl.int64) * stride_lt + heads_l, lse)

    @gluon.jit
    def _roles_values(k_nope, p_buf, alpha_ring, l_out, full, empty, pready, done, topk, out_ptr, lse_ptr, t, hb,
                      stride_ot, stride_oh, stride_lt, W: gl.constexpr, BH: gl.constexpr, BK: gl.constexpr,
                      DV: gl.constexpr, NBUF: gl.constexpr, PROBE: gl.constexpr = 0):
        """Value warpgroup W (a 4-warp worker): O's columns [256 W, 256 W + 256) (64 x 256 fp32, 128 registers a
        thread); for every block O *= alpha_j, O += P_j V_j[:, its columns], then its half of the buffer's release
        (``empty`` counts two arrives). Its MMAs and rescales can run while the score warpgroup computes the next
        block's S and softmax (how much they do: the probes in the module docstring)."""
        DVH: gl.constexpr = DV // 2
        n_blocks = gl.cdiv(topk, BK)
        # wgmma N = 128, two instructions per k-step: at 512 threads a kernel is compiled against 128 registers a
        # thread before the partitions' setmaxnreg, and ptxas refuses an instruction that needs more (an N = 256
        # fp32 accumulator needs 154) even where the partition has them
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 128, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        o = gl.zeros([BH, DVH], gl.float32, layout=o_layout)
        for j in range(n_blocks):
            b = j % NBUF
            mbarrier.wait(pready.index(b), (j // NBUF) & 1)  # P_j and alpha_j published
            mbarrier.wait(full.index(b), (j // NBUF) & 1)  # V_j landed (already true: the scores waited for it)
            fence_async_shared()
            alpha = alpha_ring.index(b).load(row_o)
            o = o * alpha[:, None]
            if (PROBE & 4) == 0:  # PROBE 4 (timing only): no P V MMA
                o = warpgroup_mma(p_buf.index(b), k_nope.index(b).slice(W * DVH, DVH, dim=1), o, is_async=True)
            o = warpgroup_mma_wait(0, deps=(o,))  # nothing in flight across the back edge (ptxas C7514/C7515)
            gl.thread_barrier()  # every warp's MMA done with buffer b ...
            mbarrier.arrive(empty.index(b), count=1)  # ... this warpgroup's half of the release
        mbarrier.wait(done.index(0), 0)
        l = l_out.load(row_o)
        _store_out(o, l, l, out_ptr, lse_ptr, t, hb, W * DVH, stride_ot, stride_oh, stride_lt, BH, DVH, row_o,
                   o_layout, False)

    @gluon.jit
    def _sparse_mla_prefill_roles_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
        topk, n_hb, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
        BH: gl.constexpr, BK: gl.constexpr, DV: gl.constexpr, DR: gl.constexpr, NBUF: gl.constexpr,
        VALUE_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, WIDE: gl.constexpr, PROBE: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """Roles: the scores and softmax (the 4-warp default partition, ``_roles_scores``), O (two 4-warp workers,
        ``_roles_values``, half of its columns each) and the gathers (a 4-warp worker, ``_roles_producer``); 64-key
        blocks in two buffers as the "ws" kernel. 512 threads: 128 registers a thread at launch, rebalanced to
        VALUE_REGS / PRODUCER_REGS for the workers, the score warpgroup gets the rest."""
        gl.static_assert(num_warps == 4, "the default partition is the 4-warp score warpgroup")
        gl.static_assert(BH == DR and BK == DR, "P [BH, BK] bf16 goes in the place of the block's rope columns")
        pid = gl.program_id(0)
        t = pid // n_hb
        hb = pid % n_hb
        wide_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        row_smem: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        q_nope = gl.allocate_shared_memory(gl.bfloat16, [BH, DV], wide_smem)
        q_rope = gl.allocate_shared_memory(gl.bfloat16, [BH, DR], wide_smem)
        k_nope = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BK, DV], wide_smem)
        k_rope = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BK, DR], wide_smem)
        p_buf = k_rope  # [BK, DR] == [BH, BK]: block j's P over its rope columns
        alpha_ring = gl.allocate_shared_memory(gl.float32, [NBUF, BH], row_smem)
        l_out = gl.allocate_shared_memory(gl.float32, [BH], row_smem)
        ids_smem = gl.allocate_shared_memory(gl.int32, [NBUF, BK], row_smem)
        full = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        pready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        done = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NBUF):
            mbarrier.init(full.index(i), count=128)  # one cp.async arrive per producer thread
            mbarrier.init(empty.index(i), count=2)  # one arrive per value warpgroup
            mbarrier.init(pready.index(i), count=1)
        mbarrier.init(done.index(0), count=1)
        fence_async_shared()
        gl.thread_barrier()  # the barriers initialised before any partition uses them (Q: the score warpgroup)
        idx_base = idx_ptr + t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_roles_scores, (q_ptr, stride_qt, stride_qh, q_nope, q_rope, k_nope, k_rope, p_buf, alpha_ring, l_out,
                             ids_smem, full, pready, done, topk, qk_scale, lse_ptr, t, hb, stride_lt, BH, BK, DV, DR,
                             NBUF, PROBE)),
            (_roles_values, (k_nope, p_buf, alpha_ring, l_out, full, empty, pready, done, topk, out_ptr, lse_ptr, t,
                             hb, stride_ot, stride_oh, stride_lt, 0, BH, BK, DV, NBUF, PROBE)),
            (_roles_values, (k_nope, p_buf, alpha_ring, l_out, full, empty, pready, done, topk, out_ptr, lse_ptr, t,
                             hb, stride_ot, stride_oh, stride_lt, 1, BH, BK, DV, NBUF, PROBE)),
            (_roles_producer, (kv_ptr, idx_base, topk, stride_kv, k_nope, k_rope, full, empty, ids_smem, BK, DV, DR,
                               NBUF, WIDE, PROBE)),
        ], [4, 4, 4], [VALUE_REGS, VALUE_REGS, PRODUCER_REGS])


    # ---- pair variant: two math warpgroups on alternate blocks, own P from registers, half-buffer hand-overs ----

    @gluon.jit
    def _pair_producer(q_ptr, kv_ptr, idx_base, topk, t, hb, stride_qt, stride_qh, stride_kv, q_nope, q_rope, k_nope,
                       k_rope, ids_smem, qbar, full, empty, BH: gl.constexpr, BK: gl.constexpr, DV: gl.constexpr,
                       DR: gl.constexpr, WIDE: gl.constexpr, PROBE: gl.constexpr = 0):
        """The pair kernel's gathers (the 4-warp default partition). Block 2i goes to buffer 0 (math warpgroup 0's),
        block 2i+1 to buffer 1. A buffer is filled in two halves, each with its own ``full`` / ``empty`` barrier:
        its *early* half, the latent columns only its owner's P V reads (buffer W: columns [256 W, 256 W + 256)),
        which the owner frees right after that P V; and its *late* half, the other latent columns plus the rope
        columns (where the owner's P waits for the other warpgroup) and the slot ids, freed when the other
        warpgroup's P V on it is done. Order per pair: 0 early, 1 early, 0 late, 1 late."""
        DVH: gl.constexpr = DV // 2
        half_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # [BK, 256] / [BK, 64] copies
        rows_l: gl.constexpr = gl.SliceLayout(1, half_l)
        idc_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        cols_h = gl.arange(0, DVH, layout=gl.SliceLayout(0, half_l))
        cols_r = DV + gl.arange(0, DR, layout=gl.SliceLayout(0, half_l))
        _load_q(q_ptr, t, hb, stride_qt, stride_qh, q_nope.index(0), q_rope.index(0), BH, DV, DR, 4)
        cp.mbarrier_arrive(qbar.index(0), increment_count=False)
        n_pairs = gl.cdiv(gl.cdiv(topk, BK), 2)
        ids0 = _block_ids(idx_base, 0, topk, BK, rows_l)
        ids1 = _block_ids(idx_base, 1, topk, BK, rows_l)
        for i in range(n_pairs):
            ph = (i & 1) ^ 1  # a fresh barrier passes phase 1 at once
            row0 = kv_ptr + _row_offsets(ids0, stride_kv, WIDE)[:, None]
            row1 = kv_ptr + _row_offsets(ids1, stride_kv, WIDE)[:, None]
            ok0 = (ids0 >= 0)[:, None]
            ok1 = (ids1 >= 0)[:, None]
            gather = (PROBE & 2) == 0 or i == 0  # PROBE 2 (timing only): no gathers after the first pair
            # buffer 0, early half: latent columns [0, 256), read by warpgroup 0's own P V only
            mbarrier.wait(empty.index(0), ph)
            if gather:
                cp.async_copy_global_to_shared(k_nope.index(0).slice(0, DVH, dim=1), row0 + cols_h[None, :], mask=ok0)
            cp.mbarrier_arrive(full.index(0), increment_count=False)
            # buffer 1, early half: latent columns [256, 512), read by warpgroup 1's own P V only
            mbarrier.wait(empty.index(3), ph)
            if gather:
                cp.async_copy_global_to_shared(k_nope.index(1).slice(DVH, DVH, dim=1), row1 + (DVH + cols_h)[None, :],
                                               mask=ok1)
            cp.mbarrier_arrive(full.index(2), increment_count=False)
            # buffer 0, late half: latent columns [256, 512), the rope columns (P_0's place) and the slot ids
            mbarrier.wait(empty.index(1), ph)
            if gather:
                cp.async_copy_global_to_shared(k_nope.index(0).slice(DVH, DVH, dim=1), row0 + (DVH + cols_h)[None, :],
                                               mask=ok0)
                cp.async_copy_global_to_shared(k_rope.index(0), row0 + cols_r[None, :], mask=ok0)
            kk = 2 * i * BK + gl.arange(0, BK, layout=idc_l)
            cp.async_copy_global_to_shared(ids_smem.index(0), idx_base + kk, mask=kk < topk)
            cp.mbarrier_arrive(full.index(1), increment_count=False)
            # buffer 1, late half: latent columns [0, 256), rope, ids
            mbarrier.wait(empty.index(2), ph)
            if gather:
                cp.async_copy_global_to_shared(k_nope.index(1).slice(0, DVH, dim=1), row1 + cols_h[None, :], mask=ok1)
                cp.async_copy_global_to_shared(k_rope.index(1), row1 + cols_r[None, :], mask=ok1)
            kk = kk + BK
            cp.async_copy_global_to_shared(ids_smem.index(1), idx_base + kk, mask=kk < topk)
            cp.mbarrier_arrive(full.index(3), increment_count=False)
            # the next pair's slot ids, loaded while this pair's copies fly (their latency is then off the path
            # from an ``empty`` to its copies)
            ids0 = _block_ids(idx_base, 2 * i + 2, topk, BK, rows_l)
            ids1 = _block_ids(idx_base, 2 * i + 3, topk, BK, rows_l)

    @gluon.jit
    def _pair_s_early(q_nope, k_nope, full, s_init, i, W: gl.constexpr, DVH: gl.constexpr):
        """Issue (async) the early-half part of S for block 2i + W: its latent columns [256 W, 256 W + 256), once they
        have landed. The views are indexed with i >> 30 (0) so that their wgmma descriptors are formed in the
        loop: hoisted out of it, ptxas spills them (roles2, KERNELS_NOTES)."""
        live = i >> 30
        mbarrier.wait(full.index(2 * W), i & 1)
        fence_async_shared()
        return warpgroup_mma(q_nope.index(live).slice(W * DVH, DVH, dim=1),
                             k_nope.index(W + live).slice(W * DVH, DVH, dim=1).permute((1, 0)), s_init,
                             use_acc=False, is_async=True)

    @gluon.jit
    def _pair_s_late(q_nope, q_rope, k_nope, k_rope, full, s, i, W: gl.constexpr, DVH: gl.constexpr):
        """Issue (async) the rest of block 2i + W's S: the other latent half and the rope columns, once its late
        half has landed."""
        live = i >> 30
        mbarrier.wait(full.index(2 * W + 1), i & 1)
        fence_async_shared()
        s = warpgroup_mma(q_nope.index(live).slice((1 - W) * DVH, DVH, dim=1),
                          k_nope.index(W + live).slice((1 - W) * DVH, DVH, dim=1).permute((1, 0)), s, is_async=True)
        return warpgroup_mma(q_rope.index(live), k_rope.index(W + live).permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _pair_other_pv(o, k_nope, p_buf, pr, ph, live, W: gl.constexpr, DVH: gl.constexpr, PROBE: gl.constexpr):
        """Issue (async) O += P V of the other warpgroup's block over warpgroup W's columns, once it has published its
        P (``pr`` at phase ph; in the place of that buffer's rope columns). ``live``: 0, the loop's i >> 30 (see
        ``_pair_s_early``)."""
        mbarrier.wait(pr.index(1 - W), ph)
        if (PROBE & 4) == 0:  # PROBE 4 (timing only): no P V MMAs
            o = warpgroup_mma(p_buf.index(1 - W + live), k_nope.index(1 - W + live).slice(W * DVH, DVH, dim=1), o,
                              is_async=True)
        return o

    @gluon.jit
    def _pair_block(s, o, m, l, k_nope, p_buf, m_x, ids_smem, empty, mx, pr, i, topk, qk_scale, W: gl.constexpr,
                    BK: gl.constexpr, DVH: gl.constexpr, PROBE: gl.constexpr):
        """Block 2i + W once its S [64 heads, 64 keys] is done: the joint row max with the other warpgroup, O *= the
        rescale, P, O += P V over the own columns (P from registers); warpgroup 1 then publishes P_1 (it is at the
        joint max already); warpgroup 0 waits for its P V, releases its buffer's early half, rescales P_0, O and l
        to the joint max and publishes P_0. -> (o, m, l, p_a): o in flight for warpgroup 1 (its own P V), done for
        warpgroup 0."""
        ph = i & 1
        live = i >> 30
        s_layout: gl.constexpr = s.type.layout
        o_layout: gl.constexpr = o.type.layout
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        p_dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        valid = _smem_block_valid(ids_smem, W, 2 * i + W, topk, BK, gl.SliceLayout(0, s_layout))
        s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_blk = gl.max(s, axis=1)
        if W == 0:
            m_new = gl.maximum(m, m_blk)
            m_x.index(0).store(m_new)
            gl.thread_barrier()
            mbarrier.arrive(mx.index(0), count=1)
        else:
            mbarrier.wait(mx.index(0), ph)
            m_new = gl.maximum(m_x.index(0).load(row_s), m_blk)  # >= m: warpgroup 0's value includes it
            m_x.index(1).store(m_new)
            gl.thread_barrier()
            mbarrier.arrive(mx.index(1), count=1)
        p, alpha = _exp_at_max(s, m, m_new)
        l = l * alpha + gl.sum(p, axis=1)
        o = o * gl.convert_layout(alpha, row_o)[:, None]
        m = m_new
        p_bf = p.to(gl.bfloat16)
        if W == 1:  # P_1 is at the joint max already: publish it first
            p_buf.index(1).store(p_bf)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(pr.index(1), count=1)
        p_a = gl.convert_layout(p_bf, p_dot)
        if (PROBE & 4) == 0:  # PROBE 4 (timing only): no P V MMAs
            o = warpgroup_mma(p_a, k_nope.index(W + live).slice(W * DVH, DVH, dim=1), o, is_async=True)
        if W == 0:
            # O must be rescaled to the joint max between the two P V: wait for the own one first
            o, p_a = warpgroup_mma_wait(0, deps=(o, p_a))
            gl.thread_barrier()
            mbarrier.arrive(empty.index(0), count=1)  # buffer 0's early half (latent columns [0, 256)) is free
            mbarrier.wait(mx.index(1), ph)  # the joint max: rescale P_0 (and O, l) to it, publish P_0
            m_j = m_x.index(1).load(row_s)
            beta = gl.exp2(m - gl.where(m_j == float("-inf"), 0.0, m_j))  # 0 for rows with no key yet
            p_buf.index(0).store((p * beta[:, None]).to(gl.bfloat16))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(pr.index(0), count=1)
            l = l * beta
            o = o * gl.convert_layout(beta, row_o)[:, None]
            m = m_j
        return o, m, l, p_a

    @gluon.jit
    def _pair_math(q_nope, q_rope, k_nope, k_rope, p_buf, m_x, l_x, ids_smem, qbar, full, empty, mx, pr, lx, topk,
                   qk_scale, out_ptr, lse_ptr, t, hb, stride_ot, stride_oh, stride_lt, W: gl.constexpr,
                   BH: gl.constexpr, BK: gl.constexpr, DV: gl.constexpr, EARLY_S: gl.constexpr = True,
                   PROBE: gl.constexpr = 0):
        """Math warpgroup W (a 4-warp worker) of the pair kernel: S of blocks 2i + W (buffer W) and O's columns
        [256 W, 256 W + 256) over every block. Per pair of blocks:
        - S_j = Q K_j^T, its early half's columns first (N = 64: Q read from shared memory once per 64 keys);
        - the row max: warpgroup 0 publishes max(m, rowmax S_0) (``mx`` 0), warpgroup 1 takes the max of that and
          its own and publishes it (``mx`` 1): the pair's joint max m*, so P_1 is at m* from the start;
        - O *= exp2(m - m_new), P_j = exp2(S_j - m_new), O += P_j V_j[:, own columns] with P_j from registers (no
          shared-memory round trip for its own block), then the early half of its buffer is free;
        - warpgroup 1 publishes P_1 (bf16, over buffer 1's rope columns: ``pr`` 1) as soon as it has it; warpgroup 0
          waits for m*, rescales its P_0 to it and publishes it (``pr`` 0), and O, l by the same factor;
        - O += P_other V_other[:, own columns] (P from shared memory), then that buffer's late half is free;
          warpgroup 1 queues it right behind its own P V (its O needs no rescale in between).
        EARLY_S (warpgroup 0): the loop is rotated so that the other block's P V of pair i-1 and the early half of
        pair i's S are issued back to back, and the late half once that P V is done, with no MMA in flight across
        the loop's back edge (which makes ptxas serialize every wgmma, C7517 / C7512): the tensor core has pair i's
        S queued while warpgroup 0 waits, as in the public kernel's schedule.
        At the end the two row sums are added (``lx``), and each warpgroup writes its O columns; warpgroup 0 the lse."""
        DVH: gl.constexpr = DV // 2
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BK, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DVH, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        n_pairs = gl.cdiv(gl.cdiv(topk, BK), 2)
        m = gl.full([BH], float("-inf"), gl.float32, layout=row_s)
        l = gl.zeros([BH], gl.float32, layout=row_s)
        o = gl.zeros([BH, DVH], gl.float32, layout=o_layout)
        s_init = gl.zeros([BH, BK], gl.float32, layout=s_layout)
        mbarrier.wait(qbar.index(0), 0)
        if W == 0 and EARLY_S:
            s = _pair_s_early(q_nope, k_nope, full, s_init, 0, W, DVH)
            s = _pair_s_late(q_nope, q_rope, k_nope, k_rope, full, s, 0, W, DVH)
            s = warpgroup_mma_wait(0, deps=(s,))
            o, m, l, p_a = _pair_block(s, o, m, l, k_nope, p_buf, m_x, ids_smem, empty, mx, pr, 0, topk, qk_scale,
                                       W, BK, DVH, PROBE)
            for i in range(1, n_pairs):
                o = _pair_other_pv(o, k_nope, p_buf, pr, (i - 1) & 1, i >> 30, W, DVH, PROBE)  # pair i-1's other P V
                s = _pair_s_early(q_nope, k_nope, full, s_init, i, W, DVH)
                o, s = warpgroup_mma_wait(1, deps=(o, s))  # pair i-1's other P V done
                gl.thread_barrier()
                mbarrier.arrive(empty.index(2), count=1)  # buffer 1's late half (columns [0, 256), rope: P_1) is free
                s = _pair_s_late(q_nope, q_rope, k_nope, k_rope, full, s, i, W, DVH)
                s = warpgroup_mma_wait(0, deps=(s,))
                o, m, l, p_a = _pair_block(s, o, m, l, k_nope, p_buf, m_x, ids_smem, empty, mx, pr, i, topk,
                                           qk_scale, W, BK, DVH, PROBE)
            o = _pair_other_pv(o, k_nope, p_buf, pr, (n_pairs - 1) & 1, n_pairs >> 30, W, DVH, PROBE)
            o = warpgroup_mma_wait(0, deps=(o,))
            gl.thread_barrier()
            mbarrier.arrive(empty.index(2), count=1)
        else:
            for i in range(n_pairs):
                s = _pair_s_early(q_nope, k_nope, full, s_init, i, W, DVH)
                s = _pair_s_late(q_nope, q_rope, k_nope, k_rope, full, s, i, W, DVH)
                s = warpgroup_mma_wait(0, deps=(s,))
                o, m, l, p_a = _pair_block(s, o, m, l, k_nope, p_buf, m_x, ids_smem, empty, mx, pr, i, topk,
                                           qk_scale, W, BK, DVH, PROBE)
                o = _pair_other_pv(o, k_nope, p_buf, pr, i & 1, i >> 30, W, DVH, PROBE)
                if W == 1:  # the other P V is queued behind the own one
                    o, p_a = warpgroup_mma_wait(1, deps=(o, p_a))  # the own P V done
                    gl.thread_barrier()
                    mbarrier.arrive(empty.index(3), count=1)  # buffer 1's early half (columns [256, 512)) is free
                o = warpgroup_mma_wait(0, deps=(o,))  # nothing in flight across the back edge (ptxas C7514/C7515)
                gl.thread_barrier()
                mbarrier.arrive(empty.index(2 - W), count=1)  # buffer 1-W's late half (half W; its P too) is free
        l_x.index(W).store(l)
        gl.thread_barrier()
        mbarrier.arrive(lx.index(W), count=1)
        mbarrier.wait(lx.index(1 - W), 0)
        l_all = l + l_x.index(1 - W).load(row_s)
        _store_out(o, m, l_all, out_ptr, lse_ptr, t, hb, W * DVH, stride_ot, stride_oh, stride_lt, BH, DVH, row_s,
                   o_layout, W == 0)

    @gluon.jit
    def _sparse_mla_prefill_pair_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
        topk, n_hb, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
        BH: gl.constexpr, BK: gl.constexpr, DV: gl.constexpr, DR: gl.constexpr, MATH_REGS: gl.constexpr,
        WIDE: gl.constexpr, PROBE: gl.constexpr, num_warps: gl.constexpr, EARLY_S: gl.constexpr = True,
    ):
        """Pair: two math warpgroups (``_pair_math``, 4-warp workers with MATH_REGS registers) on alternate 64-key
        blocks, each owning half of O's columns, and a producer (the default partition, ``_pair_producer``) that
        fills each of the two key buffers in halves, so a half is refilled as soon as the one warpgroup reading it
        is done. 384 threads, 168 registers a thread at launch: 2 x 216 + 72."""
        gl.static_assert(num_warps == 4, "the default partition is the 4-warp producer")
        gl.static_assert(BH == DR and BK == DR, "P [BH, BK] bf16 goes in the place of the block's rope columns")
        pid = gl.program_id(0)
        t = pid // n_hb
        hb = pid % n_hb
        wide_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        row_smem: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        q_nope = gl.allocate_shared_memory(gl.bfloat16, [1, BH, DV], wide_smem)  # [1, ...]: see _pair_math
        q_rope = gl.allocate_shared_memory(gl.bfloat16, [1, BH, DR], wide_smem)
        k_nope = gl.allocate_shared_memory(gl.bfloat16, [2, BK, DV], wide_smem)
        k_rope = gl.allocate_shared_memory(gl.bfloat16, [2, BK, DR], wide_smem)
        p_buf = k_rope  # [BK, DR] == [BH, BK]: block 2i+W's P over buffer W's rope columns
        m_x = gl.allocate_shared_memory(gl.float32, [2, BH], row_smem)
        l_x = gl.allocate_shared_memory(gl.float32, [2, BH], row_smem)
        ids_smem = gl.allocate_shared_memory(gl.int32, [2, BK], row_smem)
        bar_l: gl.constexpr = mbarrier.MBarrierLayout()
        qbar = gl.allocate_shared_memory(gl.int64, [1, 1], bar_l)
        full = gl.allocate_shared_memory(gl.int64, [4, 1], bar_l)  # [2 buffer + (0 early | 1 late)]
        empty = gl.allocate_shared_memory(gl.int64, [4, 1], bar_l)  # [2 buffer + column half (= the reader)]
        mx = gl.allocate_shared_memory(gl.int64, [2, 1], bar_l)
        pr = gl.allocate_shared_memory(gl.int64, [2, 1], bar_l)
        lx = gl.allocate_shared_memory(gl.int64, [2, 1], bar_l)
        mbarrier.init(qbar.index(0), count=128)  # one cp.async arrive per producer thread
        for i in gl.static_range(4):
            mbarrier.init(full.index(i), count=128)
            mbarrier.init(empty.index(i), count=1)  # the one math warpgroup that reads that half
        for i in gl.static_range(2):
            mbarrier.init(mx.index(i), count=1)
            mbarrier.init(pr.index(i), count=1)
            mbarrier.init(lx.index(i), count=1)
        fence_async_shared()
        gl.thread_barrier()  # the barriers initialised before any partition uses them
        idx_base = idx_ptr + t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_pair_producer, (q_ptr, kv_ptr, idx_base, topk, t, hb, stride_qt, stride_qh, stride_kv, q_nope, q_rope,
                              k_nope, k_rope, ids_smem, qbar, full, empty, BH, BK, DV, DR, WIDE, PROBE)),
            (_pair_math, (q_nope, q_rope, k_nope, k_rope, p_buf, m_x, l_x, ids_smem, qbar, full, empty, mx, pr, lx,
                          topk, qk_scale, out_ptr, lse_ptr, t, hb, stride_ot, stride_oh, stride_lt, 0, BH, BK, DV,
                          EARLY_S, PROBE)),
            (_pair_math, (q_nope, q_rope, k_nope, k_rope, p_buf, m_x, l_x, ids_smem, qbar, full, empty, mx, pr, lx,
                          topk, qk_scale, out_ptr, lse_ptr, t, hb, stride_ot, stride_oh, stride_lt, 1, BH, BK, DV,
                          EARLY_S, PROBE)),
        ], [4, 4], [MATH_REGS, MATH_REGS])


def _aligned(x: torch.Tensor) -> bool:
    return x.data_ptr() % 16 == 0


def hopper_prefill_supported(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, d_v: int) -> bool:
    """True when this kernel takes the call: Gluon present, an sm_90 GPU, bf16, the V3.2 latent geometry
    (576 = 512 + 64), whole 64-head blocks and 16-byte aligned rows (cp.async copies 16 bytes)."""
    if not (HAVE_GLUON and q.is_cuda and q.dtype == torch.bfloat16 and kv.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    t, h, dqk = q.shape
    return (dqk == DQK and d_v == DV and h % BH == 0 and indices.dtype == torch.int32 and indices.stride(-1) == 1
            and q.stride(-1) == 1 and kv.stride(-1) == 1 and q.stride(0) % 8 == 0 and q.stride(1) % 8 == 0
            and kv.stride(0) % 8 == 0 and _aligned(q) and _aligned(kv))


VARIANTS = ("ws", "seesaw", "ws_bk32", "one_partition", "roles", "pair")
# maxnreg at launch of the warp-specialized kernels: 65536 registers / their threads (384, or 512 for "roles"); the
# partitions' setmaxnreg rebalance it (benchmarks/compile_report.py compiles them the same way)
LAUNCH_MAXNREG = {"ws": 168, "ws_bk32": 168, "seesaw": 168, "roles": 128, "pair": 168}
# the engine's kernel: "pair" measured 511 TFLOPS vs "roles" 458 at 128 heads with random indices, 478 vs 443 at 64
# heads, on one H200 in one run (docs/BENCHMARKS.md, session 20; "roles" had been 1.08-1.11x "ws" in session 17).
# Its outputs are not bit-equal to the Triton kernel's ("roles"' were): its row sums run in another order (max rel.
# err 3.4e-3 .. 5.0e-3 against the Triton kernel, within the GPU tests' fp32-reference bounds)
DEFAULT_VARIANT = "pair"


def sparse_mla_prefill_hopper(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                              d_v: int = DV, prefetch_ids: bool = True,
                              early_pv: bool = True, probe: int = 0, early_s: bool = True,
                              warp_specialized: bool = True,
                              variant: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [t, h, 576] bf16, kv [slots, 576] bf16, indices int32 [t, topk] (-1 = none) -> (out [t, h, 512] bf16,
    lse [t, h] fp32, natural log). Callers check ``hopper_prefill_supported`` first.

    ``variant``: "pair" (the default: ``_sparse_mla_prefill_pair_kernel``: two math warpgroups on alternate blocks,
    own P from registers, buffers refilled in halves), "roles" (``_sparse_mla_prefill_roles_kernel``, one warpgroup
    for S and the softmax, two for O, one gathering), "ws" (``_sparse_mla_prefill_ws_kernel``,
    64-key blocks, a producer warpgroup, S and O split over two compute warpgroups), "seesaw"
    (``_sparse_mla_prefill_seesaw_kernel``: 32-key blocks, four buffers, the two consumer warpgroups on alternate
    blocks), "ws_bk32" (the "ws" kernel with 32-key blocks in
    four buffers: the deeper ring alone, for the A/B) or "one_partition" (``_sparse_mla_prefill_kernel``). None
    follows the older flag: ``warp_specialized`` True = the default, False = "one_partition".
    The one-partition kernel's flags (ignored by the others): ``prefetch_ids=False`` loads a block's slot ids
    just before its gather, ``early_pv=False`` issues O += P_j V_j only after block j+1's gather has landed
    (the first version; both kept for the A/B benchmark); ``probe`` (timing only, wrong results): 1 = no
    softmax, 2 = no gathers after the first two blocks, 3 = neither; "roles" also takes bit sums with 4 = no P V MMA,
    8 = no S MMA; "pair" takes 2 (no gathers after the first pair of blocks) and 4 (no P V MMAs). ``early_s``
    ("pair" only): math warpgroup 0 issues a pair's S behind the previous pair's other-block P V (its rotated loop);
    False issues it at the top of each pair, for the A/B (the same operations in the same order: equal outputs)."""
    if variant is None:
        variant = DEFAULT_VARIANT if warp_specialized else "one_partition"
    check(variant in VARIANTS, f"sparse_mla_prefill_hopper: variant must be one of {VARIANTS}, got {variant!r}")
    check(hopper_prefill_supported(q, kv, indices, d_v),
          "sparse_mla_prefill_hopper: needs bf16 q [t, h % 64 == 0, 576] / kv [slots, 576] on an sm_90 GPU, "
          "int32 indices, 16-byte aligned rows; use dsaserve.kernels.sparse_mla (it falls back by itself)")
    t, h, _ = q.shape
    topk = indices.shape[1]
    out = torch.empty(t, h, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(t, h, dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    if topk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    n_hb = h // BH
    args = (q, kv, indices, out, lse, topk, n_hb, sm_scale * LOG2E,
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1), lse.stride(0))
    if variant in ("ws", "ws_bk32"):
        # 8 consumer + 4 producer warps: 168 registers a thread at launch (65536 / 384), rebalanced inside to
        # PRODUCER_REGS for the producer and the rest (224 / 216) for the consumers
        bk, nbuf, regs = (BK, 2, WS_PRODUCER_REGS) if variant == "ws" else (WS32_BK, WS32_NBUF, WS32_PRODUCER_REGS)
        _sparse_mla_prefill_ws_kernel[(t * n_hb,)](
            *args, BH=BH, BK=bk, DV=DV, DR=DQK - DV, NBUF=nbuf, PRODUCER_REGS=regs, num_warps=NUM_WARPS,
            maxnreg=LAUNCH_MAXNREG[variant],
        )
    elif variant == "seesaw":
        # 4 producer (default partition) + 2 x 4 consumer warps: 168 a thread at launch, rebalanced inside to
        # SEESAW_CONSUMER_REGS for the consumers and the rest (56) for the producer
        _sparse_mla_prefill_seesaw_kernel[(t * n_hb,)](
            *args, BH=BH, BK=SEESAW_BK, DV=DV, DR=DQK - DV, NBUF=SEESAW_NBUF, REGS0=SEESAW_CONSUMER_REGS[0],
            REGS1=SEESAW_CONSUMER_REGS[1], num_warps=4, maxnreg=LAUNCH_MAXNREG[variant],
        )
    elif variant == "pair":
        _sparse_mla_prefill_pair_kernel[(t * n_hb,)](
            *args, BH=BH, BK=BK, DV=DV, DR=DQK - DV, MATH_REGS=PAIR_MATH_REGS,
            WIDE=kv.shape[0] * kv.stride(0) >= 2**31, PROBE=probe, num_warps=4, maxnreg=LAUNCH_MAXNREG[variant],
            EARLY_S=early_s,
        )
    elif variant == "roles":
        _sparse_mla_prefill_roles_kernel[(t * n_hb,)](
            *args, BH=BH, BK=BK, DV=DV, DR=DQK - DV, NBUF=2, VALUE_REGS=ROLES_VALUE_REGS,
            PRODUCER_REGS=ROLES_PRODUCER_REGS, WIDE=kv.shape[0] * kv.stride(0) >= 2**31, PROBE=probe, num_warps=4,
            maxnreg=LAUNCH_MAXNREG[variant],
        )
    else:
        _sparse_mla_prefill_kernel[(t * n_hb,)](
            *args, BH=BH, BK=BK, DV=DV, DR=DQK - DV, PREFETCH_IDS=prefetch_ids, EARLY_PV=early_pv, PROBE=probe,
            num_warps=NUM_WARPS,
        )
    return out, lse
