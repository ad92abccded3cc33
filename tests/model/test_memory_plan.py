"""``dsaserve.model.memory_plan`` and ``dsaserve plan``: the accounting equals what the engine allocates.

* weights: every rank of several PP x CP layouts is built exactly like the runtime builds it (``ModelRunner``
  on a tiny checkpoint, experts split by expert over the CP ranks) with bf16 / fp32 weights, with fp8 weights
  quantized at load (``--quantization fp8``) and from an fp8 checkpoint; its parameter + buffer bytes,
  classified by module name, must equal the plan's per-kind bytes, and so must ``runner.weight_stats()``;
* KV: the ``KVCache`` the runner allocates equals ``kv_cache_bytes`` (fp8 and exact indexer, GLM shared layers);
* fp8 weights (odd dims: padding and partial blocks), expert-parallel splits and transients: against numbers
  worked out by hand in the test;
* the CLI: exit codes, JSON == the module's numbers, errors that name the problem.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dsaserve.checkpoint.tiny import make_tiny_checkpoint, tiny_config_dict
from dsaserve.cli import main as cli_main
from dsaserve.config import ModelConfig
from dsaserve.model import memory_plan as mp
from dsaserve.parallel.layout import Layout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "benchmarks", "configs")
PAGE = 64


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    dirs = {arch: make_tiny_checkpoint(str(tmp_path_factory.mktemp(arch)), arch=arch, seed=0, num_shards=1)
            for arch in ("deepseek_v32", "glm_moe_dsa")}
    dirs["deepseek_v32-fp8"] = make_tiny_checkpoint(str(tmp_path_factory.mktemp("ds-fp8")), arch="deepseek_v32",
                                                    fp8=True, seed=0, num_shards=1)
    return dirs


def _kind(name: str) -> str:
    """Weight kind of an engine parameter / buffer, from its module path (independent of memory_plan)."""
    if name.startswith("embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if "norm." in name or name.endswith("inv_freq") or ".mlp.gate." in name:
        return "norms_router"      # RMSNorms, the indexer's k_norm, the rope table, the router
    if ".self_attn.indexer." in name:
        return "indexer"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.shared_experts." in name:
        return "moe_shared"
    if ".mlp.experts." in name:
        return "moe_routed"
    if ".mlp." in name:
        return "dense_mlp"
    raise AssertionError(f"unclassified engine tensor {name!r}")


def _allocated(runner) -> dict[str, int]:
    out = dict.fromkeys(mp.WEIGHT_KINDS, 0)
    for name, t in list(runner.model.named_parameters()) + list(runner.model.named_buffers()):
        out[_kind(name)] += t.numel() * t.element_size()
    return out


def _runners(model_dir: str, cfg: ModelConfig, layout: Layout, dtype: torch.dtype, quantization: str = "auto"):
    from dsaserve.args import EngineArgs
    from dsaserve.runtime.runner import ModelRunner

    args = EngineArgs(page_size=PAGE, indexer_mode="exact", quantization=quantization)
    for rank in range(layout.world_size):
        yield rank, ModelRunner(model_dir, cfg, layout.rank_view(rank).shard(), args, device=torch.device("cpu"),
                                dtype=dtype, progress=False)


LAYOUTS = [("deepseek_v32", 1, 1, None), ("deepseek_v32", 2, 1, None), ("deepseek_v32", 1, 2, None),
           ("deepseek_v32", 2, 2, None), ("deepseek_v32", 1, 3, None),
           ("glm_moe_dsa", 1, 1, None), ("glm_moe_dsa", 2, 1, "3,1"), ("glm_moe_dsa", 1, 3, None)]
# (checkpoint, --quantization): bf16 weights, fp8 quantized at load, an fp8 checkpoint's own (DeepSeek only)
WEIGHTS = [("bf16", "none"), ("bf16", "fp8"), ("fp8", "auto")]
CASES = [(*lay, ck, q) for lay in LAYOUTS for ck, q in WEIGHTS if ck == "bf16" or lay[0] == "deepseek_v32"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("arch,pp,cp,partition,ckpt,quantization", CASES,
                         ids=[f"{a[:3]}-{p}x{c}-{ck}-{q}" for a, p, c, _, ck, q in CASES])
def test_plan_equals_engine_allocation(tiny_dirs, arch, pp, cp, partition, dtype, ckpt, quantization):
    """Weights by kind and KV bytes of every rank == what ModelRunner / KVCache allocate, for the engine's
    by-expert split and each weight format; ``weight_stats()`` (what ``llm.stats()`` reports) agrees."""
    model_dir = tiny_dirs[arch + ("-fp8" if ckpt == "fp8" else "")]
    cfg = ModelConfig.from_hf(model_dir)
    layout = Layout.build(cfg, pp, cp, partition)
    fp8 = quantization == "fp8" or ckpt == "fp8"
    plan = mp.plan_memory(cfg, layout.stage_layers, cp, dtype=dtype, fp8_block=(128, 128) if fp8 else None,
                          indexer_fp8=False, max_model_len=200, page_size=PAGE)
    assert len(plan.ranks) == pp * cp
    for rank, runner in _runners(model_dir, cfg, layout, dtype, quantization):
        got = _allocated(runner)
        assert plan.ranks[rank].weights == got, f"rank {rank}"
        stats = runner.weight_stats()
        assert stats == {"quantization": "fp8" if fp8 else "none", "allocated": got, "plan": got}
        for kind in ("attention", "moe_routed", "norms_router"):
            assert got[kind] > 0, f"rank {rank} allocated no {kind}: the comparison would be vacuous"
        fp8_tensors = [n for n, t in runner.model.named_parameters() if t.dtype == torch.float8_e4m3fn]
        assert bool(fp8_tensors) == fp8 and all("kv_b_proj" not in n and "lm_head" not in n for n in fp8_tensors)
        num_pages = 4  # 256 slots: the plan counts max_model_len=200 tokens as 4 whole pages (+ the sink page)
        runner.allocate_cache(num_pages)
        cache = sum(t.numel() * t.element_size() for lc in runner.cache.layers.values()
                    for t in (lc.latent, lc.index_k, lc.index_scale) if t is not None)
        assert plan.ranks[rank].kv["total"] == cache, f"rank {rank}"


def test_kv_sizing_reserves_the_plans_transient_peak(tiny_dirs):
    """On CUDA the runner proposes (available - plan transient peak - runtime headroom) / bytes per token."""
    from dsaserve.args import EngineArgs
    from dsaserve.cache.kv_cache import KVCache
    from dsaserve.runtime.runner import ModelRunner

    cfg = ModelConfig.from_hf(tiny_dirs["deepseek_v32"])
    layout = Layout.build(cfg, 1, 2)
    reserves = {}
    for topk in ("unfused", "fused"):  # the fused top-k has a fixed workspace instead of the logits block
        args = EngineArgs(page_size=PAGE, indexer_mode="fp8", chunked_prefill_size=512, indexer_topk=topk)
        runner = ModelRunner(tiny_dirs["deepseek_v32"], cfg, layout.rank_view(1).shard(), args,
                             device=torch.device("cpu"), dtype=torch.bfloat16, progress=False)
        phases = mp.prefill_transients(cfg, range(4), chunk_tokens=512, context_tokens=2048, cp_rank=1,
                                       cp_size=2, dtype="bfloat16", indexer_fp8=True, fused_topk=topk == "fused")
        reserves[topk] = reserved = mp.transient_peak(phases)[0] + int(mp.RUNTIME_HEADROOM_GIB * mp.GIB)
        assert runner.kv_reserved_bytes(2048) == reserved, topk
    assert reserves["fused"] != reserves["unfused"]
    runner.device = torch.device("cuda")  # the arithmetic of the CUDA branch, with the free memory given
    per_token = KVCache.bytes_per_token(cfg, 4, torch.bfloat16, True)
    available = reserved + 1001 * PAGE * per_token - 1                    # whole pages only
    assert runner.propose_num_pages(2048, available_bytes=available) == 1000
    assert runner.propose_num_pages(2048, available_bytes=reserved // 2) == 1  # at least one page


@pytest.mark.parametrize("arch", ["deepseek_v32", "glm_moe_dsa"])
@pytest.mark.parametrize("indexer_fp8", [True, False], ids=["fp8-indexer", "exact-indexer"])
def test_kv_bytes_equal_allocated_cache(tiny_dirs, arch, indexer_fp8):
    """Latent and indexer-key bytes separately, on a stage that includes GLM's shared (cache-less) layer."""
    from dsaserve.cache.kv_cache import KVCache

    cfg = ModelConfig.from_hf(tiny_dirs[arch])
    layers = range(1, 4)
    for dtype in (torch.bfloat16, torch.float32):
        cache = KVCache(cfg, layers, num_pages=3, page_size=PAGE, dtype=dtype, device="cpu", indexer_fp8=indexer_fp8)
        latent = sum(lc.latent.numel() * lc.latent.element_size() for lc in cache.layers.values())
        keys = sum(t.numel() * t.element_size() for lc in cache.layers.values()
                   for t in (lc.index_k, lc.index_scale) if t is not None)
        # 3 * PAGE - 5 tokens round up to 3 pages; the cache holds one sink page more
        want = mp.kv_cache_bytes(cfg, layers, 3 * PAGE - 5, dtype, indexer_fp8, page_size=PAGE)
        assert want == {"latent": latent, "indexer_keys": keys, "total": latent + keys}
    full = sum(cfg.has_indexer(i) for i in layers)
    assert full == (2 if arch == "glm_moe_dsa" else 3)
    per = mp.kv_bytes_per_token(cfg, layers, "bfloat16", indexer_fp8)
    assert per["indexer_keys"] == full * ((64 + 4) if indexer_fp8 else 64 * 2)  # tiny index_head_dim = 64


