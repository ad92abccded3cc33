"""The absorbed query (W_UK product + RoPE of the rope part) in one kernel (``kernels.mla_query``), under the CPU
interpreter: against the two-pass reference (torch's bmm, then the RoPE kernel) and against the exact product."""

from __future__ import annotations

import pytest
import torch

from dsaserve.kernels import mla_query as MQ
from dsaserve.kernels import reference as R
from dsaserve.kernels._common import interpret_mode

from ._util import triton  # noqa: F401  (skips without triton)


def _inputs(t, h, dtype, gen, exact=True):
    """q rows [t, H, 128 + 64] and W_UK as kv_b's key rows ([H, 128, 512] view of [H, 128 + 128, 512]); exact inputs
    (multiples of 1/16 and 1/64) make every sum exact in any order."""
    if exact:
        q = (torch.randint(-8, 9, (t, h, 192), generator=gen).float() / 16).to(dtype)
        w = (torch.randint(-8, 9, (h, 256, 512), generator=gen).float() / 64).to(dtype)[:, :128]
    else:
        q = torch.randn(t, h, 192, generator=gen).to(dtype)
        w = (torch.randn(h, 256, 512, generator=gen) * 0.05).to(dtype)[:, :128]
    ang = torch.randn(t, 32, generator=gen) * 3
    return q, w, ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.checks("mla_query.query_proj_rope", "mla_query.query_proj_rope_reference")
@pytest.mark.parametrize("t,h,dtype", [(5, 3, torch.bfloat16), (130, 2, torch.bfloat16), (67, 2, torch.float32)])
def test_kernel_equals_the_two_pass_path_and_the_exact_product(t, h, dtype):
    """Rows past a program's block, several heads, bf16 and fp32: the latent part equals the reference and the exact
    product rounded to the dtype, the rope part equals the reference's RoPE and the RoPE of the rope columns, and
    the output's padding columns past each row are untouched."""
    gen = torch.Generator().manual_seed(t * h)
    q, w, cos, sin = _inputs(t, h, dtype, gen)
    assert MQ.query_proj_rope_reason(q, w, cos) is None and interpret_mode()     # the kernel runs
    buf = torch.full((t, h, 600), 7.0, dtype=dtype)
    out = MQ.query_proj_rope(q, w, cos, sin, out=buf[..., :576])
    ref = MQ.query_proj_rope_reference(q, w, cos, sin, torch.empty(t, h, 576, dtype=dtype))
    assert torch.equal(out, ref)
    assert torch.equal(out[..., :512], torch.einsum("thn,hnl->thl", q[..., :128].double(), w.double()).to(dtype))
    assert torch.equal(out[..., 512:], R.rope(q[..., 128:], cos, sin, True))
    assert torch.all(buf[..., 576:] == 7)


@pytest.mark.checks("mla_query.query_proj_rope")
def test_kernel_on_random_inputs_is_within_one_rounding():
    """Random bf16 inputs: the latent part within one bf16 rounding of the exact product (the sums in another order),
    the rope part bit for bit."""
    gen = torch.Generator().manual_seed(9)
    q, w, cos, sin = _inputs(70, 2, torch.bfloat16, gen, exact=False)
    out = MQ.query_proj_rope(q, w, cos, sin, out=torch.empty(70, 2, 576, dtype=torch.bfloat16))
    exact = torch.einsum("thn,hnl->thl", q[..., :128].double(), w.double())
    assert torch.all((out[..., :512].double() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-30)
    assert torch.equal(out[..., 512:], R.rope(q[..., 128:], cos, sin, True))


def test_inputs_the_kernel_does_not_take():
    gen = torch.Generator().manual_seed(4)
    q, w, cos, sin = _inputs(6, 2, torch.bfloat16, gen)
    assert "multiple of 128" in MQ.query_proj_rope_reason(q, w[..., :448], cos)
    out = MQ.query_proj_rope(q, w[..., :448], cos, sin, out=torch.empty(6, 2, 512, dtype=torch.bfloat16))
    assert torch.equal(out, MQ.query_proj_rope_reference(q, w[..., :448], cos, sin,
                                                         torch.empty(6, 2, 512, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="do not fit"):
        MQ.query_proj_rope(q, w, cos, sin, out=torch.empty(6, 2, 575, dtype=torch.bfloat16))
