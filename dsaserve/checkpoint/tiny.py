"""``dsaserve make-tiny``: a tiny random checkpoint in the exact Hugging Face layout of DeepSeek-V3.2
(or GLM-5, ``glm_moe_dsa``), for tests and the demo.

The folder holds ``config.json`` (loadable by ``transformers.AutoConfig`` / ``AutoModelForCausalLM``),
weights under the real HF names in several safetensors shards + ``model.safetensors.index.json`` (plus
a small MTP layer ``model.layers.{num_hidden_layers}.*`` that, as in the real checkpoints, must be
ignored), ``generation_config.json``, a byte-level BPE ``tokenizer.json`` trained at run time on a
built-in English text, and ``tokenizer_config.json`` with a DeepSeek-style chat template.

Weights come from one seeded float32 source rounded to bf16; ``--fp8`` stores the same values block-
quantized (e4m3 + ``weight_scale_inv``), so a bf16 and an fp8 checkpoint of one seed differ only by fp8
rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import save_file

from dsaserve.kernels.block_fp8 import quantize_block_fp8

ARCHS = ("deepseek_v32", "glm_moe_dsa")
# Bump when the tiny checkpoint's content changes so cached copies are rebuilt.
TINY_FORMAT_VERSION = 2
MARKER_FILE = "dsaserve_tiny.json"

BOS, EOS, USER, ASSISTANT, PAD = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                  "<｜Assistant｜>", "<｜▁pad▁｜>")
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, PAD]  # ids 0..4: bos 0, eos 1 as in config.json
# One vocabulary: the tokenizer has exactly the model's vocab_size ids, so every id a prompt may carry
# decodes to text. (Real checkpoints pad the model's vocabulary past the tokenizer's; a tiny checkpoint made
# with a larger vocab_size override has such padding ids too, and they stay unreachable: zero head rows.)
TOKENIZER_VOCAB = 512

# DeepSeek style: bos, optional system text, then <｜User｜>...<｜Assistant｜>...eos turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of a sentence.
Long ago, in a quiet town by the sea, there lived a baker who rose before the sun every morning.
She mixed flour, water, salt and yeast, and the warm smell of fresh bread drifted through the streets.
People came from the hills and the harbor to buy her loaves, and they talked about the weather,
the ships in the bay, the price of fish, and the stories their grandparents used to tell.
When the tide was low, children ran along the sand looking for shells, crabs and smooth green glass.
In the evening the lamps were lit one by one, and the sound of music came from the open windows.
Reading is a way of talking with people who lived long before us and with people we will never meet.
Numbers matter too: one, two, three, four, five, six, seven, eight, nine, ten, one hundred, 2048, 4096.
The engine reads the prompt, splits it into chunks, and sends each chunk through every layer in turn.
Every answer should be short, clear and correct. If you do not know, say that you do not know.
What is the capital of France? The capital of France is Paris. What is two plus two? It is four.
Please write a short poem about the moon. The moon is bright tonight; it lights the path and the river.
Thank you for your help. You are welcome. Have a good day, and see you again tomorrow morning.
"""


# ---- config ------------------------------------------------------------------------------------------
def _glm_indexer_types(n_layers: int) -> list[str]:
    # transformers' derivation with index_topk_freq=2, index_skip_topk_offset=2: full, full, shared, full, ...
    return ["full" if (max(i - 1, 0) % 2) == 0 else "shared" for i in range(n_layers)]


