"""Top-k over ragged logits rows.

Two GPU paths with the same contract as ``reference.topk_indices`` (sets of indices; order within a row
is not part of the contract):

- ``torch``: torch.topk on rows that are -inf outside [ks, ke) (masked here unless the caller promises it),
  then a validity fix-up.
- ``radix``: a Triton radix select, one program per row, reading only the row's valid range [ks, ke):
  four passes of an 8-bit histogram (whole 4096-column chunks, then the row's remainder in 256-column
  chunks) over the order-preserving uint32 image of the fp32 logits find the
  k-th largest key T exactly (a pass is skipped once T's bucket is taken whole), then one compaction pass
  writes every column with key > T plus the first (k - #greater) columns with key == T in column order
  (deterministic ties). Rows with at most k valid columns take them all; the rest of the row is -1.

Default (docs/BENCHMARKS.md, H100, 8K x 64K causal, k = 2048): torch.topk when the logits are already
masked (6.9 ms; radix select 11.9 ms, ALU-bound in the histogram passes), radix select when they are not
(11.9 ms vs 15.0 ms for the mask pass + torch.topk). ``TOPK_BACKEND`` forces one path.
"""

from __future__ import annotations

import torch

from ._common import HAVE_TRITON, interpret_mode, tl, triton

TOPK_BACKEND: str | None = None  # None: pick by assume_masked (see above); "radix" / "torch" force
RADIX_BLOCK = 4096  # columns per chunk of a pass
RADIX_TAIL = 256  # columns per chunk of a row's remainder past its last whole chunk


if triton is not None:

    @triton.jit
    def _sortable_key(x):
        """fp32 -> uint32 whose unsigned order is the float order (-inf < ... < +inf)."""
        u = x.to(tl.uint32, bitcast=True)
        neg = (u >> 31) != 0
        return tl.where(neg, u ^ 0xFFFFFFFF, u | 0x80000000)

    @triton.jit
    def _digit_histogram(base, c, ke, hmask, prefix, shift: tl.constexpr, MASKED: tl.constexpr):
        """256-bin histogram of the digit at ``shift`` of columns c whose higher digits equal the prefix."""
        if MASKED:
            inb = c < ke
            key = _sortable_key(tl.load(base + c, mask=inb, other=0.0))
            match = inb & ((key & hmask) == prefix)
        else:  # a whole chunk inside the row's range
            key = _sortable_key(tl.load(base + c))
            match = (key & hmask) == prefix
        return tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)

    @triton.jit
    def _compact_chunk(base, out_row, c, ke, hmask, prefix, remaining, off, n_out, n_eq_seen):
        """The select's output pass over columns c: keys above the prefix, then ties in column order."""
        inb = c < ke
        kh = _sortable_key(tl.load(base + c, mask=inb, other=0.0)) & hmask
        eq = inb & (kh == prefix)
        eq_i = eq.to(tl.int32)
        eq_rank = n_eq_seen + tl.cumsum(eq_i, 0) - 1  # ties taken in column order
        sel = (inb & (kh > prefix)) | (eq & (eq_rank < remaining))
        sel_i = sel.to(tl.int32)
        pos = n_out + tl.cumsum(sel_i, 0) - 1
        tl.store(out_row + pos, c + off, mask=sel)
        return n_out + tl.sum(sel_i, 0), n_eq_seen + tl.sum(eq_i, 0)

    @triton.jit
    def _radix_topk_kernel(
        logits_ptr, ks_ptr, ke_ptr, off_ptr, out_ptr,
        N, K, stride_l, stride_o, off_scalar,
        HAS_OFF: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr, HAS_KS: tl.constexpr,
    ):
        row = tl.program_id(0)
        if HAS_KS:
            ks = tl.maximum(tl.load(ks_ptr + row).to(tl.int32), 0)
        else:  # every row starts at column 0 (decode: lengths only; no zeros tensor to fill per layer)
            ks = 0
        ke = tl.minimum(tl.load(ke_ptr + row).to(tl.int32), N)
        ke = tl.maximum(ke, ks)  # inverted range = empty
        base = logits_ptr + row.to(tl.int64) * stride_l
        cols = tl.arange(0, BLOCK)
        tcols = tl.arange(0, TAIL)
        bins = tl.arange(0, 256)

        # Select by the high bits of the key: columns whose (key & hmask) > prefix are taken, and the first
        # `remaining` columns with (key & hmask) == prefix. Start: hmask = 0 (all columns tie), remaining = K,
        # which already is the answer when the row has <= K valid columns.
        prefix = tl.full((), 0, tl.uint32)
        hmask = tl.full((), 0, tl.uint32)
        remaining = K
        done = (ke - ks) <= K
        for p in tl.static_range(4):
            hi = tl.where(done, ks, ke)  # a finished select scans nothing
            full_end = ks + (hi - ks) // BLOCK * BLOCK
            hist = tl.zeros((256,), tl.int32)
            for c0 in range(ks, full_end, BLOCK):  # whole chunks
                hist += _digit_histogram(base, c0 + cols, ke, hmask, prefix, 24 - 8 * p, False)
            # the rest in short chunks: a row of 4096 + 34 columns costs 4096 + 256 lanes, not 2 x 4096
            for c0 in range(full_end, hi, TAIL):
                hist += _digit_histogram(base, c0 + tcols, ke, hmask, prefix, 24 - 8 * p, True)
            ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # [256] matching columns with digit >= bin
            b = tl.maximum(tl.max(tl.where(ge >= remaining, bins, -1), 0), 0)  # bucket of the k-th largest
            n_gt = tl.sum(tl.where(bins == b, ge - hist, 0), 0)
            n_eq = tl.sum(tl.where(bins == b, hist, 0), 0)
            new_remaining = remaining - n_gt
            prefix = tl.where(done, prefix, prefix | (b.to(tl.uint32) << (24 - 8 * p)))
            hmask = tl.where(done, hmask, hmask | (tl.full((), 255, tl.uint32) << (24 - 8 * p)))
            remaining = tl.where(done, remaining, new_remaining)
            done = done | (new_remaining == n_eq)  # T's bucket is taken whole: lower digits don't matter

        if HAS_OFF:
            off = tl.load(off_ptr + row).to(tl.int32)
        else:
            off = off_scalar
        out_row = out_ptr + row.to(tl.int64) * stride_o
        n_out = 0
        n_eq_seen = 0
        full_end = ks + (ke - ks) // BLOCK * BLOCK
        for c0 in range(ks, full_end, BLOCK):
            n_out, n_eq_seen = _compact_chunk(base, out_row, c0 + cols, ke, hmask, prefix, remaining, off, n_out,
                                              n_eq_seen)
        for c0 in range(full_end, ke, TAIL):
            n_out, n_eq_seen = _compact_chunk(base, out_row, c0 + tcols, ke, hmask, prefix, remaining, off, n_out,
                                              n_eq_seen)
        for j0 in range(n_out, K, BLOCK):  # pad with -1
            j = j0 + cols
            tl.store(out_row + j, tl.full((BLOCK,), -1, tl.int32), mask=j < K)


