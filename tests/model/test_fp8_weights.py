"""fp8 weights end to end on CPU: the fp8-GEMM path (``--quantization fp8`` / an fp8 checkpoint's default)
against the dequantized path (``--quantization none``: the same e4m3 weights dequantized at load).

The two paths hold bit-identical weight values; they differ only in the activation quantization of every
quantized projection (per token per 128 channels, e4m3) and in fp32 accumulation order. CPU runs the
kernels' reference (dequantize-then-matmul), the contract the CUDA paths are tested against.

Error bound of the first sampled token's log-probabilities (derived here, checked per prompt):
  * one e4m3 rounding of an activation x has relative error |d| <= 2^-4 (3 mantissa bits: half an ulp),
    rms r = 2^-4 / sqrt(3) (uniform within the half ulp, independent across elements; the conservative end
    of the binade);
  * a sublayer l with output s_l (attention: o_proj output; MLP / MoE: its output) contains m_l distinct
    activation quantizations in series: attention 3 (its input x, shared by q_a / kv_a / the indexer's wk;
    the normed q_a output qr, shared by q_b / wq_b; the attention output before o_proj), dense MLP 2 (x;
    silu(gate) * up), MoE 3 (x, shared by routed and shared experts; the routed and the shared experts'
    down inputs). Each perturbs s_l by about r * |s_l| (linear maps, nonlinearities of gain ~1), so the
    residual stream entering the final norm, h = embedding + sum_l s_l, is off by
        |dh| <= kappa * r * sqrt(sum_l m_l |s_l|^2)                         (statistical, first order)
    with kappa = 3 (the norm of a sum of many independent roundings concentrates at its rms; the rest is
    margin for the first-order propagation through later layers and for MoE routing decisions that an
    fp8-sized perturbation flips at near-ties, which the tiny model has);
  * z = W_head * RMSNorm(h): |d RMSNorm(h)| <= max|g| * |dh| / rms(h) (the norm's radial part only shrinks
    it), |dz_j| <= |W_head[j]| * |d RMSNorm(h)|, and a log-probability moves by at most |dz_t| + max_j |dz_j|:
        |d logprob| <= B = 2 * max_j |W_head[j]| * max|g| / rms(h) * kappa * r * sqrt(sum_l m_l |s_l|^2)
    with every quantity taken from the dequantized (reference) run at the sampled position.
Checked on prompts of at most index_topk tokens (the indexer then selects every key; beyond it an fp8
perturbation can swap keys at top-k ties, a discrete change no first-order bound covers); longer prompts
are part of the greedy agreement check.

Greedy agreement (the issue's bar: >= 90% over 8 prompts x 16 tokens) is measured teacher-forced: at each
of the 16 positions of the dequantized path's greedy continuation both paths see the same context and
their next-token choices are compared. Free-running continuations are not a usable measure on the tiny
random model: its top-2 logits are often closer than any perturbation, so one flip changes the rest of
the continuation; free-running, fp8 vs dequantized agrees on 55-92% of the tokens depending on the prompt
set, and bf16 vs fp32 of the SAME weights (no fp8 at all) on 59-98% (measured on 4 prompt sets).
"""

from __future__ import annotations

import math

import pytest
import torch

from dsaserve import SamplingParams
from dsaserve.kernels.block_fp8 import dequantize_block_fp8
from dsaserve.kernels.fp8_linear import fp8_linear_error_bound, fp8_linear_reference, quantize_weight_fp8
from dsaserve.model.layers import Fp8Linear
from dsaserve.model.moe import MoE
from tests.model._shared import prompt_ids

pytestmark = pytest.mark.timeout(600)

R_RMS = 2.0**-4 / math.sqrt(3)
KAPPA = 3.0
SUBLAYER_QUANTIZATIONS = {"attention": 3, "dense": 2, "moe": 3}
# 8 prompts: below, at and above the tiny config's index_topk = 32
AGREE_LENS = (5, 17, 31, 33, 64, 90, 150, 300)
BOUND_LENS = (3, 7, 12, 17, 22, 26, 29, 31)