def tiny_config_dict(arch: str = "deepseek_v32", **overrides: Any) -> dict[str, Any]:
    """The config.json of a tiny model (only fields transformers 5.24 knows; rope in rope_parameters)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHS)}")
    cfg: dict[str, Any] = {
        "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4, "first_k_dense_replace": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 64,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "intermediate_size": 256,
        "moe_intermediate_size": 32, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "n_group": 2, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "index_n_heads": 16, "index_head_dim": 64, "index_topk": 32, "hidden_act": "silu",
        "max_position_embeddings": 16384, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": False, "attention_bias": False, "initializer_range": 0.02, "use_cache": True,
        # YaRN with factor * original == max_position_embeddings (transformers warns otherwise).
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                            "mscale": 1.0, "mscale_all_dim": 1.0},
    }
    if arch == "glm_moe_dsa":
        cfg.update({"rms_norm_eps": 1e-5, "n_group": 1, "topk_group": 1,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    cfg.update(overrides)
    if arch == "glm_moe_dsa" and "indexer_types" not in overrides:
        cfg["indexer_types"] = _glm_indexer_types(cfg["num_hidden_layers"])
    cfg["model_type"] = arch
    cfg["architectures"] = ["DeepseekV32ForCausalLM" if arch == "deepseek_v32" else "GlmMoeDsaForCausalLM"]
    cfg["dtype"] = "bfloat16"
    return dict(sorted(cfg.items()))


# ---- weights -----------------------------------------------------------------------------------------
# kind -> (init, stored dtype). "qlinear" weights are the ones an fp8 checkpoint quantizes.
_FP32 = torch.float32
_BF16 = torch.bfloat16


def tiny_tensor_layout(cfg: dict[str, Any], mtp: bool = True) -> list[tuple[int, str, tuple[int, ...], str]]:
    """Every tensor of the checkpoint as ``(group, name, shape, kind)``; group = shard placement unit."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh, qr, kvr = cfg["num_attention_heads"], cfg["q_lora_rank"], cfg["kv_lora_rank"]
    nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    ih, idim = cfg["index_n_heads"], cfg["index_head_dim"]
    E, mI, I = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    sI = cfg["n_shared_experts"] * mI
    n_dense = cfg.get("first_k_dense_replace", 3)
    mlp_types = cfg.get("mlp_layer_types") or ["dense" if i < n_dense else "sparse" for i in range(L)]
    indexer_types = cfg.get("indexer_types") or ["full"] * L

    out: list[tuple[int, str, tuple[int, ...], str]] = [(0, "model.embed_tokens.weight", (V, H), "embed")]

    def attention(g: int, p: str, indexer: bool) -> None:
        a = p + "self_attn."
        out.extend([
            (g, a + "q_a_proj.weight", (qr, H), "qlinear"),
            (g, a + "q_a_layernorm.weight", (qr,), "norm"),
            (g, a + "q_b_proj.weight", (nh * (nope + rope), qr), "qlinear"),
            (g, a + "kv_a_proj_with_mqa.weight", (kvr + rope, H), "qlinear"),
            (g, a + "kv_a_layernorm.weight", (kvr,), "norm"),
            (g, a + "kv_b_proj.weight", (nh * (nope + vd), kvr), "qlinear"),
            (g, a + "o_proj.weight", (H, nh * vd), "qlinear"),
        ])
        if indexer:
            out.extend([
                (g, a + "indexer.wq_b.weight", (ih * idim, qr), "qlinear"),
                (g, a + "indexer.wk.weight", (idim, H), "qlinear"),
                (g, a + "indexer.k_norm.weight", (idim,), "norm"),
                (g, a + "indexer.k_norm.bias", (idim,), "bias"),
                (g, a + "indexer.weights_proj.weight", (ih, H), "linear"),
            ])

    for i in range(L):
        g, p = i + 1, f"model.layers.{i}."
        out.append((g, p + "input_layernorm.weight", (H,), "norm"))
        attention(g, p, indexer_types[i] == "full")
        out.append((g, p + "post_attention_layernorm.weight", (H,), "norm"))
        if mlp_types[i] == "dense":
            out.extend([(g, p + "mlp.gate_proj.weight", (I, H), "qlinear"),
                        (g, p + "mlp.up_proj.weight", (I, H), "qlinear"),
                        (g, p + "mlp.down_proj.weight", (H, I), "qlinear")])
        else:
            out.extend([(g, p + "mlp.gate.weight", (E, H), "router"),
                        (g, p + "mlp.gate.e_score_correction_bias", (E,), "router_bias")])
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                out.extend([(g, q + "gate_proj.weight", (mI, H), "qlinear"),
                            (g, q + "up_proj.weight", (mI, H), "qlinear"),
                            (g, q + "down_proj.weight", (H, mI), "qlinear")])
            if sI:
                q = p + "mlp.shared_experts."
                out.extend([(g, q + "gate_proj.weight", (sI, H), "qlinear"),
                            (g, q + "up_proj.weight", (sI, H), "qlinear"),
                            (g, q + "down_proj.weight", (H, sI), "qlinear")])
    out.extend([(L + 1, "model.norm.weight", (H,), "norm"), (L + 1, "lm_head.weight", (V, H), "head")])
    if mtp:
        # A slice of DeepSeek's multi-token-prediction layer: present in real files, never loaded.
        g, p = L + 2, f"model.layers.{L}."
        out.extend([(g, p + "enorm.weight", (H,), "norm"), (g, p + "hnorm.weight", (H,), "norm"),
                    (g, p + "eh_proj.weight", (H, 2 * H), "linear"),
                    (g, p + "input_layernorm.weight", (H,), "norm"),
                    (g, p + "self_attn.q_a_proj.weight", (qr, H), "qlinear"),
                    (g, p + "shared_head.norm.weight", (H,), "norm")])
    return out


