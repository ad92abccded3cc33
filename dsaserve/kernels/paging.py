"""Key positions -> KV cache slots through a block table, in one launch (Triton); a step's new cache rows
written at their slots, every cache of the layer in one launch (``write_cache_rows_triton``).

The indexer's top-k returns key *positions* per query row; the attention reads cache *slots*:
slot = block_table[row, pos // page_size] * page_size + pos % page_size, and -1 stays -1. In PyTorch that is
~8 kernels over [rows, top-k] int64 temporaries (``reference.slots_of_positions``), per indexer layer and step.
"""

from __future__ import annotations

import torch

from ._common import tl, triton

if triton is not None:

    @triton.jit
    def _slots_kernel(pos_ptr, bt_ptr, out_ptr, K, stride_p, stride_bt, stride_o, PAGE: tl.constexpr,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = j < K
        p = tl.load(pos_ptr + row * stride_p + j, mask=m, other=-1).to(tl.int64)
        valid = p >= 0
        pc = tl.where(valid, p, 0)
        page = tl.load(bt_ptr + row * stride_bt + pc // PAGE, mask=m & valid, other=0).to(tl.int64)
        slot = tl.where(valid, page * PAGE + pc % PAGE, -1)
        tl.store(out_ptr + row * stride_o + j, slot.to(tl.int32), mask=m)


    @triton.jit
    def _write_rows_kernel(slots_ptr, s0, d0, s1, d1, s2, d2, ss0, sd0, ss1, sd1, ss2, sd2, B0, B1, B2,
                           BLOCK: tl.constexpr):
        """Row i of up to three (source, destination) byte tables: dest[slot[i]] = src[i] (slot < 0: skipped)."""
        i = tl.program_id(0).to(tl.int64)
        which = tl.program_id(1)
        slot = tl.load(slots_ptr + i).to(tl.int64)
        if slot >= 0:
            cols = tl.arange(0, BLOCK)
            if which == 0:
                for c0 in range(0, B0, BLOCK):
                    m = c0 + cols < B0
                    tl.store(d0 + slot * sd0 + c0 + cols, tl.load(s0 + i * ss0 + c0 + cols, mask=m), mask=m)
            elif which == 1:
                for c0 in range(0, B1, BLOCK):
                    m = c0 + cols < B1
                    tl.store(d1 + slot * sd1 + c0 + cols, tl.load(s1 + i * ss1 + c0 + cols, mask=m), mask=m)
            else:
                for c0 in range(0, B2, BLOCK):
                    m = c0 + cols < B2
                    tl.store(d2 + slot * sd2 + c0 + cols, tl.load(s2 + i * ss2 + c0 + cols, mask=m), mask=m)


def _byte_rows(t: torch.Tensor) -> torch.Tensor:
    """[m, ...] with contiguous rows -> its [m, row bytes] uint8 view."""
    t2 = t.reshape(t.shape[0], -1)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2.view(torch.uint8)


def write_cache_rows_triton(slots: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Launcher; see ``dsaserve.kernels.write_cache_rows`` for the contract."""
    m = slots.shape[0]
    if m == 0 or not pairs:
        return
    srcs = [_byte_rows(v) for _, v in pairs]
    dsts = [_byte_rows(d) for d, _ in pairs]
    while len(srcs) < 3:  # unused tables: zero bytes per row (never touched)
        srcs.append(srcs[0][:, :0])
        dsts.append(dsts[0][:, :0])
    nbytes = [s.shape[1] for s in srcs]
    _write_rows_kernel[(m, len(pairs))](
        slots.contiguous(), srcs[0], dsts[0], srcs[1], dsts[1], srcs[2], dsts[2],
        srcs[0].stride(0), dsts[0].stride(0), srcs[1].stride(0), dsts[1].stride(0), srcs[2].stride(0),
        dsts[2].stride(0), nbytes[0], nbytes[1], nbytes[2], BLOCK=1024, num_warps=4)


def slots_of_positions_triton(pos: torch.Tensor, block_tables: torch.Tensor, page_size: int) -> torch.Tensor:
    """Launcher; see ``dsaserve.kernels.slots_of_positions`` for the contract."""
    m, k = pos.shape
    out = torch.empty(m, k, dtype=torch.int32, device=pos.device)
    if m and k:
        pos = pos if pos.stride(-1) == 1 else pos.contiguous()
        bt = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
        block = min(1024, triton.next_power_of_2(k))
        _slots_kernel[(m, triton.cdiv(k, block))](pos, bt, out, k, pos.stride(0), bt.stride(0), out.stride(0),
                                                   PAGE=page_size, BLOCK=block, num_warps=4)
    return out
