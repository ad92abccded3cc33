"""The one-launch MoE router selection (DeepSeek noaux_tc) and the positions -> cache slots mapping, against their
PyTorch references."""

import pytest
import torch

from dsaserve import kernels as K
from dsaserve.kernels import reference as R

from ._util import triton  # noqa: F401  (skips without triton)


@pytest.mark.parametrize("e,n_group,topk_group,top_k,norm", [
    (32, 8, 4, 8, True),      # the 8-layer bench model
    (256, 8, 4, 8, True),     # DeepSeek-V3.2
    (24, 8, 3, 5, False),     # groups of 3: padded lanes must never be chosen
    (16, 1, 1, 4, True),      # no groups
])
@pytest.mark.checks("router.moe_route_triton", "reference.moe_route")
def test_moe_route_matches_reference(e, n_group, topk_group, top_k, norm):
    g = torch.Generator().manual_seed(e * 31 + top_k)
    n = 9
    logits = torch.randn(n, e, generator=g) * 2
    bias = torch.randn(e, generator=g) * 0.5 - 1.0            # negative biases: padding (score 0) would win
    ids, w = K.moe_route(logits, bias, top_k, n_group, topk_group, norm, 2.5, backend="triton")
    rids, rw = R.moe_route(logits, bias, top_k, n_group, topk_group, norm, 2.5)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, rids)                               # same experts, same (descending) order
    torch.testing.assert_close(w, rw, rtol=2e-6, atol=0)
    if norm:
        torch.testing.assert_close(w.sum(-1), torch.full((n,), 2.5), rtol=1e-6, atol=0)


@pytest.mark.checks("router.moe_route_triton")
def test_moe_route_exact_tie_goes_to_the_lower_index():
    logits = torch.zeros(1, 8)
    logits[0, 5] = logits[0, 2] = 1.0                          # a tie for the one slot
    ids, w = K.moe_route(logits, torch.zeros(8), 1, 1, 1, False, 1.0, backend="triton")
    assert ids.tolist() == [[2]]
    torch.testing.assert_close(w, torch.sigmoid(torch.ones(1, 1)), rtol=1e-6, atol=0)


@pytest.mark.checks("reference.moe_route")
def test_moe_route_reference_group_limit():
    """Group limiting by the top-2 sum: the single best expert lives in a weak group and is not chosen."""
    logits = torch.tensor([[5.0, -9.0, 1.0, 1.0, 0.9, 0.9, -9.0, -9.0]])   # groups of 2
    ids, w = R.moe_route(logits, torch.zeros(8), 2, 4, 2, True, 1.0)
    assert sorted(ids[0].tolist()) == [2, 3]                   # groups {2,3} and {4,5} beat {0,1}'s 5 - 9
    torch.testing.assert_close(w, torch.full((1, 2), 0.5), rtol=1e-6, atol=0)


def test_moe_route_bad_inputs():
    with pytest.raises(K.KernelInputError, match="equal groups"):
        K.moe_route(torch.zeros(2, 10), torch.zeros(10), 2, 4, 2, True, 1.0)
    with pytest.raises(K.KernelInputError, match="fp32"):
        K.moe_route(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(8), 2, 1, 1, True, 1.0)


@pytest.mark.checks("paging.slots_of_positions_triton", "reference.slots_of_positions")
def test_slots_of_positions_matches_reference():
    g = torch.Generator().manual_seed(5)
    m, k, w, ps = 6, 37, 9, 4
    bt = torch.randint(0, 100, (m, w), generator=g, dtype=torch.int32)
    pos = torch.randint(-1, w * ps, (m, k), generator=g)
    pos[0] = -1                                                 # a row with no key
    got = K.slots_of_positions(pos, bt, ps, backend="triton")
    want = R.slots_of_positions(pos, bt, ps)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    # the reference against the formula
    p = pos[1, 3].item()
    assert want[1, 3].item() == (-1 if p < 0 else bt[1, p // ps].item() * ps + p % ps)
    assert torch.all(want[0] == -1)