def _init(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Source values (float32, then rounded to bf16). Scales keep activations O(1) and logits varied."""
    r = torch.randn(shape, generator=gen, dtype=_FP32)
    if kind == "norm":
        t = 1.0 + 0.1 * r           # near 1, not exactly: a mis-mapped norm shows up
    elif kind == "bias":
        t = 0.1 * r                 # nonzero LayerNorm bias (indexer k_norm)
    elif kind == "router_bias":
        t = 0.05 * r                # comparable to the sigmoid spread: the bias changes the routing
    elif kind == "router":
        t = 0.05 * r
    elif kind == "head":
        t = 0.05 * r                # logits std ~0.6
        # Zero rows for special tokens and ids past the tokenizer (if vocab_size is overridden upwards): their
        # logit is 0, below the max of the others, so greedy decoding never emits eos at once or padding ids.
        t[:len(SPECIAL_TOKENS)] = 0
        t[TOKENIZER_VOCAB:] = 0
    elif kind == "embed":
        t = 0.1 * r                 # with 0.02 greedy decoding sticks on a few tokens; 0.1 varies and
                                    # layer outputs (~0.04) still move the logits
    else:                           # linear, qlinear
        t = 0.02 * r
    return t.to(_BF16)


def _stored_dtype(kind: str) -> torch.dtype:
    return _FP32 if kind == "router_bias" else _BF16  # as in DeepSeek's files


def tiny_weights(cfg: dict[str, Any], seed: int = 0, fp8: bool = False, mtp: bool = True,
                 block: tuple[int, int] = (128, 128)) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """(group, {name: tensor}) for every tensor; fp8 adds ``*.weight_scale_inv`` next to quantized weights."""
    gen = torch.Generator().manual_seed(int(seed))
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for g, name, shape, kind in tiny_tensor_layout(cfg, mtp=mtp):
        t = _init(kind, shape, gen).to(_stored_dtype(kind))  # same draws whether fp8 or not
        d = groups.setdefault(g, {})
        if fp8 and kind == "qlinear":
            q, s = quantize_block_fp8(t.float(), block, ue8m0=True)
            d[name] = q
            d[name + "_scale_inv"] = s
        else:
            d[name] = t.contiguous()
    return sorted(groups.items())


# ---- tokenizer ---------------------------------------------------------------------------------------
def build_tiny_tokenizer():
    """A byte-level BPE (``tokenizers.Tokenizer``) trained on TRAINING_TEXT; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    # Like DeepSeek's tokenizer.json: encode(add_special_tokens=True) prepends bos (AutoTokenizer users).
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, 0)])
    return tok


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_tokenizer(outdir: str, cfg: dict[str, Any]) -> None:
    tok = build_tiny_tokenizer()
    if tok.get_vocab_size() > cfg["vocab_size"]:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but vocab_size is {cfg['vocab_size']}")
    tok.save(os.path.join(outdir, "tokenizer.json"))
    _write_json(os.path.join(outdir, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "clean_up_tokenization_spaces": False, "model_max_length": cfg["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    })


# ---- the folder --------------------------------------------------------------------------------------
_OWN_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "model.safetensors.index.json", MARKER_FILE)


def make_tiny_checkpoint(outdir: str, arch: str = "deepseek_v32", fp8: bool = False, seed: int = 0, *,
                         num_shards: int = 3, mtp: bool = True, **overrides: Any) -> str:
    """Write a tiny random checkpoint to ``outdir`` (created if needed) and return its path.

    ``overrides`` replace config.json fields (e.g. ``num_hidden_layers=2``). Same seed and geometry give
    the same values; ``fp8=True`` stores the same values e4m3-quantized in 128x128 blocks (ue8m0 scales).
    """
    cfg = tiny_config_dict(arch, **overrides)
    block = (128, 128)
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(block), "scale_fmt": "ue8m0"}
    os.makedirs(outdir, exist_ok=True)
    for f in os.listdir(outdir):  # drop an earlier run's shards (their count may differ)
        if f.endswith(".safetensors") or f in _OWN_FILES:
            os.remove(os.path.join(outdir, f))

    groups = tiny_weights(cfg, seed=seed, fp8=fp8, mtp=mtp, block=block)
    n = max(1, min(num_shards, len(groups)))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for j, (_, tensors) in enumerate(groups):
        shards[j * n // len(groups)].update(tensors)
    weight_map: dict[str, str] = {}
    total = 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, os.path.join(outdir, fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    _write_json(os.path.join(outdir, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _write_json(os.path.join(outdir, "config.json"), cfg)
    _write_json(os.path.join(outdir, "generation_config.json"),
                {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False})
    _write_tokenizer(outdir, cfg)
    _write_json(os.path.join(outdir, MARKER_FILE),  # written last: its presence means "complete"
                {"version": TINY_FORMAT_VERSION, "arch": arch, "fp8": fp8, "seed": seed, "num_shards": n,
                 "mtp": mtp, "overrides": overrides})
    return outdir


def default_tiny_dir(arch: str = "deepseek_v32", *, fp8: bool = False, seed: int = 0, build: bool = True) -> str:
    """The cached tiny checkpoint ``~/.cache/dsaserve/tiny-<arch>[-fp8]`` (``$DSASERVE_CACHE`` replaces
    ``~/.cache/dsaserve``), built on first use and rebuilt when stale. Safe when several processes race."""
    base = os.environ.get("DSASERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsaserve")
    path = os.path.join(base, f"tiny-{arch}" + ("-fp8" if fp8 else ""))
    want = {"version": TINY_FORMAT_VERSION, "arch": arch, "fp8": fp8, "seed": seed}

    def complete() -> bool:
        try:
            with open(os.path.join(path, MARKER_FILE)) as f:
                have = json.load(f)
        except (OSError, ValueError):
            return False
        return all(have.get(k) == v for k, v in want.items()) and not have.get("overrides")

    if complete():
        return path
    if not build:
        raise FileNotFoundError(f"no tiny checkpoint cached at {path}: run `dsaserve make-tiny {path}`")
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=base)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is readable like any model folder
    try:
        make_tiny_checkpoint(tmp, arch=arch, fp8=fp8, seed=seed)
        if complete():  # another process finished first: keep its copy (someone may be reading it)
            return path
        old = path + f".old-{os.getpid()}"
        if os.path.exists(path):
            os.rename(path, old)  # stale or incomplete: move aside, then swap in the new one
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, MARKER_FILE)):  # lost a race to a complete build? fine
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---- CLI ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("outdir", help="folder to write (created; earlier shards in it are replaced)")
    parser.add_argument("--arch", choices=ARCHS, default="deepseek_v32", help="model type (default: %(default)s)")
    parser.add_argument("--fp8", action="store_true", help="store linear weights as e4m3 with 128x128 block scales")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: %(default)s)")
    parser.add_argument("--num-layers", type=int, default=None, help="decoder layers (default: 4)")


def run(args: argparse.Namespace) -> int:
    overrides = {}
    if args.num_layers is not None:
        if args.num_layers < 1:
            raise SystemExit("--num-layers must be >= 1")
        overrides["num_hidden_layers"] = args.num_layers
    path = make_tiny_checkpoint(args.outdir, arch=args.arch, fp8=args.fp8, seed=args.seed, **overrides)
    files = sorted(os.listdir(path))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    print(f"wrote tiny {args.arch}{' fp8' if args.fp8 else ''} checkpoint (seed {args.seed}) to {path}: "
          f"{len(files)} files, {size / 1e6:.1f} MB")
    return 0