def test_fp8_linear_layer_is_the_reference_contract():
    """An Fp8Linear with odd shapes (padding, partial blocks) == fp8_linear_reference on the checkpoint's
    tensors, and within the worst-case fp8 error bound of the product with the dequantized weight."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=g) * 0.05
    q, s = quantize_weight_fp8(w)
    layer = Fp8Linear(300, 200, torch.float32)
    dest_w, dest_s = layer.checkpoint_views()
    dest_w.copy_(q)
    dest_s.copy_(s)
    assert layer.weight.shape == (208, 304) and layer.weight_scale_inv.shape == (2, 4)  # padded layout
    x = torch.randn(7, 300, generator=g)
    y = layer(x)
    assert torch.equal(y, fp8_linear_reference(x, q, s, torch.float32))
    exact = x @ dequantize_block_fp8(q, s).t()
    assert (y - exact).abs().max() > 0                                         # activations really quantized
    assert ((y - exact).abs() <= fp8_linear_error_bound(x, q, s, torch.float32)).all()


def test_quantize_at_load_and_fp8_checkpoint_hold_the_same_kind_of_weights(world):
    """--quantization fp8 of the bf16 checkpoint holds quantize_weight_fp8 of each bf16 weight; the fp8
    checkpoint's e4m3 values and scales are held as stored."""
    from safetensors import safe_open

    from dsaserve.checkpoint.loader import CheckpointFiles

    bf16 = world.llm(world.ckpt("deepseek_v32"), quantization="fp8").engine.executor.runner.model
    fp8 = world.llm(world.ckpt("deepseek_v32", fp8=True)).engine.executor.runner.model
    ref_bf16 = world.llm(world.ckpt("deepseek_v32")).engine.executor.runner.model
    name = "layers.1.self_attn.q_b_proj"
    q, s = bf16.get_submodule(name).checkpoint_views()
    want_q, want_s = quantize_weight_fp8(ref_bf16.get_submodule(name).weight.to(torch.bfloat16).float())
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    files = CheckpointFiles(world.ckpt("deepseek_v32", fp8=True))
    hf = "model." + name + ".weight"
    with safe_open(files.path(files.file_of(hf)), "pt") as f:
        stored_q, stored_s = f.get_tensor(hf), f.get_tensor(hf + "_scale_inv")
    q, s = fp8.get_submodule(name).checkpoint_views()
    assert torch.equal(q.view(torch.uint8), stored_q.view(torch.uint8)) and torch.equal(s, stored_s)
    experts = fp8.layers["1"].mlp.experts
    hf = "model.layers.1.mlp.experts.5.down_proj.weight"
    with safe_open(files.path(files.file_of(hf)), "pt") as f:
        stored_q, stored_s = f.get_tensor(hf), f.get_tensor(hf + "_scale_inv")
    q, s = experts.expert_views(5)["down_proj"]
    assert torch.equal(q.contiguous().view(torch.uint8), stored_q.view(torch.uint8)) and torch.equal(s, stored_s)


def _capture(model):
    """Forward hooks recording, per call, the last row of every sublayer output and of the final norm's input."""
    rec: dict = {"sub": [], "h": None}
    hooks = []
    for layer in model.layers.values():
        kind = "moe" if isinstance(layer.mlp, MoE) else "dense"
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, a, o: rec["sub"].append(("attention", o[-1].float()))))
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, a, o, kind=kind: rec["sub"].append((kind, o[-1].float()))))
    hooks.append(model.norm.register_forward_pre_hook(
        lambda m, a: rec.__setitem__("h", (a[0][-1] + a[1][-1]).float())))
    return rec, hooks


def _first_step(llm, prompt):
    model = llm.engine.executor.runner.model
    rec, hooks = _capture(model)
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True, logprobs=5), use_tqdm=False)[0]
    finally:
        for h in hooks:
            h.remove()
    return out, rec


def test_fp8_gemm_path_vs_dequantized_path(world, record_property):
    ckpt = world.ckpt("deepseek_v32", fp8=True)
    fp8 = world.llm(ckpt, quantization="fp8")
    deq = world.llm(ckpt, quantization="none")
    assert fp8.engine.executor.runner.backends.linear.name == "fp8"
    assert deq.engine.executor.runner.backends.linear.name == "dense"
    head = deq.engine.executor.runner.model.lm_head.weight.float()
    g_max = float(deq.engine.executor.runner.model.norm.weight.float().abs().max())
    head_norm = float(head.norm(dim=1).max())
    worst = 0.0
    for n in BOUND_LENS:
        prompt = prompt_ids(n, seed=4)
        got, rec_fp8 = _first_step(fp8, prompt)
        want, rec = _first_step(deq, prompt)
        assert len(rec["sub"]) == 2 * 4                                          # 4 layers, 2 sublayers each
        spread = math.sqrt(sum(SUBLAYER_QUANTIZATIONS[k] * float(s.pow(2).sum()) for k, s in rec["sub"]))
        dh_bound = KAPPA * R_RMS * spread
        dh = float((rec_fp8["h"] - rec["h"]).norm())
        assert 0 < dh <= dh_bound, f"{n} tokens: |dh| {dh:.4g} > bound {dh_bound:.4g}"
        rms_h = float(rec["h"].pow(2).mean().sqrt())
        bound = 2 * head_norm * g_max / rms_h * dh_bound
        common = set(got.logprobs[0]) & set(want.logprobs[0])
        assert len(common) >= 3, f"{n} tokens: top-5 sets {sorted(got.logprobs[0])} vs {sorted(want.logprobs[0])}"
        diff = max(abs(got.logprobs[0][t] - want.logprobs[0][t]) for t in common)
        assert diff <= bound, f"{n} tokens: first-step logprob diff {diff:.4g} > bound {bound:.4g}"
        worst = max(worst, diff / bound)
        print(f"{n:4d} tokens: |dh| {dh:.4f} (bound {dh_bound:.4f}), first-step logprob diff {diff:.4f} "
              f"(bound {bound:.3f})")
    record_property("worst_diff_over_bound", worst)
    # greedy agreement, teacher-forced on the dequantized path's 16-token continuations
    prompts = [prompt_ids(n, seed=4) for n in AGREE_LENS]
    cont = [o.token_ids for o in deq.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)]
    contexts = [p + c[:i] for p, c in zip(prompts, cont) for i in range(16)]
    want = [c[i] for c in cont for i in range(16)]
    got = [o.token_ids[0] for o in fp8.generate(contexts, SamplingParams(max_tokens=1, ignore_eos=True),
                                                use_tqdm=False)]
    share = sum(a == b for a, b in zip(got, want)) / len(want)
    print(f"greedy agreement (teacher-forced, {len(want)} tokens): {share:.1%}")
    record_property("greedy_agreement", share)
    assert share >= 0.9
