"""make-tiny: files, names, fp8 vs bf16 of the same seed, determinism, CLI, cache."""

import json
import os

import pytest
import torch

from dsaserve.kernels.block_fp8 import expand_block_scales
from dsaserve.checkpoint.loader import CheckpointFiles, read_tensor
from dsaserve.checkpoint.tiny import (SPECIAL_TOKENS, TOKENIZER_VOCAB, default_tiny_dir, make_tiny_checkpoint,
                                      tiny_config_dict)
from dsaserve.cli import main as cli_main
from dsaserve.config import ModelConfig

FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "model.safetensors.index.json"]
FP8_LINEARS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "wq_b", "wk",
               "gate_proj", "up_proj", "down_proj")


def _expected_names(cfg: ModelConfig) -> set[str]:
    """The HF names a model of this config needs (what the lead's model will list as specs)."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + f"self_attn.{m}.weight" for m in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                        "o_proj", "q_a_layernorm", "kv_a_layernorm")}
        if cfg.has_indexer(i):
            names |= {p + f"self_attn.indexer.{m}" for m in ("wq_b.weight", "wk.weight", "weights_proj.weight",
                                                              "k_norm.weight", "k_norm.bias")}
        if cfg.is_moe_layer(i):
            names |= {p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"}
            for e in range(cfg.n_routed_experts):
                names |= {p + f"mlp.experts.{e}.{m}_proj.weight" for m in ("gate", "up", "down")}
            names |= {p + f"mlp.shared_experts.{m}_proj.weight" for m in ("gate", "up", "down")}
        else:
            names |= {p + f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
    return names


@pytest.mark.parametrize("fixture", ["tiny_ds", "tiny_glm", "tiny_ds_fp8"])
def test_writes_every_file_and_name(fixture, request):
    d = request.getfixturevalue(fixture)
    for f in FILES:
        assert os.path.isfile(os.path.join(d, f)), f
    files = CheckpointFiles(d)
    shards = sorted(set(files.weight_map.values()))
    assert len(shards) >= 2 and all(os.path.isfile(os.path.join(d, s)) for s in shards)
    cfg = ModelConfig.from_hf(d)
    names = set(files.names())
    expected = _expected_names(cfg)
    assert expected <= names
    extra = names - expected
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    assert all(n.startswith(mtp) or n.endswith("_scale_inv") for n in extra), extra
    assert any(n.startswith(mtp) for n in extra)  # the MTP layer is there, to be ignored
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    assert index["metadata"]["total_size"] > 0


def test_glm_shared_layers_have_no_indexer(tiny_glm):
    cfg = ModelConfig.from_hf(tiny_glm)
    names = CheckpointFiles(tiny_glm).names()
    assert cfg.indexer_types == ["full", "full", "shared", "full"]
    assert not any(n.startswith("model.layers.2.self_attn.indexer.") for n in names)
    assert any(n.startswith("model.layers.3.self_attn.indexer.") for n in names)


def test_weights_have_the_intended_statistics(tiny_ds):
    bias = read_tensor(tiny_ds, "model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.abs().max() > 0.01
    knb = read_tensor(tiny_ds, "model.layers.0.self_attn.indexer.k_norm.bias")
    assert knb.abs().max() > 0.01
    norm = read_tensor(tiny_ds, "model.layers.0.input_layernorm.weight").float()
    assert 0.9 < norm.mean() < 1.1 and norm.std() > 0.01
    w = read_tensor(tiny_ds, "model.layers.0.self_attn.q_a_proj.weight")
    assert w.dtype == torch.bfloat16 and 0.015 < w.float().std() < 0.025
    head = read_tensor(tiny_ds, "lm_head.weight").float()
    assert head.shape[0] == TOKENIZER_VOCAB                       # one vocabulary (issue 14 item 17)
    assert head[:len(SPECIAL_TOKENS)].abs().max() == 0
    assert head[len(SPECIAL_TOKENS):].std() > 0.04


def test_one_vocabulary_every_id_decodes(tiny_ds, tmp_path):
    """Issue 14 item 17: the model's vocabulary (512) and the tokenizer's (was 480) disagreed, so ids 480-511
    decoded to empty strings. Now every id of the model decodes to text; a checkpoint made with a larger
    vocab_size (padded, as real ones are) keeps its padding ids unreachable by zero head rows."""
    from dsaserve.tokenizer import Tokenizer

    cfg = json.load(open(os.path.join(tiny_ds, "config.json")))
    tok = Tokenizer.from_dir(tiny_ds)
    assert tok.vocab_size == cfg["vocab_size"] == TOKENIZER_VOCAB
    empty = [i for i in range(len(SPECIAL_TOKENS), cfg["vocab_size"]) if tok.decode([i]) == ""]
    assert not empty, f"ids that decode to nothing: {empty[:10]}"
    padded = make_tiny_checkpoint(str(tmp_path / "padded"), vocab_size=TOKENIZER_VOCAB + 32, num_shards=1, mtp=False)
    head = read_tensor(padded, "lm_head.weight").float()
    assert head.shape[0] == TOKENIZER_VOCAB + 32 and head[TOKENIZER_VOCAB:].abs().max() == 0


def test_fp8_matches_bf16_of_same_seed(tiny_ds, tiny_ds_fp8):
    files = CheckpointFiles(tiny_ds_fp8)
    quantized = [n for n in files.names() if files.scale_name(n)]
    leaf = {n.split(".")[-2] for n in quantized}
    assert leaf == set(FP8_LINEARS)
    n_blocks_partial = 0
    for name in files.names():
        if name.endswith("_scale_inv"):
            continue
        ref = read_tensor(tiny_ds, name).float()
        if name in quantized:
            raw = read_tensor(tiny_ds_fp8, name, dequantize=False)
            scale = read_tensor(tiny_ds_fp8, name + "_scale_inv")
            assert raw.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
            assert torch.all(torch.log2(scale) == torch.round(torch.log2(scale)))  # ue8m0
            n_blocks_partial += (raw.shape[0] % 128 != 0) or (raw.shape[1] % 128 != 0)
            deq = read_tensor(tiny_ds_fp8, name)
            # e4m3 round to nearest: |err| <= 2^-4 |w| + 2^-10 * scale (see test_fp8.py)
            bound = 2.0 ** -4 * ref.abs() + 2.0 ** -10 * expand_block_scales(scale, tuple(ref.shape))
            assert torch.all((deq - ref).abs() <= bound), name
            assert not torch.equal(deq, ref) or ref.abs().max() == 0
        else:  # embed, lm_head, norms, router, weights_proj, k_norm: identical
            assert torch.equal(read_tensor(tiny_ds_fp8, name), read_tensor(tiny_ds, name)), name
    assert n_blocks_partial > 0  # edge blocks are exercised (e.g. q_b_proj 192x64)
    cfg = json.load(open(os.path.join(tiny_ds_fp8, "config.json")))
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}


def test_deterministic_and_seeded(tmp_path, tiny_ds):
    a = make_tiny_checkpoint(str(tmp_path / "a"), seed=0)
    b = make_tiny_checkpoint(str(tmp_path / "b"), seed=1)
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    assert torch.equal(read_tensor(a, name), read_tensor(tiny_ds, name))
    assert not torch.equal(read_tensor(b, name), read_tensor(tiny_ds, name))
    for f in ("tokenizer.json", "config.json", "model.safetensors.index.json"):
        assert open(os.path.join(a, f)).read() == open(os.path.join(tiny_ds, f)).read()


def test_cli_make_tiny(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["make-tiny", str(out), "--arch", "glm_moe_dsa", "--num-layers", "2", "--seed", "3"]) == 0
    assert "wrote tiny glm_moe_dsa" in capsys.readouterr().out
    cfg = ModelConfig.from_hf(str(out))
    assert cfg.num_hidden_layers == 2 and cfg.model_type == "glm_moe_dsa"
    # rerun smaller into the same folder: stale shards go away
    assert cli_main(["make-tiny", str(out), "--fp8", "--num-layers", "1"]) == 0
    files = CheckpointFiles(str(out))
    assert set(files.weight_map.values()) == {f for f in os.listdir(out) if f.endswith(".safetensors")}
    assert ModelConfig.from_hf(str(out)).fp8 is not None


def test_config_overrides_validate():
    cfg = tiny_config_dict(num_hidden_layers=6)
    assert ModelConfig.from_dict(cfg).num_hidden_layers == 6
    with pytest.raises(ValueError, match="unknown arch"):
        tiny_config_dict("llama")


def test_default_tiny_dir_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DSASERVE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make-tiny"):
        default_tiny_dir(build=False)
    d = default_tiny_dir()
    assert d == str(tmp_path / "tiny-deepseek_v32")
    stamp = os.path.getmtime(os.path.join(d, "config.json"))
    assert default_tiny_dir() == d and os.path.getmtime(os.path.join(d, "config.json")) == stamp
    assert os.listdir(tmp_path) == ["tiny-deepseek_v32"]  # no temp folders left behind
    os.remove(os.path.join(d, "dsaserve_tiny.json"))  # incomplete -> rebuilt
    assert default_tiny_dir() == d and os.path.isfile(os.path.join(d, "dsaserve_tiny.json"))
    assert default_tiny_dir("glm_moe_dsa", fp8=True).endswith("tiny-glm_moe_dsa-fp8")
