"""Key positions -> KV cache slots through a block table, in one launch (Triton).

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
