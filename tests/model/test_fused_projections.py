"""``fuse_projections``: projections that share an input run as one GEMM over one weight whose row blocks are
the members' parameters (views), so checkpoint loading into the members fills the fused weight."""

import pytest
import torch
import torch.nn as nn

from dsaserve.model.layers import DenseLinear, Fp8Linear, Fp8LinearFactory, GatedMLP, fuse_projections
from dsaserve.kernels.fp8_linear import quantize_weight_fp8


def _fill(members, gen):
    """Load random weights the way the loader does: in place, into each member's checkpoint-shaped tensors."""
    for m in members:
        if isinstance(m, Fp8Linear):
            w, s = m.checkpoint_views()
            q, scale = quantize_weight_fp8(torch.randn(w.shape, generator=gen) * 0.05)
            w.copy_(q)
            s.copy_(scale)
        else:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))


@pytest.mark.parametrize("kind", ["fp8", "dense"])
def test_fused_output_is_the_members_outputs(kind):
    gen = torch.Generator().manual_seed(0)
    k, widths = 300, [256, 128, 72]                       # last member odd-sized (like kv_a's 576 rows)
    if kind == "fp8":
        members = [Fp8LinearFactory()(k, w, torch.float32) for w in widths]
    else:
        members = [DenseLinear()(k, w, torch.float32) for w in widths]
    before = sum(p.numel() * p.element_size() for m in members for p in m.parameters())
    fused = fuse_projections(members)
    assert fused is not None and fused.widths == widths
    # accounting unchanged: the members' parameters are views, the fused weight is not registered twice
    assert sum(p.numel() * p.element_size() for m in members for p in m.parameters()) == before
    _fill(members, gen)                                   # after fusing, like the loader
    x = torch.randn(5, k, generator=gen)
    parts = fused.split(fused(x))
    for m, part in zip(members, parts):
        want = m(x)
        assert part.shape == want.shape
        torch.testing.assert_close(part, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    # a wrong row offset would show: each part differs from the other members' outputs
    assert not torch.allclose(parts[0][:, :128], members[1](x), atol=1e-3)


def test_fp8_members_must_cover_whole_scale_blocks():
    f = Fp8LinearFactory()
    assert fuse_projections([f(256, 72, torch.float32), f(256, 128, torch.float32)]) is None  # 72 first
    assert fuse_projections([f(256, 128, torch.float32), f(200, 128, torch.float32)]) is None  # K differs
    assert fuse_projections([f(256, 128, torch.float32), DenseLinear()(256, 64, torch.float32)]) is None
    assert fuse_projections([f(256, 128, torch.float32)]) is None


def test_gated_mlp_fused_equals_separate():
    gen = torch.Generator().manual_seed(1)
    mlp = GatedMLP(64, 96, DenseLinear(), torch.float32)
    assert mlp.gate_up is not None
    _fill([mlp.gate_proj, mlp.up_proj, mlp.down_proj], gen)
    x = torch.randn(7, 64, generator=gen)
    want = mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), want, rtol=1e-6, atol=1e-6)
