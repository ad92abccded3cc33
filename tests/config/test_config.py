"""ModelConfig.from_hf / from_dict: tiny configs parse, bad configs fail naming the field."""

import json

import pytest

from dsaserve.checkpoint.tiny import tiny_config_dict
from dsaserve.config import ConfigError, ModelConfig


def test_tiny_configs_parse(tiny_ds, tiny_glm):
    ds = ModelConfig.from_hf(tiny_ds)
    assert ds.model_type == "deepseek_v32"
    assert ds.mlp_layer_types == ["dense", "sparse", "sparse", "sparse"]
    assert ds.indexer_types == ["full"] * 4
    assert ds.rope.type == "yarn" and ds.rope.factor == 4.0 and ds.rope.original_max_position_embeddings == 4096
    assert not ds.indexer_rope_interleave
    assert ds.eos_token_ids == [1] and ds.bos_token_id == 0
    assert ds.kv_cache_dim == 64 + 16
    glm = ModelConfig.from_hf(tiny_glm)
    assert glm.model_type == "glm_moe_dsa" and glm.indexer_rope_interleave
    assert glm.indexer_types == ["full", "full", "shared", "full"]
    assert glm.rope.type == "default" and glm.rms_norm_eps == 1e-5


def test_fp8_config_parses(tiny_ds_fp8):
    cfg = ModelConfig.from_hf(tiny_ds_fp8)
    assert cfg.fp8 is not None and cfg.fp8.block_size == (128, 128) and cfg.fp8.scale_fmt == "ue8m0"


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf(str(tmp_path))


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(str(tmp_path))


def test_unknown_model_type():
    raw = tiny_config_dict()
    raw["model_type"] = "llama"
    with pytest.raises(ConfigError, match="model_type='llama' is not supported"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("field", ["hidden_size", "kv_lora_rank", "index_topk", "num_hidden_layers"])
def test_missing_required_field(field):
    raw = tiny_config_dict()
    del raw[field]
    with pytest.raises(ConfigError, match=f"required field '{field}' is missing"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("changes, needle", [
    ({"topk_group": 3, "n_group": 2}, "topk_group=3"),
    ({"n_group": 3}, "not divisible by n_group=3"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim must be even"),
    ({"index_head_dim": 8}, "index_head_dim"),
    ({"eos_token_id": 4096}, "eos_token_id 4096"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"mlp_layer_types": ["dense", "sparse"]}, "mlp_layer_types has 2 entries, num_hidden_layers is 4"),
    ({"mlp_layer_types": ["dense", "sparse", "moe", "sparse"]}, "unknown entry 'moe'"),
    ({"quantization_config": {"quant_method": "awq"}}, "quant_method='awq'"),
])
def test_inconsistent_fields(changes, needle):
    raw = tiny_config_dict(**changes)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_dict(raw)


def test_bad_indexer_types():
    raw = tiny_config_dict("glm_moe_dsa", indexer_types=["full", "shared"])
    with pytest.raises(ConfigError, match="indexer_types has 2 entries"):
        ModelConfig.from_dict(raw)
    raw = tiny_config_dict("glm_moe_dsa", indexer_types=["shared", "full", "full", "full"])
    with pytest.raises(ConfigError, match=r"indexer_types\[0\] must be 'full'"):
        ModelConfig.from_dict(raw)


def test_rope_scaling_and_rope_parameters_agree():
    new = tiny_config_dict()
    old = dict(new)
    params = dict(old.pop("rope_parameters"))
    old["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")  # DeepSeek's own files say "type"
    old["rope_scaling"] = params
    a, b = ModelConfig.from_dict(new), ModelConfig.from_dict(old)
    assert a.rope == b.rope
    assert a.softmax_scale == b.softmax_scale
    assert a.rope.type == "yarn" and a.rope.mscale_all_dim == 1.0


def test_yarn_requires_factor():
    raw = tiny_config_dict()
    del raw["rope_parameters"]["factor"]
    with pytest.raises(ConfigError, match="rope_parameters.factor is required"):
        ModelConfig.from_dict(raw)


def test_real_deepseek_softmax_scale():
    # DeepSeek-V3.2's numbers: 192^-0.5 * (0.1 ln 40 + 1)^2 = 0.135234 (DSA_MODEL.md).
    raw = tiny_config_dict(qk_nope_head_dim=128, qk_rope_head_dim=64, index_head_dim=128,
                           rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40,
                                            "original_max_position_embeddings": 4096, "beta_fast": 32,
                                            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    assert ModelConfig.from_dict(raw).softmax_scale == pytest.approx(0.135234, abs=1e-6)


@pytest.mark.parametrize("freq, offset", [(1, 2), (2, 2), (3, 1), (4, 3), (2, 1)])
def test_glm_indexer_types_match_transformers(freq, offset):
    transformers = pytest.importorskip("transformers")
    n_layers = 10
    hf = transformers.GlmMoeDsaConfig(num_hidden_layers=n_layers, index_topk_freq=freq,
                                      index_skip_topk_offset=offset).indexer_types
    raw = tiny_config_dict("glm_moe_dsa", num_hidden_layers=n_layers, index_topk_freq=freq,
                           index_skip_topk_offset=offset)
    del raw["indexer_types"]  # make from_dict derive it
    ours = ModelConfig.from_dict(raw).indexer_types
    assert ours == hf
    assert "shared" in ours or freq == 1


def test_glm_index_topk_pattern():
    raw = tiny_config_dict("glm_moe_dsa", index_topk_pattern="FFSF")
    del raw["indexer_types"]
    assert ModelConfig.from_dict(raw).indexer_types == ["full", "full", "shared", "full"]


def test_from_hf_reads_the_file(tmp_path):
    raw = tiny_config_dict(num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_hf(str(tmp_path))
    assert cfg.num_hidden_layers == 2 and cfg.mlp_layer_types == ["dense", "sparse"]


def test_rope_parameters_not_an_object():
    raw = tiny_config_dict()
    raw["rope_parameters"] = "yarn"
    with pytest.raises(ConfigError, match="rope_parameters must be an object"):
        ModelConfig.from_dict(raw)
