"""GPU memory of every rank of a PP x CP deployment, computed from a ``ModelConfig`` alone.

Pure arithmetic (no tensor is ever allocated), so it answers for the real 671B config on a laptop. The
same functions serve ``dsaserve plan`` (what fits where), the runtime (how many KV tokens fit next to its
weights: ``kv_bytes_per_token`` / ``kv_tokens_that_fit``) and the tests (plan == what the engine allocates).

Sharding model (one rank = one GPU; world = PP stages x C CP ranks per stage):
  * stage s holds a contiguous layer range (the caller passes the ranges, e.g. from
    ``dsaserve.parallel.layout.stage_layer_ranges``); the embedding lives on the first stage, the final
    norm + lm_head on the last (an lm_head is allocated even with tied embeddings, like the engine does);
  * attention (MLA projections) and the indexer are replicated over the stage's C ranks, and so is the
    dense MLP of the first layers;
  * MoE, ``moe_split="expert"`` (expert parallelism, what the engine does): rank r of C holds the routed
    experts [r*E//C, (r+1)*E//C) whole (uneven splits such as 8 experts over 3 ranks: 2, 3, 3) plus a
    global -> local expert map (E int32); the shared expert is replicated (it runs on each rank's own
    tokens); ``moe_split="intermediate"`` (the engine before issue 11, kept for comparison): every routed
    expert AND the shared expert is split along its intermediate dim into C near-equal row ranges
    [r*I//C, (r+1)*I//C);
  * the MoE router (gate weight + e_score_correction_bias) is replicated and kept in fp32.

Weight formats:
  * ``fp8_block=None`` ("none"): every tensor in the model dtype, except the fp32 ones below;
  * ``fp8_block=(128, 128)`` ("fp8"): the linear weights that DeepSeek's fp8 checkpoints store as e4m3 and
    the engine keeps in e4m3 -- MLA q_a / q_b / kv_a_with_mqa / o_proj, indexer wq_b / wk, dense MLP and
    routed + shared expert gate / up / down -- take 1 byte per value plus one fp32 scale per 128 x 128
    block, in the layout the engine allocates for its kernels (``kernels.fp8_linear`` /
    ``kernels.grouped_moe``): a linear [out, in] is stored [round_up(out, 16), round_up(in, 16)] with
    scales [ceil(out/128), round_up(ceil(in/128), 4)] (DeepSeek's real shapes need no padding); routed
    experts pad their intermediate dim to a whole block. Unquantized whatever the format: embed_tokens and
    lm_head (model dtype), kv_b_proj (model dtype: the absorbed attention multiplies by its per-head views
    every step, so an fp8 checkpoint's kv_b is dequantized at load), all RMSNorm weights and the indexer's
    k_norm LayerNorm (model dtype), the indexer's weights_proj (bf16 in the checkpoint, fp32 in memory: the
    per-head weights are computed in fp32), the router gate (bf16 in the checkpoint, fp32 in memory) and
    its correction bias (fp32). ``moe_split="intermediate"`` counts its fp8 parts without padding (a rank
    holding rows [a, b) of a split weight keeps every scale block those rows touch);
  * always fp32: the rotary inverse-frequency table (qk_rope_head_dim / 2 values per stage).

KV cache per token per layer: kv_lora_rank + qk_rope_head_dim values in the model dtype (the MLA latent and
roped shared key), plus, on layers with their own indexer (``cfg.has_indexer``; GLM "shared" layers have
none), the indexer key: index_head_dim e4m3 bytes + one fp32 scale (fp8 indexer) or index_head_dim values
in the model dtype (exact indexer). The cache is allocated in whole pages of ``page_size`` slots, plus one
sink page that the padding rows of a CUDA-graph decode step write to (``KVCache.sink_slot``), and every
CP rank of a stage caches every token of the stage's layers (the CP all-gather writes all ranks' keys).

Prefill transients: the largest short-lived buffers of one prefill step of ``chunk_tokens`` prompt tokens
whose context reaches ``context_tokens``, on the CUDA kernel path of the engine, grouped by the phase in
which they are alive together (see ``prefill_transients``); the step's peak is the residual stream plus
the largest phase. It is an estimate of the large buffers (those growing with tokens x hidden, heads or
context), not of every temporary; ``benchmarks/plan_check.py`` compares it with ``torch.cuda`` on a GPU.
The unfused indexer materializes fp32 logits [query block x context] where the query block is capped at
``UNFUSED_LOGITS_BLOCK_BYTES`` (the engine's cap); ``fused_topk=True`` (the fused indexer top-k, the
engine's default for the fp8 indexer) drops that buffer and counts the kernel's fixed workspace instead
(the exact indexer always materializes logits). ``moe_split="expert"`` follows the engine's grouped path:
each rank routes its own tokens, the stage's routed tokens are all-gathered (e4m3 + scales when the
experts are fp8), the grouped GEMMs allocate their permuted buffers for every (token, slot) of the
gathered tokens (sized by tokens x top-k, whatever the routing), and the partial sums are reduce-scattered.

Headroom: on top of all the above a rank needs memory that no tensor accounts for -- the CUDA context
(~0.5-1 GiB), NCCL communicator buffers (CP and PP groups), cuBLAS / Triton workspaces and the caching
allocator's fragmentation. The plan reserves ``headroom_bytes`` for it (``DEFAULT_HEADROOM_GIB``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from dsaserve.args import CP_SPLITS
from dsaserve.checkpoint.spec import part_range
from dsaserve import kernels
from dsaserve.config import ConfigError, ModelConfig
from dsaserve.model.attention import _ATTN_BLOCK_ELEMS
from dsaserve.model.indexer import _LOGITS_BLOCK_BYTES, _SCORE_BLOCK_ELEMS

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
FP8_SCALE_BYTES = 4              # one fp32 scale_inv per weight block
INDEXER_KEY_SCALE_BYTES = 4      # one fp32 scale per cached fp8 indexer key
WEIGHT_KINDS = ("attention", "indexer", "moe_routed", "moe_shared", "dense_mlp", "embedding", "lm_head",
                "norms_router")
MOE_SPLITS = ("expert", "intermediate")
DEFAULT_HEADROOM_GIB = 4.0
# What a live engine keeps free beyond the plan's transients when it sizes its KV cache: the default
# headroom less the CUDA context (~1 GiB), which the process has already paid when it measures free memory.
RUNTIME_HEADROOM_GIB = 3.0
# the engine's fp8 weight layout (kernels.fp8_linear.prepare_fp8_weight): rows / columns to 16, scale columns to 4
FP8_ALIGN = 16
FP8_SCALE_COL_ALIGN = 4
# The model's own block caps, which bound its largest transients.
UNFUSED_LOGITS_BLOCK_BYTES = _LOGITS_BLOCK_BYTES   # cap of one [queries, keys] fp32 logits block
EXACT_SCORE_BLOCK_ELEMS = _SCORE_BLOCK_ELEMS       # cap of one exact-indexer [queries, heads, keys] block
ATTN_BLOCK_ELEMS = _ATTN_BLOCK_ELEMS               # cap of one absorbed-query block
FUSED_TOPK_SMS = 132                               # SMs the fused top-k workspace is sized for (H200)


def dtype_bytes(dtype: Any) -> int:
    """Bytes per value of a dtype given by name ("bfloat16"), as an object with ``itemsize`` (torch.dtype)
    or directly as a byte count."""
    if isinstance(dtype, int) and not isinstance(dtype, bool) and dtype in (1, 2, 4, 8):
        return dtype
    if isinstance(dtype, str):
        if dtype not in DTYPE_BYTES:
            raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_BYTES)}")
        return DTYPE_BYTES[dtype]
    size = getattr(dtype, "itemsize", None)
    if not isinstance(size, int):
        raise ConfigError(f"cannot tell the size of dtype {dtype!r}")
    return size


def local_experts(n_experts: int, cp_rank: int, cp_size: int) -> range:
    """Routed experts a CP rank holds under expert parallelism."""
    return range(*part_range(n_experts, cp_rank, cp_size))


def local_rows(num_tokens: int, cp_size: int, cp_split: str = "round-robin") -> int:
    """Rows each CP rank holds for a step of ``num_tokens`` (padded to equal sizes, like dsaserve.parallel.cp)."""
    if cp_split not in CP_SPLITS:
        raise ConfigError(f"cp_split must be one of {', '.join(CP_SPLITS)}, got {cp_split!r}")
    if cp_size == 1:
        return num_tokens
    unit = cp_size if cp_split == "round-robin" else 2 * cp_size
    return -(-num_tokens // unit) * unit // cp_size


def _blocks(start: int, stop: int, block: int) -> int:
    """Number of ``block``-sized tiles that rows [start, stop) touch."""
    return 0 if stop <= start else -(-stop // block) - start // block


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


@dataclass(frozen=True)
class WeightFormat:
    """How one rank stores its weights: the model dtype, and fp8 blocks for the quantizable linears."""

    dtype_bytes: int
    fp8_block: tuple[int, int] | None = None

    def linear(self, out_features: int, in_features: int) -> int:
        """Bytes of a whole quantizable linear weight [out, in] as the engine allocates it."""
        if self.fp8_block is None:
            return out_features * in_features * self.dtype_bytes
        bo, bi = self.fp8_block
        values = _round_up(out_features, FP8_ALIGN) * _round_up(in_features, FP8_ALIGN)
        scales = -(-out_features // bo) * _round_up(-(-in_features // bi), FP8_SCALE_COL_ALIGN)
        return values + FP8_SCALE_BYTES * scales

    def linear_part(self, rows: tuple[int, int], cols: tuple[int, int]) -> int:
        """Bytes of the [rows[0]:rows[1], cols[0]:cols[1]] part of a quantizable linear weight [out, in], unpadded
        (``moe_split="intermediate"``: every scale block the part touches)."""
        r, c = rows[1] - rows[0], cols[1] - cols[0]
        if self.fp8_block is None:
            return r * c * self.dtype_bytes
        bo, bi = self.fp8_block
        return r * c + FP8_SCALE_BYTES * _blocks(*rows, bo) * _blocks(*cols, bi)

    def routed_expert(self, inter: int, hidden: int) -> int:
        """One whole routed expert (gate + up [inter, hidden], down [hidden, inter]) as the engine stacks it:
        fp8 pads the intermediate dim to a whole block (``kernels.grouped_moe.LocalExperts``; square blocks,
        the engine's 128 x 128)."""
        if self.fp8_block is None:
            return 3 * inter * hidden * self.dtype_bytes
        b = self.fp8_block[0]
        i_blocks, h_blocks = -(-inter // b), -(-hidden // b)
        values = 3 * i_blocks * b * hidden                                     # gate + up + down, inter padded
        return values + FP8_SCALE_BYTES * 3 * i_blocks * h_blocks

    def plain(self, numel: int) -> int:
        """Bytes of a tensor kept in the model dtype (embedding, lm_head, norms, kv_b_proj)."""
        return numel * self.dtype_bytes


def rank_weight_bytes(cfg: ModelConfig, layers: range, *, cp_rank: int = 0, cp_size: int = 1,
                      dtype: Any = "bfloat16", fp8_block: tuple[int, int] | None = None,
                      moe_split: str = "expert") -> dict[str, int]:
    """Weight bytes of one rank by kind (``WEIGHT_KINDS``): the stage ``layers`` at CP index ``cp_rank``."""
    if moe_split not in MOE_SPLITS:
        raise ConfigError(f"moe_split must be one of {', '.join(MOE_SPLITS)}, got {moe_split!r}")
    if not 0 <= cp_rank < cp_size:
        raise ConfigError(f"cp_rank {cp_rank} is outside [0, cp_size={cp_size})")
    fmt = WeightFormat(dtype_bytes(dtype), fp8_block)
    h, H = cfg.hidden_size, cfg.num_attention_heads
    out = dict.fromkeys(WEIGHT_KINDS, 0)
    out["norms_router"] += FP32 * (cfg.qk_rope_head_dim // 2)                   # rotary inv_freq table
    if layers.start == 0:
        out["embedding"] += fmt.plain(cfg.vocab_size * h)
    if layers.stop == cfg.num_hidden_layers:
        out["lm_head"] += fmt.plain(cfg.vocab_size * h)
        out["norms_router"] += fmt.plain(h)                                       # final norm
    mla = (fmt.linear(cfg.q_lora_rank, h)
           + fmt.linear(H * cfg.qk_head_dim, cfg.q_lora_rank)
           + fmt.linear(cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
           + fmt.plain(H * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank)   # kv_b: never quantized
           + fmt.linear(h, H * cfg.v_head_dim))
    layer_norms = fmt.plain(2 * h + cfg.q_lora_rank + cfg.kv_lora_rank)     # input/post-attn, q_a, kv_a norms
    Hi, Di = cfg.index_n_heads, cfg.index_head_dim
    indexer = fmt.linear(Hi * Di, cfg.q_lora_rank) + fmt.linear(Di, h) + FP32 * Hi * h  # + weights_proj
    dense = 2 * fmt.linear(cfg.intermediate_size, h) + fmt.linear(h, cfg.intermediate_size)
    inter, E = cfg.moe_intermediate_size, cfg.n_routed_experts
    shared_inter = inter * cfg.n_shared_experts

    if moe_split == "expert":
        routed = len(local_experts(E, cp_rank, cp_size)) * fmt.routed_expert(inter, h) + 4 * E  # + expert map
        shared = (2 * fmt.linear(shared_inter, h) + fmt.linear(h, shared_inter)) if shared_inter else 0
    else:
        def part(rows: tuple[int, int]) -> int:
            """gate + up ([rows of inter] x hidden) and down (hidden x [rows of inter])."""
            return 2 * fmt.linear_part(rows, (0, h)) + fmt.linear_part((0, h), rows)

        routed = E * part(part_range(inter, cp_rank, cp_size))
        shared = part(part_range(shared_inter, cp_rank, cp_size)) if shared_inter else 0
    for i in layers:
        out["attention"] += mla
        out["norms_router"] += layer_norms
        if cfg.has_indexer(i):
            out["indexer"] += indexer
            out["norms_router"] += fmt.plain(2 * Di)                              # k_norm weight + bias
        if cfg.is_moe_layer(i):
            out["moe_routed"] += routed
            out["moe_shared"] += shared
            out["norms_router"] += FP32 * (E * h + E)                             # router gate + bias
        else:
            out["dense_mlp"] += dense
    return out


def weight_kind(name: str) -> str:
    """The ``WEIGHT_KINDS`` entry of a ``DSAModel`` parameter or buffer, from its module path."""
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
    raise ValueError(f"no weight kind for model tensor {name!r}")


def allocated_weight_bytes(model) -> dict[str, int]:
    """Bytes of every parameter and buffer of a built ``DSAModel`` (an ``nn.Module``), by ``weight_kind``."""
    out = dict.fromkeys(WEIGHT_KINDS, 0)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[weight_kind(name)] += t.numel() * t.element_size()
    return out


# ---- KV cache ----------------------------------------------------------------------------------------
def kv_bytes_per_token(cfg: ModelConfig, layers: range, dtype: Any, indexer_fp8: bool) -> dict[str, int]:
    """Cache bytes one token costs over ``layers``: {"latent": MLA latent + k_pe, "indexer_keys": ...}."""
    e = dtype_bytes(dtype)
    key = cfg.index_head_dim + INDEXER_KEY_SCALE_BYTES if indexer_fp8 else cfg.index_head_dim * e
    return {"latent": len(layers) * cfg.kv_cache_dim * e,
            "indexer_keys": sum(key for i in layers if cfg.has_indexer(i))}


def kv_cache_bytes(cfg: ModelConfig, layers: range, num_tokens: int, dtype: Any, indexer_fp8: bool,
                   page_size: int = 1) -> dict[str, int]:
    """Bytes of a cache holding ``num_tokens`` (rounded up to whole pages, plus the sink page), by part, plus
    "total"."""
    slots = (-(-num_tokens // page_size) + 1) * page_size
    per = kv_bytes_per_token(cfg, layers, dtype, indexer_fp8)
    out = {k: v * slots for k, v in per.items()}
    out["total"] = sum(out.values())
    return out


def kv_tokens_that_fit(cfg: ModelConfig, layers: range, budget_bytes: int, dtype: Any, indexer_fp8: bool,
                       page_size: int = 1) -> int:
    """Most cache tokens (whole pages, the sink page aside) that ``budget_bytes`` holds for ``layers`` (0 when
    not even one page besides the sink)."""
    per = sum(kv_bytes_per_token(cfg, layers, dtype, indexer_fp8).values())
    if per == 0 or budget_bytes <= 0:
        return 0
    return max(0, budget_bytes // (per * page_size) - 1) * page_size


# ---- prefill transients ------------------------------------------------------------------------------
def prefill_transients(cfg: ModelConfig, layers: range, *, chunk_tokens: int, context_tokens: int,
                       cp_rank: int = 0, cp_size: int = 1, dtype: Any = "bfloat16", indexer_fp8: bool = True,
                       fused_topk: bool = False, moe_split: str = "expert", cp_split: str = "round-robin",
                       fp8_experts: bool = False, fp8_linears: bool = False) -> dict[str, dict[str, int]]:
    """Short-lived buffers of one prefill step on the engine's CUDA path: {phase: {buffer: bytes}}.

    A phase lists the buffers alive together at its high-water mark; phases do not overlap, so a step
    needs ``residual`` + the largest other phase (``transient_peak``). Notation in the labels: n = this
    rank's rows (chunk / C, padded), G = C * n rows gathered over the stage, N = context tokens.
    ``fp8_linears``: the attention's input norm also makes the fp8 copy its projections read, alive while the
    layer's attention runs.
    """
    e = dtype_bytes(dtype)
    h, H = cfg.hidden_size, cfg.num_attention_heads
    n = local_rows(chunk_tokens, cp_size, cp_split)
    G = n * cp_size
    N = context_tokens
    L, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    Hi, Di, k = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    phases: dict[str, dict[str, int]] = {
        "residual": {"hidden + residual [n x hidden] x2": 2 * n * h * e},
    }
    held = {"q [n x heads x (nope+rope)]": n * H * cfg.qk_head_dim * e,           # alive through the attention
            "roped q_pe [n x heads x rope]": n * H * R * e}
    if fp8_linears:
        held["input norm's fp8 copy [n x hidden] e4m3 + scales"] = n * (h + FP32 * -(-h // 128))
    sparse = N > k  # below index_topk every key is attended and the indexer never runs
    has_indexer = any(cfg.has_indexer(i) for i in layers)
    proj = dict(held)
    key_bytes = Di + FP32 if indexer_fp8 else Di * e                              # one cached indexer key
    proj["CP gather of latent + indexer keys [G rows]"] = G * (cfg.kv_cache_dim * e + key_bytes)
    if has_indexer:
        # wq_b output and its roped copy in the model dtype, then two fp32 copies (float, Hadamard) before e4m3
        fp32_copies = 2 * FP32 if indexer_fp8 else 0
        proj["indexer q projection [n x idx_heads x idx_dim]"] = n * Hi * Di * (2 * e + fp32_copies)
    phases["attention projections"] = proj
    if has_indexer and sparse:
        sel = dict(held)
        sel["indexer q [n x idx_heads x idx_dim] + weights"] = n * Hi * (Di * (1 if indexer_fp8 else e) + FP32)
        sel["gathered indexer keys + slots [N]"] = N * (key_bytes + 8)
        sel["top-k slots [n x topk] int32"] = n * k * 4
        if fused_topk and indexer_fp8:  # the fused kernel (fp8 keys only): a fixed workspace, no logits
            sel["fused top-k workspace (2 programs per SM)"] = fused_topk_workspace_bytes(n, Hi, k)
            if Hi <= kernels.THRESHOLD_MAX_HEADS and N >= kernels.THRESHOLD_MIN_KEYS:  # on Hopper: the threshold top-k
                sel.update(threshold_topk_bytes(n, N, key_bytes))
        else:
            qb = min(n, max(1, UNFUSED_LOGITS_BLOCK_BYTES // (FP32 * N)))
            if not indexer_fp8:  # exact mode: fp32 [queries, heads, keys] scores bound the block further
                qb = min(qb, max(1, EXACT_SCORE_BLOCK_ELEMS // (Hi * N)))
                sel[f"exact scores [{qb} x idx_heads x N] fp32 + fp32 keys"] = qb * Hi * N * FP32 + N * Di * FP32
            sel[f"indexer logits [{qb} x N] fp32"] = qb * N * FP32
            # torch.topk values (fp32) + indices (int64), the validity mask, the int64 where, the int32 copy
            sel[f"top-k temporaries [{qb} x topk]"] = qb * k * (4 + 8 + 1 + 8 + 4)
        phases["indexer top-k"] = sel
    ab = min(n, max(1, ATTN_BLOCK_ELEMS // (H * (L + R))))
    attn = dict(held)
    attn["top-k slots [n x topk] int32"] = n * min(k, N) * 4
    attn[f"absorbed q block [{ab} x heads x (L + rope)] + q_lat + out_lat"] = (
        ab * H * ((L + R) + 2 * L) * e + ab * H * FP32)                            # + log-sum-exp [ab x heads]
    attn[f"per-head output block [{ab} x heads x v]"] = ab * H * cfg.v_head_dim * e
    attn["attention output [n x heads x v]"] = n * H * cfg.v_head_dim * e
    phases["sparse attention"] = attn
    if any(not cfg.is_moe_layer(i) for i in layers):
        I = cfg.intermediate_size
        phases["dense MLP"] = {"gate, up, silu, product [n x inter]": 4 * n * I * e, "down [n x hidden]": n * h * e}
    if any(cfg.is_moe_layer(i) for i in layers):
        phases.update(_moe_transients(cfg, n, G, cp_rank, cp_size, e, moe_split, fp8_experts))
    return phases


def threshold_topk_bytes(n: int, N: int, key_bytes: int) -> dict[str, int]:
    """The threshold top-k's own buffers (``kernels/threshold_topk.py``, default config) for n queries over N keys
    of key_bytes each: the filter's candidates [n x streams x caps] int64 with their counts and the rows'
    thresholds, and the sample block (the logits of ``rows`` queries over every stride-th key, and those keys
    gathered: counted though the Triton kernel reads them in place, as the other paths gather them;
    ``row_thresholds_triton`` and ``select_candidates_triton`` allocate nothing else). The rows it redoes run the
    fused Triton kernel, whose workspace the caller counts already ("fused top-k workspace"). The sample block is
    freed before the candidates and the workspace exist, so adding the three overcounts by the smaller of them."""
    from dsaserve.kernels.threshold_topk import STREAMS, ThresholdTopkConfig

    c = ThresholdTopkConfig()
    rows = min(n, c.rows)
    n_s = -(-N // c.stride)                                    # sampled keys
    return {f"threshold top-k candidates [n x {STREAMS} x {c.caps}] int64 + counts":
            n * STREAMS * (c.caps * 8 + 4) + n * FP32,
            f"threshold top-k sample block [{rows} x N/{c.stride}] fp32 + sampled keys":
            rows * n_s * FP32 + n_s * (key_bytes + 8)}


def fused_topk_workspace_bytes(n: int, idx_heads: int, topk: int, num_sms: int = FUSED_TOPK_SMS) -> int:
    """Workspace of one fused indexer top-k launch (``kernels/indexer_topk.py``) over n queries: per program
    BQ rows x (C candidate slots x 8 B + a ring of R x BK fp32 logits), 2 programs per SM (fewer when n is
    small), BQ = 256 / heads, C = next power of two >= 2 topk + 2 R BK, R = 16, BK = 64."""
    bq = max(1, min(16, 256 // idx_heads), -(-16 // idx_heads))
    ring, bk = 16, 64
    c = 1 << max(0, 2 * topk + 2 * ring * bk - 1).bit_length()
    programs = max(1, min(2 * num_sms, -(-n // bq)))
    return programs * bq * (c * 8 + ring * bk * FP32)


def _moe_transients(cfg: ModelConfig, n: int, G: int, cp_rank: int, cp_size: int, e: int, moe_split: str,
                    fp8_experts: bool) -> dict[str, dict[str, int]]:
    h, E, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    inter = cfg.moe_intermediate_size
    shared_inter = inter * cfg.n_shared_experts
    if moe_split == "intermediate":   # the engine before issue 11: route all gathered tokens, loop over experts
        gathered = {"gathered tokens [G x hidden]": G * h * e}
        router = dict(gathered)
        router["router fp32 input [G x hidden]"] = G * h * FP32
        router["router scores, biased, masked [G x experts] fp32"] = 3 * G * E * FP32
        routing = G * k * (8 + 4 + 8 + 8 + 8)  # ids, weights, flat ids, sort order, token of each slot
        i_loc = part_range(inter, cp_rank, cp_size)
        i_loc = i_loc[1] - i_loc[0]
        s_loc = part_range(shared_inter, cp_rank, cp_size)
        s_loc = s_loc[1] - s_loc[0]
        experts = dict(gathered)
        experts["partial output [G x hidden]"] = G * h * e
        experts["routing ids, weights, sort [G x top-k]"] = routing
        # worst case: one expert receives every gathered token (one expert at a time in the Python loop)
        experts["one expert: rows, gate_up, silu, product, out, scaled [G x ...]"] = (
            G * (h + 2 * i_loc + 2 * i_loc + 2 * h) * e)
        shared = dict(gathered)
        shared["partial output + sum [G x hidden] x2"] = 2 * G * h * e
        shared["shared expert gate, up, silu, product [G x inter/C]"] = 4 * G * s_loc * e
        shared["shared expert down [G x hidden]"] = G * h * e
    else:
        # tokens as the experts take them: model dtype, or e4m3 + one fp32 scale per 128 channels
        x_bytes = h + FP32 * -(-h // 128) if fp8_experts else h * e
        side = FP32 * ((-(-h // 128) if fp8_experts else 0) + 2 * k)      # scales, ids, weights: one fp32 gather
        # the router's fp32 product: x copied to fp32 (CPU), or the weight's exact bf16 split [3 x E x h] (GPU,
        # kernels/f32_linear.py); the larger of the two. (The 3 n E fp32 term is a leftover of session 11's dropped
        # one-GEMM split, whose [n x 3E] partials the Triton split GEMM does not allocate: an overcount, and the
        # larger term only below ~430 rows at V3.2's sizes; kept until a change that may move plan numbers.)
        router = {"router input: fp32 copy (CPU) or bf16 weight split + partials (GPU)":
                  max(n * h * FP32, 3 * E * h * 2 + 3 * n * E * FP32),
                  "router scores, biased, masked [n x experts] fp32": 3 * n * E * FP32,
                  "routed tokens + routing, local and gathered [(n + G) rows]": (n + G) * (x_bytes + side)}
        gathered = {"gathered routed tokens + routing [G rows]": G * (x_bytes + side + 8 * k)}
        experts = dict(gathered)
        # routing plan: expert map lookup, sort key, sort values + order (int64), sorted token, row of each slot
        experts["routing plan [G*top-k] (int32/int64)"] = G * k * (4 + 8 + 8 + 8 + 4 + 4 + 4)
        if fp8_experts:
            i_pad = -(-inter // 128) * 128
            experts[f"silu(gate)*up e4m3 + scales, down out [G*{k} rows]"] = (
                G * k * (i_pad + FP32 * i_pad // 128 + h * e))
        else:
            experts[f"gathered rows, gate_up, silu*up, down out [G*{k} rows]"] = G * k * (h + 2 * inter + inter + h) * e
        experts["combined partial output [G x hidden]"] = G * h * e
        shared = {"routed output [n x hidden]": n * h * e,
                  "shared expert gate, up, silu, product [n x inter]": 4 * n * shared_inter * e,
                  "shared expert down [n x hidden]": n * h * e}
    out = {"MoE router": router, "MoE experts": experts}
    if shared_inter:
        out["MoE shared expert"] = shared
    return out


def moe_comm_bytes(cfg: ModelConfig, layers: range, *, prompt_tokens: int, chunk_tokens: int, cp_size: int,
                   dtype: Any = "bfloat16", moe_split: str = "expert", fp8_experts: bool = False,
                   cp_split: str = "round-robin") -> dict[str, int]:
    """Bytes one CP rank moves for the MoE layers of ``layers`` during the prefill of one ``prompt_tokens``
    prompt (in ``chunk_tokens`` chunks), by ``StageComm`` counter kind (what ``llm.stats()`` reports:
    received from peers for gathers, partials sent to peers for reduce-scatters).

    expert (the engine): the routed tokens are all-gathered as the experts take them (model dtype, or e4m3
    when the experts are fp8), their fp8 scales + expert ids + weights in one fp32 gather; the partial
    outputs are reduce-scattered in the model dtype. intermediate (the engine before issue 11, for
    comparison): the normed tokens are all-gathered and the partial outputs reduce-scattered, model dtype.
    """
    if moe_split not in MOE_SPLITS:
        raise ConfigError(f"moe_split must be one of {', '.join(MOE_SPLITS)}, got {moe_split!r}")
    if prompt_tokens < 1 or chunk_tokens < 1:
        raise ConfigError(f"prompt_tokens and chunk_tokens must be >= 1, got {prompt_tokens}, {chunk_tokens}")
    kinds = ("moe_gather", "moe_scatter") if moe_split == "intermediate" else (
        "moe_gather", "moe_route_gather", "moe_scatter")
    out = dict.fromkeys(kinds, 0)
    n_moe = sum(1 for layer in layers if cfg.is_moe_layer(layer))
    if cp_size == 1 or n_moe == 0:
        return out
    e, h, k = dtype_bytes(dtype), cfg.hidden_size, cfg.num_experts_per_tok
    chunks = [chunk_tokens] * (prompt_tokens // chunk_tokens) + ([prompt_tokens % chunk_tokens]
                                                                  if prompt_tokens % chunk_tokens else [])
    peer_rows = n_moe * (cp_size - 1) * sum(local_rows(c, cp_size, cp_split) for c in chunks)
    out["moe_scatter"] = peer_rows * h * e
    if moe_split == "intermediate":
        out["moe_gather"] = peer_rows * h * e
    else:
        out["moe_gather"] = peer_rows * (h if fp8_experts else h * e)
        out["moe_route_gather"] = peer_rows * FP32 * ((-(-h // 128) if fp8_experts else 0) + 2 * k)
    return out


def transient_peak(phases: dict[str, dict[str, int]]) -> tuple[int, str]:
    """(bytes, phase name) of a step's high-water mark: the residual stream plus the largest phase."""
    resid = sum(phases.get("residual", {}).values())
    best, name = 0, "residual"
    for phase, bufs in phases.items():
        if phase != "residual" and sum(bufs.values()) > best:
            best, name = sum(bufs.values()), phase
    return resid + best, name


# ---- whole plan --------------------------------------------------------------------------------------
@dataclass
class RankPlan:
    """Everything one rank holds, in bytes."""

    rank: int
    stage: int
    cp_rank: int
    layers: range
    weights: dict[str, int]
    kv: dict[str, int]                        # {"latent", "indexer_keys", "total"} at kv_tokens tokens
    transients: dict[str, dict[str, int]]     # {phase: {buffer: bytes}}
    transient_peak: int
    transient_peak_phase: str
    headroom: int
    gpu_memory: int | None
    kv_per_token: int

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weights_total + self.kv["total"] + self.transient_peak + self.headroom

    @property
    def free(self) -> int | None:
        return None if self.gpu_memory is None else self.gpu_memory - self.total

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.free >= 0

    def extra_kv_tokens(self, page_size: int) -> int | None:
        """Cache tokens the memory left after this plan could still hold (whole pages)."""
        if self.free is None or self.kv_per_token == 0:
            return None
        return max(0, self.free) // (self.kv_per_token * page_size) * page_size

    def numbers(self) -> tuple:
        """Everything but the rank's identity: equal tuples mean ranks that may be shown as one group."""
        return (self.stage, self.layers, tuple(sorted(self.weights.items())), tuple(sorted(self.kv.items())),
                repr(self.transients), self.transient_peak, self.headroom)


@dataclass
class MemoryPlan:
    """Per-rank memory of a deployment and the options it was computed for."""

    model_type: str
    options: dict[str, Any]
    ranks: list[RankPlan] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        verdicts = [r.fits for r in self.ranks]
        return None if None in verdicts else all(verdicts)

    def groups(self) -> list[list[RankPlan]]:
        """Runs of consecutive ranks of one stage with identical numbers."""
        out: list[list[RankPlan]] = []
        for r in self.ranks:
            if out and out[-1][-1].numbers() == r.numbers():
                out[-1].append(r)
            else:
                out.append([r])
        return out

    def to_json(self) -> dict[str, Any]:
        page = self.options["page_size"]
        return {
            "model_type": self.model_type,
            "options": self.options,
            "fits": self.fits,
            "ranks": [{
                "rank": r.rank, "stage": r.stage, "cp_rank": r.cp_rank, "layers": [r.layers.start, r.layers.stop],
                "weights": r.weights, "weights_total": r.weights_total,
                "kv_cache": r.kv, "kv_bytes_per_token": r.kv_per_token,
                "transients": r.transients, "transient_peak": r.transient_peak,
                "transient_peak_phase": r.transient_peak_phase,
                "headroom": r.headroom, "total": r.total, "gpu_memory": r.gpu_memory,
                "free": r.free, "fits": r.fits, "extra_kv_tokens": r.extra_kv_tokens(page),
            } for r in self.ranks],
        }


def plan_memory(cfg: ModelConfig, stage_ranges: Sequence[range], cp_size: int, *, dtype: Any = "bfloat16",
                fp8_block: tuple[int, int] | None = None, moe_split: str = "expert", indexer_fp8: bool = True,
                max_model_len: int | None = None, chunk_tokens: int = 8192, page_size: int = 64,
                fused_topk: bool = False, cp_split: str = "round-robin", gpu_memory_bytes: int | None = None,
                headroom_bytes: int = int(DEFAULT_HEADROOM_GIB * GIB)) -> MemoryPlan:
    """Memory of every rank (stage-major, like the engine's rank numbering) for one deployment.

    KV cache is counted for one sequence of ``max_model_len`` tokens (default: the model's
    max_position_embeddings); transients for a prefill chunk of ``min(chunk_tokens, max_model_len)``
    tokens at the end of that context (the step that reads the most keys).
    """
    if cp_size < 1:
        raise ConfigError(f"cp_size must be >= 1, got {cp_size}")
    for name, v in (("chunk_tokens", chunk_tokens), ("page_size", page_size)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    covered = [i for r in stage_ranges for i in r]
    if covered != list(range(cfg.num_hidden_layers)):
        raise ConfigError(f"stage layer ranges {[(r.start, r.stop) for r in stage_ranges]} do not cover layers "
                          f"0..{cfg.num_hidden_layers - 1} exactly once, in order")
    if fp8_block is not None and (len(fp8_block) != 2 or min(fp8_block) < 1):
        raise ConfigError(f"fp8 block must be two positive sizes, got {fp8_block!r}")
    N = cfg.max_position_embeddings if max_model_len is None else max_model_len
    if N < 1:
        raise ConfigError(f"max_model_len must be >= 1, got {N}")
    S = min(chunk_tokens, N)
    e = dtype_bytes(dtype)
    options = {"pp_size": len(stage_ranges), "cp_size": cp_size,
               "stage_layers": [[r.start, r.stop] for r in stage_ranges],
               "dtype_bytes": e, "fp8_block": list(fp8_block) if fp8_block else None, "moe_split": moe_split,
               "indexer_fp8": indexer_fp8, "max_model_len": N, "chunk_tokens": S, "page_size": page_size,
               "fused_topk": fused_topk, "cp_split": cp_split, "gpu_memory_bytes": gpu_memory_bytes,
               "headroom_bytes": headroom_bytes}
    plan = MemoryPlan(cfg.model_type, options)
    for stage, layers in enumerate(stage_ranges):
        for c in range(cp_size):
            phases = prefill_transients(cfg, layers, chunk_tokens=S, context_tokens=N, cp_rank=c, cp_size=cp_size,
                                        dtype=e, indexer_fp8=indexer_fp8, fused_topk=fused_topk,
                                        moe_split=moe_split, cp_split=cp_split, fp8_experts=fp8_block is not None,
                                        fp8_linears=fp8_block is not None)
            peak, phase = transient_peak(phases)
            plan.ranks.append(RankPlan(
                rank=stage * cp_size + c, stage=stage, cp_rank=c, layers=layers,
                weights=rank_weight_bytes(cfg, layers, cp_rank=c, cp_size=cp_size, dtype=e,
                                          fp8_block=fp8_block, moe_split=moe_split),
                kv=kv_cache_bytes(cfg, layers, N, e, indexer_fp8, page_size),
                transients=phases, transient_peak=peak, transient_peak_phase=phase, headroom=headroom_bytes,
                gpu_memory=gpu_memory_bytes,
                kv_per_token=sum(kv_bytes_per_token(cfg, layers, e, indexer_fp8).values())))
    return plan


def gib(nbytes: int | float) -> float:
    return nbytes / GIB


def fmt_gib(nbytes: int | float | None) -> str:
    return "-" if nbytes is None else f"{gib(nbytes):.2f}"

