"""Split-K GEMMs reduced inside the kernel: each output tile's partial sums land in an fp32 workspace and the
last of the tile's programs to finish adds them in split order (the same additions as a separate reduction
launch, so the same bits) -- per-device arrival counters, the tile store, the fallback reduction kernel, and
the bf16 rounding the CPU interpreter needs. Used by the fp8 GEMM / GEMV (``fp8_linear``) and the fp32
projections (``f32_linear``).
"""

from __future__ import annotations

import threading

import torch

from ._common import interpret_mode, tl, triton

if triton is not None:

    @triton.jit
    def _round_to_bf16_grid(v):
        """Round fp32 v to the nearest-even bf16 value, staying in fp32 (finite v).

        Used only under TRITON_INTERPRET=1, whose fp32->bf16 cast truncates; the GPU's cast rounds to
        nearest-even like torch, so the interpreter tests can compare bf16 outputs exactly.
        """
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _store_tile(acc, rm, rn, pid, pid_k, M, N, stride_cm, c_ptr, o_ptr, cnt_ptr, BM: tl.constexpr,
                    BN: tl.constexpr, SPLIT_K: tl.constexpr, ROUND_BF16: tl.constexpr, REDUCE_IN_KERNEL: tl.constexpr,
                    ROUND_BF16_OUT: tl.constexpr):
        """Store a program's [BM, BN] fp32 result: the output tile (SPLIT_K = 1) or split pid_k's partial at
        c[pid_k]; REDUCE_IN_KERNEL: then the last of the tile's SPLIT_K programs to finish sums the tile's
        partials in split order (the same fp32 additions as _splitk_reduce_kernel: bit-identical) into o and
        resets the tile's counter (cnt_ptr[pid]) for the next launch: no second launch. The barrier orders every
        thread's partial store before the counter's release; the partials are read back past L1 (.cg)."""
        if ROUND_BF16:
            acc = _round_to_bf16_grid(acc)
        c_ptrs = c_ptr + pid_k.to(tl.int64) * M * N + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
        out_mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
        if REDUCE_IN_KERNEL:
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                tile = rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
                total = tl.zeros((BM, BN), dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(c_ptr + s * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
                if ROUND_BF16_OUT:
                    total = _round_to_bf16_grid(total)
                tl.store(o_ptr + tile, total.to(o_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(cnt_ptr + pid, 0)

    @triton.jit
    def _splitk_reduce_kernel(p_ptr, c_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                              ROUND_BF16: tl.constexpr):
        """c[i] = sum_s p[s, i] (fp32 partials [SPLIT_K, M*N], splits in order) in c's dtype."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
        if ROUND_BF16:
            acc = _round_to_bf16_grid(acc)
        tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# Arrival counters of the in-kernel split-K reduction: one int32 per output tile, zero between launches (a
# tile's last program resets its own). Kernels on one stream never overlap, and the engine runs its GEMMs on
# one stream per device (graph replays included), so one buffer per device serves every GEMM; under the CPU
# interpreter the tests' in-process ranks are threads, hence one buffer per thread there. Made on the first
# eager use, never inside a CUDA-graph capture (a captured GEMM without one reduces with a second launch).
SPLIT_COUNTER_TILES = 1 << 16
_SPLIT_COUNTERS: dict = {}


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The arrival counters for a launch of ``tiles`` output tiles on ``device``, or None (too many tiles, or
    none made yet while a CUDA graph is being captured): the caller then reduces with a second launch."""
    if tiles > SPLIT_COUNTER_TILES:
        return None
    key = (device.type, device.index) if device.type == "cuda" else (device.type, threading.get_ident())
    buf = _SPLIT_COUNTERS.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _SPLIT_COUNTERS[key] = torch.zeros(SPLIT_COUNTER_TILES, dtype=torch.int32, device=device)
    return buf


def round_bf16_in_interpreter(dtype: torch.dtype) -> bool:
    """Whether a Triton store of ``dtype`` needs ``_round_to_bf16_grid`` first (bf16 under the interpreter)."""
    return dtype == torch.bfloat16 and interpret_mode()
