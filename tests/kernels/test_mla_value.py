"""The value up-projection with o_proj's fp8 input in its epilogue (``kernels.mla_value``), under the CPU interpreter:
against the two-pass reference (torch's bmm, then act_quant) and against act_quant of the exact product."""

from __future__ import annotations

import pytest
import torch

from dsaserve.kernels import mla_value as MV
from dsaserve.kernels._common import interpret_mode
from dsaserve.kernels import reference as R

from ._util import triton  # noqa: F401  (skips without triton)


def _exact_inputs(t, h, lat, v, dtype, gen):
    """Multiples of 1/16 and 1/64 small enough that every product and every partial sum is exact in fp32, and the
    products' sums fit bf16 rounding in only one way: any summation order gives the same model-dtype values."""
    out_lat = (torch.randint(-8, 9, (t, h, lat), generator=gen).float() / 16).to(dtype)
    w = (torch.randint(-8, 9, (h, v + 64, lat), generator=gen).float() / 64).to(dtype)[:, 64:]   # a strided view,
    return out_lat, w                                                                          # as kv_b's rows are


def _exact_act_quant(out_lat, w):
    """act_quant of the exact per-head product rounded to the model dtype (fp64 sums: exact here)."""
    t, h, _ = out_lat.shape
    y = torch.einsum("thl,hvl->thv", out_lat.double(), w.double()).to(out_lat.dtype)
    return R.act_quant(y.reshape(t, h * w.shape[1]), 128)


@pytest.mark.checks("mla_value.value_proj_fp8", "mla_value.value_proj_reference")
@pytest.mark.parametrize("t,h,lat,v,dtype", [(5, 3, 128, 128, torch.bfloat16), (130, 2, 512, 128, torch.bfloat16),
                                             (67, 2, 192, 128, torch.bfloat16), (7, 2, 128, 128, torch.float32)])
def test_kernel_equals_the_two_pass_path_on_exact_inputs(t, h, lat, v, dtype):
    """Rows past a program's block (t not a multiple of it), several heads, fp32: the kernel's e4m3 bytes and scales equal the reference's and act_quant of the exact product."""
    gen = torch.Generator().manual_seed(t * h)
    out_lat, w = _exact_inputs(t, h, lat, v, dtype, gen)
    assert MV.value_proj_fp8_reason(out_lat, w) is None and interpret_mode()   # the kernel runs, not the reference
    q, s = MV.value_proj_fp8(out_lat, w)
    rq, rs = MV.value_proj_reference(out_lat, w)
    eq, es = _exact_act_quant(out_lat, w)
    assert q.shape == (t, h * v) and q.dtype == torch.float8_e4m3fn and s.shape == (t, h * v // 128)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(s, es)
    assert s.min() > 1e-4 / 448                                      # no all-zero group: every scale is checked


@pytest.mark.checks("mla_value.value_proj_fp8")
def test_kernel_writes_into_views_of_a_bigger_input_and_zero_rows():
    """``out`` views (rows of o_proj's whole input, as the attention's blocks write them) are filled, neighbours are
    untouched, and an all-zero row (a padding token) quantizes as act_quant does (zeros, the smallest scale)."""
    gen = torch.Generator().manual_seed(1)
    out_lat, w = _exact_inputs(9, 2, 128, 128, torch.bfloat16, gen)
    out_lat[4] = 0
    q_all = torch.full((20, 256), 1.0).to(torch.float8_e4m3fn)
    s_all = torch.full((20, 2), -1.0)
    q, s = MV.value_proj_fp8(out_lat, w, out=(q_all[5:14], s_all[5:14]))
    eq, es = _exact_act_quant(out_lat, w)
    assert torch.equal(q.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(s, es)
    assert torch.equal(q_all[5:14].view(torch.uint8), eq.view(torch.uint8)) and torch.equal(s_all[5:14], es)
    assert torch.all(q_all[:5].float() == 1) and torch.all(q_all[14:].float() == 1)
    assert torch.all(s_all[:5] == -1) and torch.all(s_all[14:] == -1)
    assert torch.all(q[4].float() == 0) and torch.equal(s[4], torch.full((2,), 1e-4) / 448)


@pytest.mark.checks("mla_value.value_proj_fp8")
def test_kernel_on_random_inputs_is_act_quant_of_the_product_within_one_rounding():
    """Random bf16 inputs: every dequantized value lies within one bf16 rounding of the product plus e4m3's half ulp
    (relative 2^-4, or 2^-9 scales below e4m3's normal range) of the exact product."""
    gen = torch.Generator().manual_seed(2)
    out_lat = torch.randn(70, 3, 256, generator=gen).to(torch.bfloat16)
    w = (torch.randn(3, 128, 256, generator=gen) * 0.05).to(torch.bfloat16)
    q, s = MV.value_proj_fp8(out_lat, w)
    exact = torch.einsum("thl,hvl->thv", out_lat.double(), w.double()).reshape(70, 384)
    scale = s.double().repeat_interleave(128, dim=1)
    err = (q.double() * scale - exact).abs()
    bound = exact.abs() * (2.0**-8 + 2.0**-4 * (1 + 2.0**-8)) + scale * 2.0**-9
    assert torch.all(err <= bound)
    assert (q.float() != 0).float().mean() > 0.9                     # most values are nonzero: the bound is tested


def test_shapes_the_kernel_does_not_take_go_to_the_reference():
    gen = torch.Generator().manual_seed(3)
    out_lat, w = _exact_inputs(6, 2, 128, 96, torch.bfloat16, gen)   # v = 96: groups straddle heads
    assert "the kernel takes 128" in MV.value_proj_fp8_reason(out_lat, w)
    wide_lat, wide_w = _exact_inputs(6, 2, 128, 256, torch.bfloat16, gen)   # GLM-5's v = 256: measured slower
    assert "0.67x" in MV.value_proj_fp8_reason(wide_lat, wide_w)
    q, s = MV.value_proj_fp8(out_lat, w)
    eq, es = _exact_act_quant(out_lat, w)
    assert s.shape == (6, 2) and torch.equal(q.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(s, es)
    with pytest.raises(ValueError, match="w_uv must be"):
        MV.value_proj_fp8(out_lat, w[:1])
