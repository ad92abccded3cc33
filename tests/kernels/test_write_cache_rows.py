"""write_cache_rows: a step's new rows of up to three caches (latent, indexer keys, key scales) at their slots."""

import pytest
import torch

from dsaserve import kernels as K

from ._util import triton  # noqa: F401  (skips without triton)


@pytest.mark.parametrize("n_pairs", [1, 3])
def test_rows_land_at_their_slots_and_padding_is_skipped(n_pairs):
    g = torch.Generator().manual_seed(n_pairs)
    slots_total, m = 50, 9
    caches = [torch.randn(slots_total, 37, generator=g).to(torch.bfloat16),
              torch.randn(slots_total, 16, generator=g).to(torch.float8_e4m3fn),
              torch.randn(slots_total, generator=g)][:n_pairs]
    values = [torch.randn(m, *c.shape[1:], generator=g).to(c.dtype) for c in caches]
    slots = torch.randperm(slots_total, generator=g)[:m]
    slots[2] = slots[6] = -1                                      # padding rows: never cached
    before = [c.clone() for c in caches]
    K.write_cache_rows(slots, list(zip(caches, values)), backend="triton")
    for c, b, v in zip(caches, before, values):
        want = b.view(torch.uint8).clone() if c.dtype == torch.float8_e4m3fn else b.clone()
        vv = v.view(torch.uint8) if c.dtype == torch.float8_e4m3fn else v
        keep = slots >= 0
        want[slots[keep]] = vv[keep]
        got = c.view(torch.uint8) if c.dtype == torch.float8_e4m3fn else c
        assert torch.equal(got, want)
    # the reference writes the same
    ref = [b.clone() for b in before]
    K.write_cache_rows(slots, list(zip(ref, values)), backend="reference")
    for c, r in zip(caches, ref):
        assert torch.equal(c.view(torch.uint8), r.view(torch.uint8))


def test_write_cache_rows_bad_inputs():
    with pytest.raises(K.KernelInputError, match="do not fit"):
        K.write_cache_rows(torch.zeros(2, dtype=torch.long), [(torch.zeros(4, 3), torch.zeros(2, 3).half())])
    with pytest.raises(K.KernelInputError, match="1 to 3"):
        K.write_cache_rows(torch.zeros(2, dtype=torch.long), [])