def test_kv_tokens_that_fit():
    cfg = ModelConfig.from_dict(tiny_config_dict("deepseek_v32"))
    layers = range(4)
    per = sum(mp.kv_bytes_per_token(cfg, layers, "bfloat16", True).values())  # 4 * (80 * 2 + 64 + 4) = 912
    assert per == 912
    # whole pages only, one of them the sink page
    assert mp.kv_tokens_that_fit(cfg, layers, 912 * 130, "bfloat16", True, page_size=64) == 64
    assert mp.kv_tokens_that_fit(cfg, layers, 912 * 127, "bfloat16", True, page_size=64) == 0
    assert mp.kv_tokens_that_fit(cfg, layers, 912 * 192, "bfloat16", True, page_size=64) == 128
    assert mp.kv_tokens_that_fit(cfg, layers, -1, "bfloat16", True) == 0


# ---- fp8 and expert-parallel accounting against hand-computed numbers --------------------------------
def _odd_config(**overrides) -> ModelConfig:
    """Dims that are not multiples of the 128 block: partial scale blocks everywhere."""
    raw = tiny_config_dict("deepseek_v32", hidden_size=256, q_lora_rank=192, kv_lora_rank=64, qk_rope_head_dim=16,
                           qk_nope_head_dim=32, v_head_dim=32, num_attention_heads=4, index_n_heads=4,
                           index_head_dim=64, intermediate_size=300, moe_intermediate_size=200, n_routed_experts=4,
                           n_group=1, topk_group=1, vocab_size=1000, num_hidden_layers=2, first_k_dense_replace=1)
    raw.update(overrides)
    return ModelConfig.from_dict(raw)


