"""The model configuration, read from a Hugging Face ``config.json``.

``ModelConfig.from_hf(model_dir)`` is the single place where HF field names are interpreted; everything
else in dsaserve reads the normalized fields below. ``read_model_config`` also accepts a bare config .json
(benchmarks with random weights). Unknown model types and inconsistent fields raise
``ConfigError`` naming the field.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa")


class ConfigError(ValueError):
    """A config.json (or engine option) that dsaserve cannot run; the message names the field."""


@dataclass
class RopeConfig:
    """RoPE settings shared by MLA and the indexer. ``type`` is "default" or "yarn"."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # explicit cos/sin scale; derived from mscale when None
    truncate: bool = True


@dataclass
class FP8Config:
    """Block-quantized fp8 weights as stored by DeepSeek-V3.2 (``weight_scale_inv`` per 128x128 block)."""

    block_size: tuple[int, int] = (128, 128)
    fmt: str = "e4m3"
    scale_fmt: str | None = None  # "ue8m0" when scales are powers of two


@dataclass
class ModelConfig:
    """Normalized model configuration for the DSA family (DeepSeek-V3.2, GLM-5)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    mlp_layer_types: list[str]  # "dense" | "sparse" per layer
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    indexer_rope_interleave: bool
    indexer_types: list[str]  # "full" | "shared" per layer
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    fp8: FP8Config | None = None
    torch_dtype: str = "bfloat16"

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer by MLA: the latent plus the roped key (576 for V3.2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale, including YaRN's mscale correction (0.135234 for DeepSeek-V3.2)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """Scale applied to cos/sin (YaRN's attention factor; 1.0 for DeepSeek-V3.2's settings)."""
        r = self.rope
        if r.type != "yarn":
            return 1.0
        if r.attention_factor is not None:
            return float(r.attention_factor)
        if r.mscale and r.mscale_all_dim:
            return yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
        return yarn_mscale(r.factor)

    def is_moe_layer(self, layer: int) -> bool:
        return self.mlp_layer_types[layer] == "sparse"

    def has_indexer(self, layer: int) -> bool:
        return self.indexer_types[layer] == "full"

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json in {model_dir!r}: point --model at a Hugging Face checkpoint folder")
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; dsaserve runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        is_glm = model_type == "glm_moe_dsa"

        def req(name: str) -> Any:
            if name not in raw or raw[name] is None:
                raise ConfigError(f"{source}: required field {name!r} is missing")
            return raw[name]

        def get(name: str, default: Any) -> Any:
            v = raw.get(name)
            return default if v is None else v

        n_layers = int(req("num_hidden_layers"))
        first_dense = int(get("first_k_dense_replace", 3))
        mlp_types = raw.get("mlp_layer_types")
        if mlp_types is None:
            n_dense = min(first_dense, n_layers)
            mlp_types = ["dense"] * n_dense + ["sparse"] * (n_layers - n_dense)
        indexer_types = raw.get("indexer_types")
        if indexer_types is None and is_glm:
            pattern = raw.get("index_topk_pattern")
            if pattern is not None:
                indexer_types = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
            else:
                freq = max(int(get("index_topk_freq", 1)), 1)
                offset = int(get("index_skip_topk_offset", 2))
                indexer_types = ["full" if (max(i - offset + 1, 0) % freq) == 0 else "shared" for i in range(n_layers)]
        if indexer_types is None:
            indexer_types = ["full"] * n_layers

        eos = raw.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])

        fp8 = None
        qc = raw.get("quantization_config")
        if qc:
            method = qc.get("quant_method")
            if method != "fp8":
                raise ConfigError(f"{source}: quantization_config.quant_method={method!r} is not supported (only 'fp8')")
            block = tuple(qc.get("weight_block_size") or (128, 128))
            fp8 = FP8Config(block_size=(int(block[0]), int(block[1])), fmt=qc.get("fmt", "e4m3"),
                            scale_fmt=qc.get("scale_fmt"))

        cfg = cls(
            model_type=model_type,
            vocab_size=int(req("vocab_size")),
            hidden_size=int(req("hidden_size")),
            intermediate_size=int(req("intermediate_size")),
            moe_intermediate_size=int(req("moe_intermediate_size")),
            num_hidden_layers=n_layers,
            num_attention_heads=int(req("num_attention_heads")),
            q_lora_rank=int(req("q_lora_rank")),
            kv_lora_rank=int(req("kv_lora_rank")),
            qk_nope_head_dim=int(req("qk_nope_head_dim")),
            qk_rope_head_dim=int(req("qk_rope_head_dim")),
            v_head_dim=int(req("v_head_dim")),
            n_routed_experts=int(req("n_routed_experts")),
            n_shared_experts=int(get("n_shared_experts", 0)),
            num_experts_per_tok=int(req("num_experts_per_tok")),
            n_group=int(get("n_group", 1)),
            topk_group=int(get("topk_group", 1)),
            norm_topk_prob=bool(get("norm_topk_prob", True)),
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
            mlp_layer_types=list(mlp_types),
            index_n_heads=int(req("index_n_heads")),
            index_head_dim=int(req("index_head_dim")),
            index_topk=int(req("index_topk")),
            indexer_rope_interleave=bool(get("indexer_rope_interleave", is_glm)),
            indexer_types=list(indexer_types),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            rope=_parse_rope(raw, source),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            fp8=fp8,
            torch_dtype=str(get("torch_dtype", get("dtype", "bfloat16"))),
        )
        for name in ("scoring_func", "topk_method", "hidden_act"):
            expected = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu"}[name]
            if raw.get(name) not in (None, expected):
                raise ConfigError(f"{source}: {name}={raw[name]!r} is not supported (expected {expected!r})")
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Check cross-field consistency; raise ConfigError naming the first bad field."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads",
                    "index_head_dim", "index_topk", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: {name} must be > 0, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{source}: qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(f"{source}: index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim "
                              f"({self.qk_rope_head_dim}): the indexer ropes its first qk_rope_head_dim dims")
        if len(self.mlp_layer_types) != self.num_hidden_layers:
            raise ConfigError(f"{source}: mlp_layer_types has {len(self.mlp_layer_types)} entries, "
                              f"num_hidden_layers is {self.num_hidden_layers}")
        bad = [t for t in self.mlp_layer_types if t not in ("dense", "sparse")]
        if bad:
            raise ConfigError(f"{source}: mlp_layer_types has unknown entry {bad[0]!r} (use 'dense' or 'sparse')")
        if len(self.indexer_types) != self.num_hidden_layers:
            raise ConfigError(f"{source}: indexer_types has {len(self.indexer_types)} entries, "
                              f"num_hidden_layers is {self.num_hidden_layers}")
        bad = [t for t in self.indexer_types if t not in ("full", "shared")]
        if bad:
            raise ConfigError(f"{source}: indexer_types has unknown entry {bad[0]!r} (use 'full' or 'shared')")
        if self.indexer_types and self.indexer_types[0] != "full":
            raise ConfigError(f"{source}: indexer_types[0] must be 'full': a 'shared' layer reuses an earlier layer's top-k")
        if "sparse" in self.mlp_layer_types:
            if self.n_routed_experts <= 0:
                raise ConfigError(f"{source}: n_routed_experts must be > 0 for MoE layers, got {self.n_routed_experts}")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(f"{source}: num_experts_per_tok={self.num_experts_per_tok} must be in "
                                  f"[1, n_routed_experts={self.n_routed_experts}]")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                raise ConfigError(f"{source}: n_routed_experts={self.n_routed_experts} is not divisible by "
                                  f"n_group={self.n_group}")
            if not 0 < self.topk_group <= self.n_group:
                raise ConfigError(f"{source}: topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            if per_group < 2 and self.n_group > 1:
                raise ConfigError(f"{source}: n_group={self.n_group} leaves {per_group} expert per group; "
                                  "group scoring sums the top-2 experts of each group")
            if self.topk_group * per_group < self.num_experts_per_tok:
                raise ConfigError(f"{source}: num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in "
                                  f"topk_group={self.topk_group} groups ({self.topk_group * per_group})")
        if self.rope.type not in ("default", "yarn"):
            raise ConfigError(f"{source}: rope type {self.rope.type!r} is not supported (use 'yarn' or none)")
        if self.rope.type == "yarn" and self.rope.factor <= 0:
            raise ConfigError(f"{source}: rope factor must be > 0, got {self.rope.factor}")
        for e in self.eos_token_ids:
            if not 0 <= e < self.vocab_size:
                raise ConfigError(f"{source}: eos_token_id {e} is outside the vocabulary (vocab_size={self.vocab_size})")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    """Accept both ``rope_parameters`` (transformers >= 5) and ``rope_scaling`` (DeepSeek's files)."""
    params = raw.get("rope_parameters")
    key = "rope_parameters"
    if not params:
        params = raw.get("rope_scaling")
        key = "rope_scaling"
    if params and not isinstance(params, dict):
        raise ConfigError(f"{source}: {key} must be an object, got {params!r}")
    params = dict(params or {})
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if theta is None or float(theta) <= 0:
        raise ConfigError(f"{source}: rope_theta must be > 0, got {theta!r}")
    rope = RopeConfig(theta=float(theta), type=rtype)
    if rtype == "yarn":
        for name in ("factor", "original_max_position_embeddings"):
            if params.get(name) is None:
                if name == "original_max_position_embeddings" and raw.get(name) is not None:
                    params[name] = raw[name]
                else:
                    raise ConfigError(f"{source}: {key}.{name} is required for YaRN")
        rope.factor = float(params["factor"])
        rope.original_max_position_embeddings = int(params["original_max_position_embeddings"])
        rope.beta_fast = float(params.get("beta_fast") or 32)
        rope.beta_slow = float(params.get("beta_slow") or 1)
        rope.mscale = params.get("mscale")
        rope.mscale_all_dim = params.get("mscale_all_dim")
        rope.attention_factor = params.get("attention_factor")
        rope.truncate = bool(params.get("truncate", True))
    elif rtype != "default":
        raise ConfigError(f"{source}: {key}.rope_type={rtype!r} is not supported (use 'yarn' or none)")
    return rope


def read_model_config(model_path: str, load_format: str) -> ModelConfig:
    """A checkpoint folder's config.json, or a bare config .json for load_format='random' (benchmarks)."""
    if os.path.isfile(model_path) and model_path.endswith(".json"):
        if load_format != "random":
            raise ConfigError(f"{model_path} is a config file with no weights: pass load_format='random' "
                              "(--load-format random) or point at a checkpoint folder")
        with open(model_path) as f:
            return ModelConfig.from_dict(json.load(f), source=model_path)
    if not os.path.isdir(model_path):
        raise ConfigError(f"model folder {model_path!r} does not exist")
    return ModelConfig.from_hf(model_path)
