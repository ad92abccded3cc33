"""fp8 grouped expert GEMMs for Hopper (sm_90) in Gluon: the prefill-size MoE path.

Why: the Triton kernel (``grouped_moe._moe_fp8_gemm_kernel``) reaches 1.8-2.0x its FLOP floor on H200
because every 128-deep K step's product must be promoted (acc += dot * scale_a * scale_b) before the next one
is accumulated: at one program per SM the tensor core idles while the program waits for its own MMA and
promotes it (benchmarks/KERNELS_NOTES.md, MoE notes; Triton's automatic warp specialisation did not help).
The schedule here gets the overlap from a second, independent warpgroup instead of from MMAs in flight
across a promotion (ptxas serializes every wgmma of a kernel whose accumulator is touched while its MMA
runs, C7514: the first attempt, branch ``moe-gluon-wip``):

* One program per SM, persistent over the (row tile, column tile) pairs of the plan (``MoEPlan.tiles``:
  128-row tiles of one expert), GROUP_M row tiles sweeping the column tiles together (L2 reuse of an
  expert's weights, as the Triton kernel). By default (``schedule="queue"``) the producer claims each next
  work item from a per-launch atomic counter and hands its id to the consumers through a small mbarrier ring,
  so the items in flight stay a window of consecutive ones and the programs that read one weight tile run
  together even when items take different times (``_n_programs`` has the other schedules).
* A producer partition (4 warps, few registers) loads each K step's A rows (cp.async; the gate_up GEMM
  gathers the token rows, the down GEMM's sorted rows come by TMA) and the weight tile(s) (TMA over the
  stacked experts) into a ring of STAGES buffers, and runs ahead into the next tile while the consumers
  finish the current one.
* Two consumer partitions (one warpgroup each) own the tile's top and bottom 64 rows. A work item multiplies
  its rows by a PAIR of 128-row weight tiles: gate and up (gate_up), or two neighbouring 128-column blocks of
  the output (down, where the hidden size is a multiple of 256): 48 KB of operands per 128-deep step for
  8.4 MFLOP. Per K step each consumer issues its MMA(s), waits for them (nothing in flight across a promotion or the loop's back edge), promotes with the
  row's activation scale and the block's weight scale, and releases the ring slot (``empty`` counts both
  consumers). The two are separate partitions with no barrier between them, so they drift apart and one
  promotes while the other's MMA runs.
* Epilogues as the Triton kernel's, per consumer on its own rows: FUSE_SILU (gate_up) writes
  silu(gate) * up quantized to e4m3 with one scale per row per 128 columns (the act_quant contract: the
  down GEMM's input); otherwise the product in the output dtype.

Same inputs, plan and outputs as ``grouped_moe._fp8_gate_up`` / ``_fp8_down`` (the plan's tiles must be 128
rows). Gluon has no CPU interpreter: CI compiles the kernels (tests/scripts/test_gluon_compiles.py), the
numerics are tested on the GPU (tests/gpu/test_moe_gemm_hopper.py) against the same reference as the Triton
kernel.
"""

from __future__ import annotations

import torch

from ._common import MOE_SCHEDULES as SCHEDULES, check, device_sm_count

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from .mma_turns import end_turn, take_turn, turn_barrier

    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

BM = 128  # rows of one expert per tile: two consumer warpgroups x 64 (64 x 128 fp32 products: 64 registers)
BN = 128  # output columns per tile: one weight-scale block
BK = 128  # K step: one scale block
STAGES_GATE_UP = 4  # A 16 KB + gate 16 KB + up 16 KB a stage
STAGES_DOWN = 6  # A 16 KB + B 16 KB a stage
STAGES_DOWN_PAIR = 4  # A 16 KB + two weight tiles of 16 KB
NUM_WARPS = 4  # the default partition (consumer 0); consumer 1 and the producer add 4 warps each
CONSUMER_REGS = 232
PRODUCER_REGS = 40
MAXNREG = 168  # (232 + 232 + 40) / 3: the register file of 384 threads
ID_STAGES = 2  # "queue" schedule: claimed item ids in flight between the producer and the consumers