def test_fp8_weight_bytes_by_hand():
    cfg = _odd_config()
    got = mp.rank_weight_bytes(cfg, range(2), dtype="bfloat16", fp8_block=(128, 128), moe_split="expert")
    # per linear [out, in], as the engine allocates it: e4m3 [round16(out), round16(in)] + 4 bytes per scale of
    # [ceil(out/128), round4(ceil(in/128))] (the kernels' layout)
    q_a = 192 * 256 + 4 * 2 * 4          # [192, 256]
    q_b = 192 * 192 + 4 * 2 * 4          # [4 heads * 48, 192]
    kv_a = 80 * 256 + 4 * 1 * 4          # [64 + 16, 256]
    kv_b = 256 * 64 * 2                  # [4 * (32 + 32), 64]: stays bf16 (absorbed attention reads it per head)
    o = 256 * 128 + 4 * 2 * 4            # [256, 4 * 32]
    assert got["attention"] == 2 * (q_a + q_b + kv_a + kv_b + o) == 2 * 172144
    wq_b = 256 * 192 + 4 * 2 * 4         # [4 * 64, 192]
    wk = 64 * 256 + 4 * 1 * 4            # [64, 256]
    weights_proj = 4 * 256 * 4           # fp32, never quantized
    assert got["indexer"] == 2 * (wq_b + wk + weights_proj) == 2 * 69680
    dense = 2 * (304 * 256 + 4 * 3 * 4) + (256 * 304 + 4 * 2 * 4)   # 300 rows / columns padded to 304
    assert got["dense_mlp"] == dense == 233600
    # a routed expert pads its intermediate dim 200 to a whole block (256): gate+up [2*256, 256] with scales
    # [4, 2], down [256, 256] with scales [2, 2]; plus the global -> local expert map (4 experts, int32)
    expert = 2 * 256 * 256 + 4 * 4 * 2 + 256 * 256 + 4 * 2 * 2
    assert got["moe_routed"] == 4 * expert + 4 * 4 == 4 * 196656 + 16
    shared = 2 * (208 * 256 + 4 * 2 * 4) + (256 * 208 + 4 * 2 * 4)   # Fp8Linear layers: 200 padded to 208
    assert got["moe_shared"] == shared == 159840
    assert got["embedding"] == got["lm_head"] == 1000 * 256 * 2  # bf16 in DeepSeek's fp8 checkpoints too
    # bf16 norms: per layer input/post-attention [256] x2, q_a [192], kv_a [64], k_norm weight + bias [64] x2;
    # then the final norm [256]
    norms = 2 * (2 * (2 * 256 + 192 + 64 + 2 * 64) + 256)
    router = 4 * (4 * 256 + 4)                                    # fp32 gate + correction bias, 1 MoE layer
    assert got["norms_router"] == norms + router + 4 * 8          # + fp32 rope table [rope / 2]