def topk_indices_radix(logits, ks, ke, k, offset=0, *, block: int = RADIX_BLOCK, tail: int = RADIX_TAIL,
                       num_warps: int = 8) -> torch.Tensor:
    """Triton radix-select path (reads only [ks, ke) of each row, so no masking is needed; ``ks`` None = 0).
    ``block`` / ``tail`` / ``num_warps``: the kernel's chunk sizes and warps (benchmark sweeps)."""
    s, n = logits.shape
    out = torch.empty(s, k, dtype=torch.int32, device=logits.device)
    if s == 0:
        return out
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    has_off = isinstance(offset, torch.Tensor)
    ke = ke.contiguous()
    ks_t = ks.contiguous() if ks is not None else ke
    off_t = offset.to(device=logits.device).contiguous() if has_off else ke
    _radix_topk_kernel[(s,)](
        logits, ks_t, ke, off_t, out,
        n, k, logits.stride(0), out.stride(0), 0 if has_off else int(offset),
        HAS_OFF=has_off, HAS_KS=ks is not None, BLOCK=block if not interpret_mode() else 64,
        TAIL=tail if not interpret_mode() else 16, num_warps=num_warps,
    )
    return out


def topk_indices_gpu(logits, ks, ke, k, offset=0, assume_masked: bool = False, backend: str | None = None):
    """GPU top-k; ``backend`` 'radix' / 'torch' (default ``TOPK_BACKEND``, else by ``assume_masked``); ``ks``
    None: every row starts at column 0."""
    backend = backend or TOPK_BACKEND or ("torch" if assume_masked else "radix")
    if backend == "radix" and HAVE_TRITON:
        return topk_indices_radix(logits, ks, ke, k, offset)
    return topk_indices_torch(logits, torch.zeros_like(ke) if ks is None else ks, ke, k, offset, assume_masked)


def topk_indices_torch(logits, ks, ke, k, offset=0, assume_masked: bool = False) -> torch.Tensor:
    """torch.topk path; same contract as ``reference.topk_indices``.

    With ``assume_masked`` the caller promises logits are -inf outside each row's range (mqa_logits
    output), which skips one full pass over the [S, N] matrix.
    """
    s, n = logits.shape
    kk = min(k, n)
    if assume_masked:
        src = logits
    else:
        cols = torch.arange(n, device=logits.device)
        valid = (cols[None, :] >= ks[:, None]) & (cols[None, :] < ke[:, None])
        src = logits.masked_fill(~valid, float("-inf"))
    idx = torch.topk(src, kk, dim=1, sorted=False).indices  # [S, kk] int64
    # a picked column is valid iff it lies in the row's range (-inf ties may pick invalid columns)
    ok = (idx >= ks[:, None].long()) & (idx < ke[:, None].long())
    if isinstance(offset, torch.Tensor):
        idx = idx + offset.to(idx.device).long().reshape(-1, 1)
    elif offset:
        idx = idx + int(offset)
    out = torch.where(ok, idx, torch.full_like(idx, -1)).to(torch.int32)
    if kk < k:
        out = torch.cat([out, torch.full((s, k - kk), -1, dtype=torch.int32, device=out.device)], dim=1)
    return out