if HAVE_GLUON:

    @gluon.jit
    def _tile_of(w, n_tiles, n_col_tiles, GROUP_M: gl.constexpr):
        """(row tile, column tile) of work item ``w``: GROUP_M row tiles sweep all column tiles together (an
        expert's tiles run close in time: L2 reuse of its weights), as ``grouped_moe._tile_of_program``."""
        width = GROUP_M * n_col_tiles
        first_m = (w // width) * GROUP_M
        gsize = gl.minimum(n_tiles - first_m, GROUP_M)
        return first_m + (w % width) % gsize, (w % width) // gsize

    @gluon.jit
    def _work_item(w, tiles_ptr, n_tiles, n_col_tiles, GROUP_M: gl.constexpr):
        """Work item ``w`` -> (column tile, local expert or -1 for an unused plan tile, first row, end row): the
        one schedule every partition walks (the producer and both consumers must see the same ring steps)."""
        pid_m, pid_n = _tile_of(w, n_tiles, n_col_tiles, GROUP_M)
        entry = tiles_ptr + pid_m * 3
        return pid_n, gl.load(entry), gl.load(entry + 1), gl.load(entry + 2)

    @gluon.jit
    def _store_rows(c_ptr, x, first_row, row_end, col0, stride_cm, ROWS: gl.constexpr, COLS: gl.constexpr,
                    VEC: gl.constexpr):
        """Rows [first_row, min(first_row + ROWS, row_end)) of a [ROWS, COLS] tile x (any layout) to c_ptr, through
        a layout with VEC contiguous elements (16 bytes) a thread: full-line stores instead of the MMA layout's
        2-element pieces (the layout change goes through shared memory)."""
        TC: gl.constexpr = COLS // VEC  # threads along a row
        st_l: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TC, TC], [4, 1], [1, 0])
        xb = gl.convert_layout(x, st_l)
        r = first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, st_l))
        c = col0 + gl.arange(0, COLS, layout=gl.SliceLayout(0, st_l))
        gl.store(c_ptr + r.to(gl.int64)[:, None] * stride_cm + c[None, :], xb, mask=(r < row_end)[:, None])

    @gluon.jit
    def _claim(queue_ptr, ids, id_ready, id_empty, j, ID_STAGES: gl.constexpr):
        """Producer, QUEUE schedule: the next work item from the launch's counter, published in the id ring's slot
        ``j % ID_STAGES`` for the two consumers (n_work or more = no items left)."""
        id_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        w = gl.atomic_add(queue_ptr, 1)  # relaxed is enough: the id reaches the consumers through the mbarrier
        slot = j % ID_STAGES
        mbarrier.wait(id_empty.index(slot), ((j // ID_STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
        ids.index(slot).store(gl.full([1], w, gl.int32, layout=id_l))
        gl.thread_barrier()  # every thread's store lands before the (one-thread) arrive
        mbarrier.arrive(id_ready.index(slot), count=1)
        return w

    @gluon.jit
    def _take(ids, id_ready, id_empty, j, ID_STAGES: gl.constexpr):
        """Consumer, QUEUE schedule: the work item the producer published in id slot ``j % ID_STAGES``."""
        id_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        slot = j % ID_STAGES
        mbarrier.wait(id_ready.index(slot), (j // ID_STAGES) & 1)
        w = gl.max(ids.index(slot).load(id_l), axis=0)
        gl.thread_barrier()  # every thread has read the slot before it is handed back
        mbarrier.arrive(id_empty.index(slot), count=1)
        return w

    @gluon.jit
    def _produce_item(w, it, a_ptr, a_desc, tok_ptr, b_desc, tiles_ptr, a_bufs, b_bufs, b2_bufs, a_ready,
                      tma_ready, empty, n_tiles, n_col_tiles, K, pair_rows, b_rows, stride_am,
                      BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                      GROUP_M: gl.constexpr, GATHER: gl.constexpr, PAIR: gl.constexpr, OUT_N: gl.constexpr,
                      TMA_BYTES: gl.constexpr):
        """Fills ring slots ``it % STAGES``, ... with work item ``w``'s K steps (A rows and weight tile(s)) -> the
        ring step after them."""
        a_l: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])  # 4 warps: 16 rows x 128 bytes
        cols = gl.arange(0, BK, layout=gl.SliceLayout(0, a_l))
        nk = K // BK
        pid_n, e, row0, row_end = _work_item(w, tiles_ptr, n_tiles, n_col_tiles, GROUP_M)
        if e >= 0:
            b_row = e * b_rows + pid_n * OUT_N  # the tile's first weight row in the stacked [E * b_rows, K] view
            if GATHER:
                rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, a_l))
                rows = gl.where(rows < row_end, rows, row0)  # rows past the expert's end re-read its first
                a_rows = a_ptr + gl.load(tok_ptr + rows).to(gl.int64)[:, None] * stride_am + cols[None, :]
            for k in range(nk):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
                mbarrier.expect(tma_ready.index(s), TMA_BYTES)
                tma.async_copy_global_to_shared(b_desc, [b_row, k * BK], tma_ready.index(s), b_bufs.index(s))
                if PAIR:
                    tma.async_copy_global_to_shared(b_desc, [b_row + pair_rows, k * BK], tma_ready.index(s),
                                                    b2_bufs.index(s))
                if GATHER:
                    cp.async_copy_global_to_shared(a_bufs.index(s), a_rows + k * BK)
                    cp.mbarrier_arrive(a_ready.index(s), increment_count=False)  # one arrive per thread
                else:  # sorted rows: one TMA box (rows past the expert's end are loaded, never stored)
                    tma.async_copy_global_to_shared(a_desc, [row0, k * BK], tma_ready.index(s), a_bufs.index(s))
                it += 1
        return it

    @gluon.jit
    def _producer(a_ptr, a_desc, tok_ptr, b_desc, tiles_ptr, a_bufs, b_bufs, b2_bufs, a_ready, tma_ready, empty,
                  queue_ptr, ids, id_ready, id_empty, n_tiles, n_col_tiles, n_work, K, pair_rows, b_rows, stride_am,
                  BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                  GROUP_M: gl.constexpr, GATHER: gl.constexpr, PAIR: gl.constexpr, OUT_N: gl.constexpr,
                  TMA_BYTES: gl.constexpr, QUEUE: gl.constexpr, ID_STAGES: gl.constexpr):
        """Fills ring slot ``it % STAGES`` with K step ``it``'s A rows and weight tile(s), item after item: items
        p, p + programs, ... (static), or each next one claimed from the launch's counter (QUEUE)."""
        it = 0
        if QUEUE:
            j = 0
            w = _claim(queue_ptr, ids, id_ready, id_empty, j, ID_STAGES)
            while w < n_work:
                it = _produce_item(w, it, a_ptr, a_desc, tok_ptr, b_desc, tiles_ptr, a_bufs, b_bufs, b2_bufs,
                                   a_ready, tma_ready, empty, n_tiles, n_col_tiles, K, pair_rows, b_rows, stride_am,
                                   BM, BN, BK, STAGES, GROUP_M, GATHER, PAIR, OUT_N, TMA_BYTES)
                j += 1
                w = _claim(queue_ptr, ids, id_ready, id_empty, j, ID_STAGES)
        else:
            for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
                it = _produce_item(w, it, a_ptr, a_desc, tok_ptr, b_desc, tiles_ptr, a_bufs, b_bufs, b2_bufs,
                                   a_ready, tma_ready, empty, n_tiles, n_col_tiles, K, pair_rows, b_rows, stride_am,
                                   BM, BN, BK, STAGES, GROUP_M, GATHER, PAIR, OUT_N, TMA_BYTES)

    @gluon.jit
    def _consume_item(w, it, a_bufs, b_bufs, b2_bufs, a_ready, tma_ready, empty, turn, as_ptr, tok_ptr, bs_ptr,
                      tiles_ptr, c_ptr, cs_ptr, n_tiles, n_col_tiles, K, pair_rows,
                      stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm,
                      PART: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                      GROUP_M: gl.constexpr, GATHER: gl.constexpr, PAIR: gl.constexpr, FUSE_SILU: gl.constexpr,
                      OUT_N: gl.constexpr, AHEAD: gl.constexpr, EPI_BLOCKED: gl.constexpr, ORDERED: gl.constexpr):
        """Rows [PART * 64, PART * 64 + 64) of work item ``w``'s tile: acc = sum_k (A_k B_k^T) * scale_a[row, k] *
        scale_b[k], each step's MMA waited for and promoted at once; then the epilogue on these rows -> the ring
        step after the item's. ORDERED: the two consumers issue their MMAs in turn (``mma_turns``): the i-th MMA
        of ring step ``it`` is issue 2 * (NMMA * it + i) + PART, an idle half taking its turns without an MMA."""
        NMMA: gl.constexpr = 2 if PAIR else 1  # MMAs (turns) a K step
        HALF: gl.constexpr = BM // 2
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BN, 32])
        row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
        nk = K // BK
        pid_n, e, row0, row_end = _work_item(w, tiles_ptr, n_tiles, n_col_tiles, GROUP_M)
        if e >= 0:
            if row0 + PART * HALF < row_end:
                rows = row0 + PART * HALF + gl.arange(0, HALF, layout=row_l)
                rmask = rows < row_end
                rows_ld = gl.where(rmask, rows, row0)
                if GATHER:  # the activation scales of a gathered row are its token's
                    arow = gl.load(tok_ptr + rows_ld).to(gl.int64)
                else:
                    arow = rows_ld.to(gl.int64)
                as_rows = as_ptr + arow * stride_asm
                bs_row = bs_ptr + e.to(gl.int64) * stride_bse + ((pid_n * OUT_N) // 128) * stride_bsn
                bs2_row = bs_row + (pair_rows // 128) * stride_bsn
                acc = gl.zeros([HALF, BN], gl.float32, layout=acc_l)
                acc2 = gl.zeros([HALF, BN], gl.float32, layout=acc_l)
                # an MMA's fresh product (use_acc=False); made per tile so it is dead during the epilogue
                t = gl.zeros([HALF, BN], gl.float32, layout=acc_l)
                # the scales of a step are loaded AHEAD steps ahead (1 or 2), after an MMA issue: the fence
                # below waits for every memory access in flight, and the promotion would wait for them (an L2
                # round trip under load is about one step's MMA time)
                sa_n = gl.load(as_rows)
                b_n = gl.load(bs_row)
                if PAIR:
                    b2_n = gl.load(bs2_row)
                if AHEAD == 2:
                    k1 = gl.minimum(1, nk - 1)
                    sa_nn = gl.load(as_rows + k1)
                    b_nn = gl.load(bs_row + k1)
                    if PAIR:
                        b2_nn = gl.load(bs2_row + k1)
                for k in range(nk):
                    s = it % STAGES
                    ph = (it // STAGES) & 1
                    sa = sa_n
                    b_k = b_n
                    if PAIR:
                        b2_k = b2_n
                    if AHEAD == 2:
                        sa_n = sa_nn
                        b_n = b_nn
                        if PAIR:
                            b2_n = b2_nn
                    mbarrier.wait(tma_ready.index(s), ph)
                    if GATHER:
                        mbarrier.wait(a_ready.index(s), ph)
                        fence_async_shared()  # cp.async (generic proxy) writes, read by the tensor core (async)
                    a = a_bufs.index(s).slice(PART * HALF, HALF, dim=0)
                    if ORDERED:
                        take_turn(turn, 2 * (NMMA * it) + PART)
                    t = warpgroup_mma(a, b_bufs.index(s).permute((1, 0)), t, use_acc=False, is_async=True)
                    if ORDERED:
                        end_turn(turn)
                    k_next = gl.minimum(k + AHEAD, nk - 1)
                    if AHEAD == 2:
                        sa_nn = gl.load(as_rows + k_next)
                        b_nn = gl.load(bs_row + k_next)
                        if PAIR:
                            b2_nn = gl.load(bs2_row + k_next)
                    else:
                        sa_n = gl.load(as_rows + k_next)
                        b_n = gl.load(bs_row + k_next)
                        if PAIR:
                            b2_n = gl.load(bs2_row + k_next)
                    t = warpgroup_mma_wait(0, deps=(t,))
                    sc = sa * b_k
                    acc += t * sc[:, None]
                    if PAIR:
                        # the promoted sum passes through a (no-op) wait, an ordered asm statement: its FMAs stay
                        # before the next MMA, which then reuses t's registers (no second 64-register tile)
                        acc = warpgroup_mma_wait(0, deps=(acc,))
                        if ORDERED:
                            take_turn(turn, 2 * (NMMA * it + 1) + PART)
                        t = warpgroup_mma(a, b2_bufs.index(s).permute((1, 0)), t, use_acc=False, is_async=True)
                        if ORDERED:
                            end_turn(turn)
                        t = warpgroup_mma_wait(0, deps=(t,))
                        sc2 = sa * b2_k
                        acc2 += t * sc2[:, None]
                    mbarrier.arrive(empty.index(s), count=1)  # this warpgroup is done with the slot
                    it += 1

                first = row0 + PART * HALF
                if FUSE_SILU:
                    h = acc / (1.0 + gl.exp(-acc)) * acc2  # silu(gate) * up
                    amax = gl.maximum(gl.max(gl.abs(h), axis=1), 1e-4)  # act_quant's contract (AMAX_MIN, 448)
                    scale = gl.div_rn(amax, gl.full([HALF], 448.0, gl.float32, layout=row_l))
                    q = gl.div_rn(h, gl.broadcast(scale[:, None], h)[0])  # exact division, as act_quant
                    q = gl.minimum(gl.maximum(q, -448.0), 448.0).to(gl.float8e4nv)
                    if EPI_BLOCKED:
                        _store_rows(c_ptr, q, first, row_end, pid_n * OUT_N, stride_cm, HALF, BN, 16)
                    else:
                        # the tile's columns, made here: 32 registers a thread that the K loop must not hold
                        cols = pid_n * OUT_N + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_l))
                        gl.store(c_ptr + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :], q,
                                 mask=rmask[:, None])
                    gl.store(cs_ptr + rows.to(gl.int64) * stride_csm + pid_n, scale, mask=rmask)
                elif EPI_BLOCKED:
                    VEC: gl.constexpr = 128 // c_ptr.dtype.element_ty.primitive_bitwidth  # 16 bytes
                    _store_rows(c_ptr, acc.to(c_ptr.dtype.element_ty), first, row_end, pid_n * OUT_N, stride_cm,
                                HALF, BN, VEC)
                    if PAIR:  # the second weight tile's 128 columns follow the first's
                        _store_rows(c_ptr, acc2.to(c_ptr.dtype.element_ty), first, row_end, pid_n * OUT_N + BN,
                                    stride_cm, HALF, BN, VEC)
                else:
                    cols = pid_n * OUT_N + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_l))
                    c_ptrs = c_ptr + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :]
                    gl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None])
                    if PAIR:  # the second weight tile's 128 columns follow the first's
                        gl.store(c_ptrs + BN, acc2.to(c_ptr.dtype.element_ty), mask=rmask[:, None])
            else:  # every row of this half is past the expert's end: hand the slots back, no MMA
                for k in range(nk):
                    # waiting for the slot to be filled keeps this warpgroup within one lap of the ring
                    # (one arrive per phase of ``empty``)
                    mbarrier.wait(tma_ready.index(it % STAGES), (it // STAGES) & 1)
                    if ORDERED:  # the other consumer's turns go on: pass this half's
                        for i in gl.static_range(NMMA):
                            take_turn(turn, 2 * (NMMA * it + i) + PART)
                            end_turn(turn)
                    mbarrier.arrive(empty.index(it % STAGES), count=1)
                    it += 1
        return it

    @gluon.jit
    def _consumer(a_bufs, b_bufs, b2_bufs, a_ready, tma_ready, empty, turn, ids, id_ready, id_empty, as_ptr,
                  tok_ptr, bs_ptr, tiles_ptr, c_ptr, cs_ptr, n_tiles, n_col_tiles, n_work, K, pair_rows,
                  stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm,
                  PART: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                  GROUP_M: gl.constexpr, GATHER: gl.constexpr, PAIR: gl.constexpr, FUSE_SILU: gl.constexpr,
                  OUT_N: gl.constexpr, AHEAD: gl.constexpr, EPI_BLOCKED: gl.constexpr, QUEUE: gl.constexpr,
                  ID_STAGES: gl.constexpr, ORDERED: gl.constexpr):
        """Rows [PART * 64, PART * 64 + 64) of every work item the producer loads, in its order."""
        it = 0
        if QUEUE:
            j = 0
            w = _take(ids, id_ready, id_empty, j, ID_STAGES)
            while w < n_work:
                it = _consume_item(w, it, a_bufs, b_bufs, b2_bufs, a_ready, tma_ready, empty, turn, as_ptr,
                                   tok_ptr, bs_ptr, tiles_ptr, c_ptr, cs_ptr, n_tiles, n_col_tiles, K, pair_rows,
                                   stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm,
                                   PART, BM, BN, BK, STAGES, GROUP_M, GATHER, PAIR, FUSE_SILU, OUT_N, AHEAD,
                                   EPI_BLOCKED, ORDERED)
                j += 1
                w = _take(ids, id_ready, id_empty, j, ID_STAGES)
        else:
            for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
                it = _consume_item(w, it, a_bufs, b_bufs, b2_bufs, a_ready, tma_ready, empty, turn, as_ptr,
                                   tok_ptr, bs_ptr, tiles_ptr, c_ptr, cs_ptr, n_tiles, n_col_tiles, K, pair_rows,
                                   stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm,
                                   PART, BM, BN, BK, STAGES, GROUP_M, GATHER, PAIR, FUSE_SILU, OUT_N, AHEAD,
                                   EPI_BLOCKED, ORDERED)

    @gluon.jit
    def _moe_fp8_gemm_hopper_kernel(
        a_ptr, a_desc, as_ptr, tok_ptr, b_desc, bs_ptr, tiles_ptr, c_ptr, cs_ptr, queue_ptr,
        N, K, pair_rows, n_tiles, b_rows,
        stride_am, stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm,
        BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
        GATHER: gl.constexpr, PAIR: gl.constexpr, FUSE_SILU: gl.constexpr, TMA_BYTES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, AHEAD: gl.constexpr = 1,
        EPI_BLOCKED: gl.constexpr = False, QUEUE: gl.constexpr = False, ID_STAGES: gl.constexpr = 2,
        ORDERED: gl.constexpr = False,
    ):
        """Persistent grouped fp8 GEMM: work items (plan row tile, output column tile: 128 columns, 256 for a
        down pair) strided over the programs. PAIR: two weight tiles a K step (``pair_rows`` apart in the
        stacked view); FUSE_SILU: gate_up's epilogue (the pair is gate and up)."""
        OUT_N: gl.constexpr = 2 * BN if PAIR and not FUSE_SILU else BN  # output columns of a work item
        n_col_tiles = N // OUT_N
        n_work = n_tiles * n_col_tiles
        a_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        # QUEUE: the producer's claimed item ids, handed to the consumers through a small ring of its own
        ids = gl.allocate_shared_memory(gl.int32, [ID_STAGES, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        id_ready = gl.allocate_shared_memory(gl.int64, [ID_STAGES, 1], mbarrier.MBarrierLayout())
        id_empty = gl.allocate_shared_memory(gl.int64, [ID_STAGES, 1], mbarrier.MBarrierLayout())
        a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BM, BK], a_smem)
        b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, BK], b_desc.layout)
        if PAIR:
            b2_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, BK], b_desc.layout)
        else:
            b2_bufs = b_bufs  # unused
        a_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        tma_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(a_ready.index(i), count=128)  # one cp.async arrive per producer thread
            mbarrier.init(tma_ready.index(i), count=1)  # the expect; the TMA transaction bytes do the rest
            mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warpgroup
        if ORDERED:  # the order of the consumers' MMA issues
            turn = turn_barrier()
        else:
            turn = id_ready  # unused: no allocation, so the default kernel's code stays as it was
        for i in gl.static_range(ID_STAGES):
            mbarrier.init(id_ready.index(i), count=1)  # the producer's publish
            mbarrier.init(id_empty.index(i), count=2)  # both consumers have read the id
        fence_async_shared()
        gl.thread_barrier()  # barriers initialised before any partition uses them
        gl.warp_specialize([
            (_consumer, (a_bufs, b_bufs, b2_bufs, a_ready, tma_ready, empty, turn, ids, id_ready, id_empty,
                         as_ptr, tok_ptr, bs_ptr, tiles_ptr, c_ptr, cs_ptr, n_tiles, n_col_tiles, n_work, K, pair_rows,
                         stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm,
                         0, BM, BN, BK, STAGES, GROUP_M, GATHER, PAIR, FUSE_SILU, OUT_N, AHEAD, EPI_BLOCKED, QUEUE,
                         ID_STAGES, ORDERED)),
            (_consumer, (a_bufs, b_bufs, b2_bufs, a_ready, tma_ready, empty, turn, ids, id_ready, id_empty,
                         as_ptr, tok_ptr, bs_ptr, tiles_ptr, c_ptr, cs_ptr, n_tiles, n_col_tiles, n_work, K, pair_rows,
                         stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm,
                         1, BM, BN, BK, STAGES, GROUP_M, GATHER, PAIR, FUSE_SILU, OUT_N, AHEAD, EPI_BLOCKED, QUEUE,
                         ID_STAGES, ORDERED)),
            (_producer, (a_ptr, a_desc, tok_ptr, b_desc, tiles_ptr, a_bufs, b_bufs, b2_bufs, a_ready, tma_ready,
                         empty, queue_ptr, ids, id_ready, id_empty, n_tiles, n_col_tiles, n_work, K, pair_rows, b_rows,
                         stride_am, BM, BN, BK, STAGES, GROUP_M, GATHER, PAIR, OUT_N, TMA_BYTES, QUEUE, ID_STAGES)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


def tma_bytes(gate_up: bool, pair: bool = True) -> int:
    """Bytes the TMA copies of one K step bring (the ready barrier's expected transaction count): the gate and
    up weight tiles (gate_up; its A rows come by cp.async), or the A rows and one or two (``pair``) weight
    tiles (down)."""
    return 2 * BN * BK if gate_up else (2 if pair else 1) * BN * BK + BM * BK


def blocked_down_epilogue(asked: bool, out_dtype: torch.dtype) -> bool:
    """Whether the down GEMM stores through shared memory: as asked for outputs of at most 2 bytes; an fp32
    output's layout change needs twice the scratch (32 KB a consumer) and the kernel would outgrow the 227 KB
    of shared memory (262 KB, compile_report), so fp32 outputs (tiny test models) store from the MMA layout."""
    return asked and out_dtype.itemsize <= 2


def down_pairs(hidden: int) -> bool:
    """The down GEMM takes 256 output columns a work item (two weight tiles, each with its scale block: A
    rows read half as often) where the hidden size allows, else 128."""
    return hidden % (2 * BN) == 0


def _desc(t: torch.Tensor, block: list[int]):
    """Gluon tensor descriptor over a 2-D e4m3 tensor, blocks ``block`` (128-byte swizzle)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)
    return TensorDescriptor.from_tensor(t, block, layout)


def unsupported_reason(x: torch.Tensor, experts) -> str | None:
    """Why this kernel cannot take the input (None = it can): Gluon, an sm_90 GPU, fp8 experts, whole
    128-blocks (hidden and I_pad multiples of 128)."""
    if not HAVE_GLUON:
        return "this Triton has no Gluon"
    if not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] != 9:
        return "not an sm_90 (Hopper) GPU"
    if not experts.is_fp8:
        return "the experts are not fp8"
    if experts.hidden % BK or experts.inter_pad % BK:
        return f"hidden ({experts.hidden}) and the padded intermediate size must be multiples of {BK}"
    return None


def _n_programs(device: torch.device, n_work: int, schedule: str) -> int:
    """Programs of a launch. "static": one per SM, program p taking items p, p + programs, ... "per_item": one per
    work item; the hardware hands the items out in order as SMs free up, so the programs that read one weight tile
    run in step even when items take different times (at 256 experts an expert's last, partly empty tile is every
    ~4th), but each item pays a program's setup and an unoverlapped ring fill. "queue": one per SM, each taking
    the next item from a counter when its producer is free: the per-item order with the persistent pipeline."""
    check(schedule in SCHEDULES, f"moe_gemm_hopper: schedule must be one of {SCHEDULES}, got {schedule!r}")
    return max(1, n_work if schedule == "per_item" else min(n_work, device_sm_count(device)))


def _queue_counter(device: torch.device, schedule: str, dummy: torch.Tensor) -> torch.Tensor:
    """The "queue" schedule's item counter (int32, zero at the launch); other schedules never read it."""
    return torch.zeros(1, dtype=torch.int32, device=device) if schedule == "queue" else dummy


def fp8_gate_up_hopper(xq: torch.Tensor, xs: torch.Tensor, plan, experts, group_m: int = 8, scales_ahead: int = 2,
                       blocked_epilogue: bool = True, schedule: str = "queue", ordered: bool = False):
    """As ``grouped_moe._fp8_gate_up``: gathered rows of xq [T, H] (scales xs [T, H/128]) through W13 ->
    silu(gate) * up as e4m3 [T*k, I_pad] + scales [T*k, I_pad/128] (rows >= n_rows unwritten).
    ``schedule``: how the programs take the work items (``_n_programs``); ``ordered``: the two consumers issue
    their MMAs in turn (the kernel's ORDERED), the same outputs bit for bit."""
    check(plan.block_m == BM, f"moe_gemm_hopper: the plan's tiles must be {BM} rows, got {plan.block_m}")
    n = plan.sorted_token.shape[0]
    h, i_pad = experts.hidden, experts.inter_pad
    nt = plan.tiles.shape[0]
    aq = torch.empty(n, i_pad, dtype=torch.float8_e4m3fn, device=xq.device)
    a_s = torch.empty(n, i_pad // BN, dtype=torch.float32, device=xq.device)
    w13, s13 = experts.w13, experts.s13
    b = _desc(w13.view(-1, w13.shape[2]), [BN, BK])
    _moe_fp8_gemm_hopper_kernel[(_n_programs(xq.device, nt * (i_pad // BN), schedule),)](
        xq, b, xs, plan.sorted_token, b, s13, plan.tiles, aq, a_s, _queue_counter(xq.device, schedule, plan.tiles),
        i_pad, h, i_pad, nt, w13.shape[1],
        xq.stride(0), xs.stride(0), s13.stride(0), s13.stride(1), aq.stride(0), a_s.stride(0),
        BM=BM, BN=BN, BK=BK, GROUP_M=group_m, STAGES=STAGES_GATE_UP, GATHER=True, PAIR=True, FUSE_SILU=True,
        TMA_BYTES=tma_bytes(True), CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, AHEAD=scales_ahead,
        EPI_BLOCKED=blocked_epilogue, QUEUE=schedule == "queue", ID_STAGES=ID_STAGES, ORDERED=ordered,
        num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )
    return aq, a_s


def fp8_down_hopper(aq: torch.Tensor, a_s: torch.Tensor, plan, experts, out_dtype: torch.dtype,
                    group_m: int = 8, pair: bool | None = None, scales_ahead: int = 2,
                    blocked_epilogue: bool = True, schedule: str = "queue", ordered: bool = False) -> torch.Tensor:
    """As ``grouped_moe._fp8_down``: [T*k, I_pad] e4m3 rows (sorted order) through W2 -> y [T*k, H].
    ``pair``: 256 output columns a work item (None: ``down_pairs(hidden)``; False: 128, the A/B baseline).
    ``scales_ahead``: K steps between a scale load and its use (1 or 2); ``blocked_epilogue``: the output
    through shared memory into 16-byte row pieces (else stored from the MMA layout); ``schedule``, ``ordered``:
    as ``fp8_gate_up_hopper``'s."""
    check(plan.block_m == BM, f"moe_gemm_hopper: the plan's tiles must be {BM} rows, got {plan.block_m}")
    n, h, i_pad = aq.shape[0], experts.hidden, experts.inter_pad
    nt = plan.tiles.shape[0]
    w2, s2 = experts.w2, experts.s2
    y = torch.empty(n, h, dtype=out_dtype, device=aq.device)
    pair = down_pairs(h) if pair is None else pair
    a = _desc(aq, [BM, BK])
    b = _desc(w2.view(-1, w2.shape[2]), [BN, BK])
    _moe_fp8_gemm_hopper_kernel[(_n_programs(aq.device, nt * (h // (2 * BN if pair else BN)), schedule),)](
        aq, a, a_s, plan.sorted_token, b, s2, plan.tiles, y, y, _queue_counter(aq.device, schedule, plan.tiles),
        h, i_pad, BN, nt, w2.shape[1],
        aq.stride(0), a_s.stride(0), s2.stride(0), s2.stride(1), y.stride(0), 0,
        BM=BM, BN=BN, BK=BK, GROUP_M=group_m, STAGES=STAGES_DOWN_PAIR if pair else STAGES_DOWN, GATHER=False,
        PAIR=pair, FUSE_SILU=False, TMA_BYTES=tma_bytes(False, pair), CONSUMER_REGS=CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, AHEAD=scales_ahead, EPI_BLOCKED=blocked_down_epilogue(blocked_epilogue, out_dtype),
        QUEUE=schedule == "queue", ID_STAGES=ID_STAGES, ORDERED=ordered, num_warps=NUM_WARPS,
        maxnreg=MAXNREG,
    )
    return y
