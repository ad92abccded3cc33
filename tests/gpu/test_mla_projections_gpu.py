"""The absorbed MLA projections in one kernel each on the GPU, at the engine's shapes (an attention block of
DeepSeek-V3.2: 128 heads, v = 128; GLM-5: 64 heads, v = 256): the value's W_UV product with o_proj's act_quant
(``kernels.mla_value``), the query's W_UK product with its RoPE (``kernels.mla_query``), and the engine's fp8
forward with --mla-fused-projections on vs off."""

from __future__ import annotations

import pytest
import torch


def _mv():
    from dsaserve.kernels import mla_value as MV  # imported in the test: see test_kernels_gpu._kernels

    return MV


@pytest.mark.parametrize("t,h,v", [(3640, 128, 128), (1001, 64, 128), (1, 128, 128)])
def test_exact_inputs_equal_the_two_pass_path(gen, t, h, v):
    """Inputs whose products and sums are exact in any order: the e4m3 bytes and scales equal torch's bmm + act_quant
    bit for bit (wrong columns, heads, groups, rows or rounding show)."""
    MV = _mv()
    out_lat = (torch.randint(-8, 9, (t, h, 512), device="cuda", generator=gen).float() / 16).bfloat16()
    w = (torch.randint(-8, 9, (h, v + 64, 512), device="cuda", generator=gen).float() / 64).bfloat16()[:, 64:]
    q, s = MV.value_proj_fp8(out_lat, w)
    rq, rs = MV.value_proj_reference(out_lat, w)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


@pytest.mark.parametrize("t,h,v", [(3640, 128, 128), (1001, 64, 128)])
def test_random_inputs_within_one_rounding_of_the_two_pass_path(gen, t, h, v):
    """Random inputs: the model-dtype values the kernel quantizes may differ from cuBLAS's by one bf16 rounding (the
    sums run in another order), so each dequantized value lies within that and e4m3's half ulp of the exact product;
    and nearly all bytes are equal to the two-pass path's."""
    MV = _mv()
    out_lat = torch.randn(t, h, 512, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(h, v, 512, device="cuda", generator=gen) * 0.05).bfloat16()
    q, s = MV.value_proj_fp8(out_lat, w)
    rq, _ = MV.value_proj_reference(out_lat, w)
    exact = torch.einsum("thl,hvl->thv", out_lat.double(), w.double()).reshape(t, h * v)
    scale = s.double().repeat_interleave(128, dim=1)
    err = (q.double() * scale - exact).abs()
    assert torch.all(err <= exact.abs() * (2.0**-8 + 2.0**-4 * (1 + 2.0**-8)) + scale * 2.0**-9)
    assert (q.view(torch.uint8) == rq.view(torch.uint8)).float().mean() > 0.99


@pytest.mark.parametrize("t,h", [(3640, 128), (7281, 64), (1, 128)])
def test_query_kernel_exact_inputs_equal_the_two_pass_path(gen, t, h):
    """Inputs whose sums are exact in any order: q_nope @ W_UK and the RoPE columns equal torch's bmm + the RoPE kernel
    bit for bit (as MLA lays them out: q rows of 192, W_UK the key rows of kv_b)."""
    from dsaserve.kernels import mla_query as MQ

    q = (torch.randint(-8, 9, (t, h, 192), device="cuda", generator=gen).float() / 16).bfloat16()
    w = (torch.randint(-8, 9, (h, 256, 512), device="cuda", generator=gen).float() / 64).bfloat16()[:, :128]
    ang = torch.randn(t, 32, device="cuda", generator=gen) * 3
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    out = MQ.query_proj_rope(q, w, cos, sin, torch.empty(t, h, 576, device="cuda", dtype=torch.bfloat16))
    ref = MQ.query_proj_rope_reference(q, w, cos, sin, torch.empty_like(out))
    assert torch.equal(out, ref)


def test_query_kernel_random_inputs_within_one_rounding(gen):
    """Random inputs: the latent part within one bf16 rounding of the exact product, nearly always equal to cuBLAS's;
    the RoPE columns bit for bit."""
    from dsaserve.kernels import mla_query as MQ

    t, h = 3640, 128
    q = torch.randn(t, h, 192, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(h, 256, 512, device="cuda", generator=gen) * 0.05).bfloat16()[:, :128]
    ang = torch.randn(t, 32, device="cuda", generator=gen) * 3
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    out = MQ.query_proj_rope(q, w, cos, sin, torch.empty(t, h, 576, device="cuda", dtype=torch.bfloat16))
    ref = MQ.query_proj_rope_reference(q, w, cos, sin, torch.empty_like(out))
    exact = torch.einsum("thn,hnl->thl", q[..., :128].double(), w.double())
    # one bf16 rounding of the fp32 sum, whose tensor-core accumulation over K = 128 adds up to ~2^-22 relative of
    # the sum of |products| (cancellation makes that larger than the result: bounded by the products, not the sum)
    mags = torch.einsum("thn,hnl->thl", q[..., :128].double().abs(), w.double().abs())
    assert torch.all((out[..., :512].double() - exact).abs() <= exact.abs() * 2.0**-8 + mags * 2.0**-20)
    assert (out[..., :512] == ref[..., :512]).float().mean() > 0.99
    assert torch.equal(out[..., 512:], ref[..., 512:])


def test_engine_fp8_forward_with_the_fused_projections(monkeypatch):
    """A tiny fp8 DeepSeek checkpoint (V3.2's MLA and indexer widths, 4 heads) prefilled through the engine's kernel
    path with --mla-fused-projections on vs off, the attention in blocks of 64 tokens so the query kernel runs too
    (one process: the patched block size reaches it): the same greedy tokens, and first-step logprobs within the
    bf16 noise of the other order of sums."""
    import tempfile

    from dsaserve import LLM, SamplingParams
    from dsaserve.checkpoint.tiny import make_tiny_checkpoint
    from dsaserve.model import attention as attention_mod

    monkeypatch.setattr(attention_mod, "_ATTN_BLOCK_ELEMS", 64 * 4 * 576)
    with tempfile.TemporaryDirectory() as d:
        ckpt = make_tiny_checkpoint(d, arch="deepseek_v32", seed=0, num_shards=1, fp8=True, num_attention_heads=4,
                                    v_head_dim=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                    index_head_dim=128)
        outs = {}
        for knob in ("off", "on"):
            llm = LLM(ckpt, device="cuda", dtype="bfloat16", quantization="fp8", mla_fused_projections=knob,
                      enforce_eager=True)
            try:
                outs[knob] = llm.generate([list(range(3, 300))], SamplingParams(max_tokens=8, temperature=0.0,
                                                                                logprobs=1))[0]
            finally:
                llm.shutdown()
    assert outs["on"].token_ids == outs["off"].token_ids
    a, b = outs["on"].logprobs[0], outs["off"].logprobs[0]
    tok = outs["off"].token_ids[0]
    assert abs(a[tok] - b[tok]) < 0.05