def test_fp8_intermediate_split_keeps_every_touched_scale_block():
    cfg = _odd_config()
    r0, r1 = (mp.rank_weight_bytes(cfg, range(2), cp_rank=c, cp_size=2, dtype="bfloat16", fp8_block=(128, 128),
                                   moe_split="intermediate") for c in range(2))
    # rows [0, 100) touch scale block 0 only; rows [100, 200) touch blocks 0 and 1
    assert r0["moe_routed"] == 4 * (2 * (100 * 256 + 4 * 1 * 2) + (256 * 100 + 4 * 2 * 1)) == 4 * 76824
    assert r1["moe_routed"] == 4 * (2 * (100 * 256 + 4 * 2 * 2) + (256 * 100 + 4 * 2 * 2)) == 4 * 76848
    assert r0["moe_shared"] == 76824 and r1["moe_shared"] == 76848
    assert r0["attention"] == r1["attention"] == 2 * 172144            # replicated


def test_expert_parallel_uneven_split():
    """8 experts over 3 ranks: 2, 3, 3 whole experts; shared expert and router replicated."""
    cfg = ModelConfig.from_dict(tiny_config_dict("deepseek_v32"))   # 8 experts, inter 32, hidden 128, 3 MoE layers
    assert [list(mp.local_experts(8, c, 3)) for c in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    per_expert = 3 * 32 * 128 * 2
    expert_map = 8 * 4                                              # per MoE layer, on every rank
    ranks = [mp.rank_weight_bytes(cfg, range(4), cp_rank=c, cp_size=3, dtype="bfloat16", moe_split="expert")
             for c in range(3)]
    assert [r["moe_routed"] for r in ranks] == [3 * (2 * per_expert + expert_map), 3 * (3 * per_expert + expert_map),
                                                3 * (3 * per_expert + expert_map)]
    assert all(r["moe_shared"] == 3 * per_expert for r in ranks)
    assert all(r["norms_router"] == ranks[0]["norms_router"] for r in ranks)
    whole = mp.rank_weight_bytes(cfg, range(4), dtype="bfloat16")
    # every expert held exactly once
    assert sum(r["moe_routed"] for r in ranks) - 2 * 3 * expert_map == whole["moe_routed"] == 3 * (8 * per_expert
                                                                                                  + expert_map)
    # the intermediate split (no expert map) holds the same routed total, spread over all experts
    inter = [mp.rank_weight_bytes(cfg, range(4), cp_rank=c, cp_size=3, dtype="bfloat16", moe_split="intermediate")
             for c in range(3)]
    assert sum(r["moe_routed"] for r in inter) == 3 * 8 * per_expert
    # more ranks than experts: the extra ranks hold none (and still the map)
    few = ModelConfig.from_dict(tiny_config_dict("deepseek_v32", n_routed_experts=2, n_group=1, topk_group=1))
    assert [mp.rank_weight_bytes(few, range(4), cp_rank=c, cp_size=3, dtype="bfloat16")["moe_routed"]
            for c in range(3)] == [3 * 2 * 4, 3 * (per_expert + 2 * 4), 3 * (per_expert + 2 * 4)]


def test_bad_options_raise_config_error():
    cfg = ModelConfig.from_dict(tiny_config_dict("deepseek_v32"))
    with pytest.raises(mp.ConfigError, match="moe_split"):
        mp.rank_weight_bytes(cfg, range(4), moe_split="rows")
    with pytest.raises(mp.ConfigError, match="cover layers"):
        mp.plan_memory(cfg, [range(0, 2), range(3, 4)], 1)
    with pytest.raises(mp.ConfigError, match="dtype"):
        mp.dtype_bytes("int8")


# ---- transients ---------------------------------------------------------------------------------------
def test_cp_row_count_matches_the_runtime_split():
    """The plan mirrors runtime.cp.local_count (the model layer cannot import the runtime)."""
    from dsaserve.runtime import cp

    for tokens in (1, 7, 64, 8191, 8192):
        for c in (1, 2, 3, 8):
            for split in mp.CP_SPLITS:
                assert mp.local_rows(tokens, c, split) == cp.local_count(tokens, c, split)


def test_logits_buffer_block_and_fused_topk():
    cfg = ModelConfig.from_dict(json.load(open(os.path.join(CONFIGS, "deepseek_v32.json"))))
    layers = range(3, 5)
    kw = dict(chunk_tokens=16384, context_tokens=131072, cp_size=2, dtype="bfloat16", indexer_fp8=True)
    unfused = mp.prefill_transients(cfg, layers, **kw)
    fused = mp.prefill_transients(cfg, layers, fused_topk=True, **kw)
    # 8192 local queries; a logits block holds 1 GiB / (4 B * 131072 keys) = 2048 queries
    sel = unfused["indexer top-k"]
    assert sel["indexer logits [2048 x N] fp32"] == 2048 * 131072 * 4 == 1 << 30
    assert sel["top-k temporaries [2048 x topk]"] == 2048 * 2048 * 25
    gone = {k: v for k, v in sel.items() if k not in fused["indexer top-k"]}
    assert set(gone) == {"indexer logits [2048 x N] fp32", "top-k temporaries [2048 x topk]"}
    # instead: the fused kernel's fixed workspace, 264 programs x 4 rows x (8192 slots x 8 B + 16 x 64 fp32)
    assert fused["indexer top-k"]["fused top-k workspace (2 programs per SM)"] == 264 * 4 * (8192 * 8 + 16 * 64 * 4)
    # and, on Hopper (64 index heads, 128K keys), the threshold top-k's candidates (16 streams x 448 slots x 8 B,
    # a count each, a threshold) and its sample block: 4096 rows x 4096 sampled keys fp32, and those keys gathered
    # (128 fp8 + a fp32 scale + an int64 column each); the selects allocate nothing (the old torch.topk block of
    # 4096 x 2048 x 32 B is not counted any more)
    th = {k: v for k, v in fused["indexer top-k"].items() if k.startswith("threshold")}
    assert th == {"threshold top-k candidates [n x 16 x 448] int64 + counts": 8192 * (16 * (448 * 8 + 4) + 4),
                  "threshold top-k sample block [4096 x N/32] fp32 + sampled keys": 4096 * 4096 * 4 + 4096 * 140}
    assert not any(k.startswith("threshold") for k in unfused["indexer top-k"])
    # the exact indexer has no fused kernel: its logits block is counted whatever fused_topk says
    exact = dict(kw, indexer_fp8=False)
    assert mp.prefill_transients(cfg, layers, fused_topk=True, **exact) == mp.prefill_transients(cfg, layers, **exact)
    assert {k: v for k, v in unfused.items() if k != "indexer top-k"} == \
        {k: v for k, v in fused.items() if k != "indexer top-k"}
    # short context: the logits block is all local queries
    short = mp.prefill_transients(cfg, layers, chunk_tokens=4096, context_tokens=8192, cp_size=1, dtype="bfloat16")
    assert short["indexer top-k"]["indexer logits [4096 x N] fp32"] == 4096 * 8192 * 4
    # no indexer work at all when the context fits in index_topk
    assert "indexer top-k" not in mp.prefill_transients(cfg, layers, chunk_tokens=1024, context_tokens=2048)


def test_fp8_linears_hold_the_input_norms_copy_through_the_attention():
    """With fp8 linears the input norm writes the projections' e4m3 copy (+ 56 fp32 scales a row at hidden 7168),
    alive through every attention phase and in no other."""
    cfg = ModelConfig.from_dict(json.load(open(os.path.join(CONFIGS, "deepseek_v32.json"))))
    kw = dict(chunk_tokens=8192, context_tokens=65536, cp_rank=0, cp_size=2, dtype="bfloat16")
    plain = mp.prefill_transients(cfg, range(3, 5), **kw)
    fp8 = mp.prefill_transients(cfg, range(3, 5), fp8_linears=True, **kw)
    label = "input norm's fp8 copy [n x hidden] e4m3 + scales"
    attention = {"attention projections", "indexer top-k", "sparse attention"}
    assert {p for p, bufs in fp8.items() if label in bufs} == attention
    for phase in fp8:
        extra = {k: v for k, v in fp8[phase].items() if plain[phase].get(k) != v}
        assert extra == ({label: 4096 * (7168 + 4 * 56)} if phase in attention else {}), phase


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-experts", "fp8-experts"])
def test_moe_gather_and_peak(fp8):
    cfg = ModelConfig.from_dict(json.load(open(os.path.join(CONFIGS, "deepseek_v32.json"))))
    ph = mp.prefill_transients(cfg, range(3, 5), chunk_tokens=8190, context_tokens=65536, cp_rank=0, cp_size=8,
                               dtype="bfloat16", moe_split="expert", fp8_experts=fp8)
    n = 1024                                             # ceil(8190 / 8): ranks hold equal, padded shards
    G = 8 * n                                            # rows after the CP all-gather
    assert ph["residual"] == {"hidden + residual [n x hidden] x2": 2 * n * 7168 * 2}
    # routed tokens (bf16, or e4m3 + 56 fp32 scales) + fp32 routing (ids, weights) + int64 ids after the gather
    x_row = 7168 + 4 * 56 if fp8 else 7168 * 2
    side = 4 * ((56 if fp8 else 0) + 16)
    assert ph["MoE experts"]["gathered routed tokens + routing [G rows]"] == G * (x_row + side + 64)
    # the grouped GEMMs' buffers hold every (token, slot) of the gathered tokens: G * 8 rows
    rows = G * 8
    if fp8:
        assert ph["MoE experts"]["silu(gate)*up e4m3 + scales, down out [G*8 rows]"] == \
            rows * (2048 + 4 * 16 + 7168 * 2)
    else:
        assert ph["MoE experts"]["gathered rows, gate_up, silu*up, down out [G*8 rows]"] == \
            rows * (7168 + 2 * 2048 + 2048 + 7168) * 2
    # the router sees this rank's own tokens only
    assert ph["MoE router"]["router scores, biased, masked [n x experts] fp32"] == 3 * n * 256 * 4
    peak, phase = mp.transient_peak(ph)
    assert phase == "MoE experts"
    assert peak == sum(ph["residual"].values()) + sum(ph["MoE experts"].values())
    assert all(sum(v.values()) <= peak for v in ph.values())


def test_moe_comm_bytes_by_hand():
    """Per rank per 64K prompt, V3.2 layers 3..4 (both MoE) at CP8, chunks of 8190 (the last one 16 tokens):
    before (intermediate split) = bf16 gather + scatter; after = bf16 / e4m3 gather, routing, bf16 scatter.
    The engine's counters equal the "expert" numbers (tests/parallel/test_expert_parallel.py)."""
    cfg = ModelConfig.from_dict(json.load(open(os.path.join(CONFIGS, "deepseek_v32.json"))))
    kw = dict(prompt_tokens=65536, chunk_tokens=8190, cp_size=8, dtype="bfloat16")
    rows = 2 * 7 * (8 * 1024 + 2)               # 2 layers x 7 peers x (8 chunks of 1024 rows + one of 2 rows)
    before = mp.moe_comm_bytes(cfg, range(3, 5), moe_split="intermediate", **kw)
    assert before == {"moe_gather": rows * 7168 * 2, "moe_scatter": rows * 7168 * 2}
    after = mp.moe_comm_bytes(cfg, range(3, 5), **kw)
    assert after == {"moe_gather": rows * 7168 * 2, "moe_route_gather": rows * 4 * 16, "moe_scatter": rows * 7168 * 2}
    fp8 = mp.moe_comm_bytes(cfg, range(3, 5), fp8_experts=True, **kw)
    assert fp8 == {"moe_gather": rows * 7168, "moe_route_gather": rows * 4 * (56 + 16), "moe_scatter": rows * 7168 * 2}
    # dense layers move nothing; one rank moves nothing
    assert set(mp.moe_comm_bytes(cfg, range(0, 3), **kw).values()) == {0}
    assert set(mp.moe_comm_bytes(cfg, range(3, 5), **{**kw, "cp_size": 1}).values()) == {0}
    with pytest.raises(mp.ConfigError, match="moe_split"):
        mp.moe_comm_bytes(cfg, range(3, 5), moe_split="ring", **kw)


@pytest.mark.parametrize("name,low,high", [("deepseek_v32", 671.0e9, 673.0e9), ("glm5", 743.0e9, 745.0e9)])
def test_real_config_parameter_counts(name, low, high):
    """Whole-model accounting vs the published sizes: DeepSeek-V3.2 671B (+ ~0.85B of indexers; the MTP
    layer is not part of the served model), GLM-5 744B."""
    cfg = ModelConfig.from_dict(json.load(open(os.path.join(CONFIGS, f"{name}.json"))))
    w = mp.rank_weight_bytes(cfg, range(cfg.num_hidden_layers), dtype="float32")  # 4 B per value
    assert low < sum(w.values()) / 4 < high
    n_moe = cfg.num_hidden_layers - 3
    assert w["moe_routed"] == n_moe * (4 * 256 * 3 * 2048 * cfg.hidden_size + 4 * 256)  # + the int32 expert map


# ---- CLI ------------------------------------------------------------------------------------------------
def _plan_cli(capsys, *args):
    rc = cli_main(["plan", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_real_config_json_matches_module(capsys):
    path = os.path.join(CONFIGS, "deepseek_v32.json")
    rc, out, _ = _plan_cli(capsys, "--model", path, "--pp-size", "2", "--cp-size", "8", "--gpu-memory-gb", "140.4",
                           "--max-model-len", "65536", "--json")
    assert rc == 0
    got = json.loads(out)
    cfg = ModelConfig.from_dict(json.load(open(path)))
    want = mp.plan_memory(cfg, Layout.build(cfg, 2, 8).stage_layers, 8, dtype="bfloat16", fp8_block=(128, 128),
                          max_model_len=65536, chunk_tokens=8192, fused_topk=True,   # the CLI's default
                          gpu_memory_bytes=int(140.4 * mp.GIB))
    assert got["fits"] is True and len(got["ranks"]) == 16
    for g, w in zip(got["ranks"], want.ranks):
        assert g["weights"] == w.weights and g["kv_cache"] == w.kv and g["total"] == w.total
        assert g["transients"] == w.transients and g["fits"] is True
    assert got["ranks"][0]["weights"]["embedding"] > 0 and got["ranks"][0]["weights"]["lm_head"] == 0
    assert got["ranks"][15]["weights"]["lm_head"] > 0 and got["ranks"][15]["layers"] == [30, 61]


def test_cli_exit_codes_and_table(capsys, tiny_dirs):
    path = os.path.join(CONFIGS, "deepseek_v32.json")
    rc, out, _ = _plan_cli(capsys, "--model", path, "--pp-size", "2", "--cp-size", "8", "--gpu-memory-gb", "40")
    assert rc == 1 and "DOES NOT FIT" in out
    rc, out, _ = _plan_cli(capsys, "--model", path, "--pp-size", "2", "--cp-size", "8", "--quantization", "none",
                           "--gpu-memory-gb", "140.4", "--max-model-len", "131072")
    assert rc == 0 and "FITS on every rank" in out and "ranks 8-15" in out
    # a checkpoint folder works too; 8 experts over 3 ranks: rank 0 (2 experts) differs from ranks 1-2 (3 each)
    rc, out, _ = _plan_cli(capsys, "--model", tiny_dirs["deepseek_v32"], "--cp-size", "3", "--max-model-len", "512")
    assert rc == 0 and "rank 0 " in out and "ranks 1-2" in out and "(2/3 of 8)" in out


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "neither a checkpoint folder nor a config.json"),
    (["--pp-size", "2", "--pp-layer-partition", "30,30"], "sums to 60 layers"),
    (["--cp-size", "0"], "--cp-size must be >= 1"),
    (["--gpu-memory-gb", "-1"], "--gpu-memory-gb must be > 0"),
])
def test_cli_bad_input_names_the_problem(capsys, args, message):
    if "--model" not in args:
        args = ["--model", os.path.join(CONFIGS, "deepseek_v32.json"), *args]
    rc, _, err = _plan_cli(capsys, *args)
    assert rc == 2 and message in err


def test_bench_configs_parse():
    for name in ("deepseek_v32", "glm5", "dsv32_4layer_256e", "dsv32_8layer_32e"):
        cfg = ModelConfig.from_dict(json.load(open(os.path.join(CONFIGS, f"{name}.json"))), name)
        assert cfg.num_hidden_layers == {"deepseek_v32": 61, "glm5": 78, "dsv32_4layer_256e": 4,
                                         "dsv32_8layer_32e": 8}[name]
    small = ModelConfig.from_dict(json.load(open(os.path.join(CONFIGS, "dsv32_4layer_256e.json"))))
    assert small.mlp_layer_types == ["dense", "sparse", "sparse", "sparse"] and small.n_routed_experts == 256
