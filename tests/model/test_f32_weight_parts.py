"""The fp32 router / indexer head-weight projections count the bf16 parts their weights need once loaded
(``DSAModel.weights_loaded``), and random bench weights store those two as bf16 values, as DeepSeek's checkpoints do."""

from __future__ import annotations

import torch

from dsaserve.checkpoint.random_init import init_random_weights
from dsaserve.checkpoint.tiny import tiny_config_dict
from dsaserve.config import ModelConfig
from dsaserve.kernels.f32_linear import bf16_parts_needed
from dsaserve.model.deepseek_v32 import DSAModel
from dsaserve.model.indexer import Indexer
from dsaserve.model.moe import Router
from dsaserve.model.state_dict import checkpoint_specs


def _model(arch: str) -> DSAModel:
    cfg = ModelConfig.from_dict(tiny_config_dict(arch, num_hidden_layers=2))
    return DSAModel(cfg, dtype=torch.float32)


def _projections(model: DSAModel) -> list[tuple[str, torch.Tensor, str]]:
    """(module name, fp32 weight, the parts attribute) of every router and indexer of the model."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Router):
            out.append((name, m.weight, "weight_parts"))
        elif isinstance(m, Indexer):
            out.append((name, m.weights_proj.weight, "weights_proj_parts"))
    return out


def test_random_weights_draw_router_and_head_weights_as_bf16_and_one_part_is_counted():
    for arch in ("deepseek_v32", "glm_moe_dsa"):
        model = _model(arch)
        init_random_weights(checkpoint_specs(model), seed=7)
        projections = _projections(model)
        assert {type(m) for n, m in model.named_modules() if isinstance(m, (Router, Indexer))} == {Router, Indexer}
        for name, w, attr in projections:
            assert w.dtype == torch.float32 and torch.equal(w, w.bfloat16().float()), name
            assert w.abs().sum() > 0 and getattr(model.get_submodule(name), attr) == 3, name   # before: 3
        model.weights_loaded()
        assert all(getattr(model.get_submodule(n), attr) == 1 for n, _, attr in projections)
        # the other fp32-drawn weights are not rounded (the bf16 draw is for these two only)
        q_a = model.layers["0"].self_attn.q_a_proj.weight
        assert not torch.equal(q_a, q_a.bfloat16().float())


def test_weights_loaded_counts_what_each_weight_needs():
    model = _model("deepseek_v32")
    init_random_weights(checkpoint_specs(model), seed=7)
    router = model.layers["1"].mlp.gate
    indexer = model.layers["0"].self_attn.indexer
    g = torch.Generator().manual_seed(1)
    router.weight.copy_(torch.randn(router.weight.shape, generator=g))                      # generic fp32: 3
    fp32 = torch.randn(indexer.weights_proj.weight.shape, generator=g)
    hi = fp32.bfloat16().float()
    indexer.weights_proj.weight.copy_(hi + (fp32 - hi).bfloat16().float())                 # hi + mid: 2
    model.weights_loaded()
    assert (router.weight_parts, indexer.weights_proj_parts) == (3, 2)
    assert model.layers["1"].self_attn.indexer.weights_proj_parts == 1                     # untouched: bf16


def test_the_runner_counts_the_parts_after_drawing_or_loading(tmp_path):
    """Both ways a runner fills its weights end in ``weights_loaded``: random bench weights (bf16-drawn) and a
    checkpoint (the tiny ones store the router and head weights in bf16, as DeepSeek's files do): one part each."""
    from dsaserve.args import EngineArgs
    from dsaserve.checkpoint.tiny import make_tiny_checkpoint
    from dsaserve.model.shard import StageShard
    from dsaserve.runtime.runner import ModelRunner

    ckpt = make_tiny_checkpoint(str(tmp_path / "tiny"), arch="deepseek_v32", seed=0, num_shards=1)
    cfg = ModelConfig.from_hf(ckpt)
    for load_format in ("random", "auto"):
        runner = ModelRunner(ckpt, cfg, StageShard.whole(cfg), EngineArgs(load_format=load_format),
                             device=torch.device("cpu"), dtype=torch.float32, progress=False)
        counted = [getattr(runner.model.get_submodule(n), attr) for n, w, attr in _projections(runner.model)]
        assert counted == [bf16_parts_needed(w) for _, w, _ in _projections(runner.model)], load_format
        assert set(counted) == {1}, load_format
