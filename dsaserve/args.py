"""Engine options: one dataclass, used by ``LLM(...)``, ``LLMEngine(...)`` and every CLI subcommand.

CLI flags are generated from the fields (``--pp-size``, ``--cp-size``, ``--chunked-prefill-size`` ...) with
the help text and choices written next to each field, so the same name means the same thing everywhere.
pp_size / cp_size are checked against the model by ``parallel.layout.Layout.build``; everything else here.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields

import torch

from dsaserve.config import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Backend names (dsaserve.model.backends maps them to implementations; "auto" is resolved by device there).
ATTENTION_BACKENDS = ("auto", "reference", "triton")
INDEXER_MODES = ("auto", "exact", "fp8")
INDEXER_TOPK = ("fused", "fused-triton", "unfused")
SPARSE_MLA_PREFILL = ("auto", "triton")
MLA_FUSED_PROJECTIONS = ("off", "on")
INDEXER_QUERY_KERNELS = ("triton", "gluon")
QUANTIZATIONS = ("auto", "fp8", "none")
MOE_BACKENDS = ("auto", "grouped", "loop")
MOE_GEMM = ("auto", "triton")
MOE_SCHEDULES = ("auto", "static", "per_item", "queue")
INDEXER_SELECTS = ("auto", "gluon", "triton")  # kernels._common.SELECT_KERNELS
MMA_ORDERS = ("auto", "ordered", "free")  # kernels.mma_turns.MMA_ORDERS: the two consumer warpgroups' MMA issues
INDEXER_FILTER_REGS = (0, 232, 240)  # indexer_logits_hopper.LogitsHopperConfig.consumer_regs (0: its default)
CP_SPLITS = ("round-robin", "zigzag")
DYNAMIC_CHUNKING_MODES = ("auto", "on", "off")


def _opt(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class EngineArgs:
    """Everything that configures an engine besides the model folder."""

    # ---- parallel layout ----
    pp_size: int = _opt(1, "pipeline stages: each holds a contiguous range of layers")
    cp_size: int = _opt(1, "context-parallel ranks per stage: each holds 1/cp_size of every prefill chunk's tokens "
                           "and about 1/cp_size of the routed experts (whole experts; uneven splits allowed)")
    pp_layer_partition: str | None = _opt(None, "layers per pipeline stage, comma-separated (e.g. 30,31); default: "
                                                "even, the remainder on the later stages")
    cp_split: str = _opt("round-robin", "how a prefill chunk's tokens are split over the CP ranks: round-robin "
                                        "(token i -> rank i %% C) or zigzag (2C blocks, rank r gets r and 2C-1-r)",
                         CP_SPLITS)
    # ---- device and numerics ----
    device: str = _opt("cpu", "cpu, cuda or cuda:N")
    dtype: str = _opt("float32", "activation and weight dtype; auto = the checkpoint's torch_dtype",
                      (*_DTYPES, "auto"))
    attention_backend: str = _opt("auto", "MLA attention: reference (PyTorch loop per request, the oracle), triton "
                                          "(the dsaserve.kernels ops; their PyTorch references off CUDA); auto = "
                                          "triton on CUDA, reference elsewhere", ATTENTION_BACKENDS)
    indexer_mode: str = _opt("auto", "indexer numerics: exact (model dtype) or fp8 (Hadamard + e4m3, DeepSeek's "
                                     "production path); auto = fp8 on CUDA, exact elsewhere", INDEXER_MODES)
    indexer_topk: str = _opt("fused", "prefill top-k of the fp8 indexer on the kernel path, never with a [queries x "
                                      "context] fp32 logits buffer except unfused: fused = on Hopper (sm_90, <= 64 "
                                      "indexer heads, 16K+ keys) a sampled per-query threshold whose passing keys "
                                      "the Gluon logits kernel keeps, the fused Triton kernel elsewhere; "
                                      "fused-triton = the fused Triton kernel always; unfused = logits kernel, "
                                      "then top-k (an ablation). The exact indexer always runs unfused; decode "
                                      "always uses the paged logits + top-k", INDEXER_TOPK)
    indexer_select: str = _opt("auto", "the threshold top-k's row kernels (each query's threshold from its sample, "
                                       "and the exact top-k of its candidates): auto = gluon where it runs; gluon = "
                                       "the Gluon kernels (explicit layouts, fewer instructions); triton = the "
                                       "Triton kernels (an ablation; same results in the same order)",
                               INDEXER_SELECTS)
    indexer_mma_order: str = _opt("auto", "the Gluon indexer filter kernel's two consumer warpgroups (Hopper, "
                                          "threshold top-k): ordered = they issue their MMAs in turn, so one's "
                                          "epilogue runs under the other's MMA; free = each when ready; auto = the "
                                          "kernel's default (free; an ablation flag, the same candidates either "
                                          "way)", MMA_ORDERS)
    indexer_filter_regs: int = _opt(0, "registers of each consumer warpgroup of the Gluon indexer filter kernel "
                                       "(the producer gets the rest): 0 = the default (240: the producer at "
                                       "setmaxnreg's floor of 24, fewer spills at 32 heads), 232 = the earlier "
                                       "split (an ablation flag)",
                                    INDEXER_FILTER_REGS)
    sparse_mla_prefill: str = _opt("auto", "sparse MLA kernel of prefill steps on the kernel path: auto = the Gluon "
                                           "kernel on Hopper (sm_90) GPUs where it takes the shapes (bf16, "
                                           "576 = 512 + 64 latent, heads a multiple of 64), the Triton kernel "
                                           "elsewhere; triton = the Triton kernel always (an ablation). Decode "
                                           "steps always use the Triton split-top-k kernel", SPARSE_MLA_PREFILL)
    indexer_query_kernel: str = _opt("triton", "the fp8 indexer's query path (RoPE, Hadamard, e4m3 per head): triton = "
                                               "the Triton kernel; gluon = a Gluon kernel with one row a thread "
                                               "where it takes the shapes (bf16, rope = half the head), the Triton "
                                               "one elsewhere (the A/B; the same bits)", INDEXER_QUERY_KERNELS)
    mla_fused_projections: str = _opt("off", "the kernel path's absorbed MLA projections, outside static decode "
                                             "batches: on = one Triton kernel each side of the sparse attention, "
                                             "the query's W_UK product with the RoPE of its rope part (prefill "
                                             "blocks), and with an fp8 o_proj the value's W_UV product with "
                                             "act_quant of its output in the epilogue (o_proj's input); off = "
                                             "torch's bmm and a second pass each (the A/B; the same contracts, "
                                             "the products summed in another order)", MLA_FUSED_PROJECTIONS)
    quantization: str = _opt("auto", "linear and routed-expert weights: fp8 = e4m3 with one fp32 scale per 128x128 "
                                     "block (an fp8 checkpoint's as stored, a bf16 one quantized at load; "
                                     "activations quantized per token per 128 channels), none = the model dtype "
                                     "(an fp8 checkpoint is dequantized at load), auto = the checkpoint's own "
                                     "quantization_config. Embedding, lm_head, norms, router, indexer weights_proj "
                                     "and kv_b_proj always stay unquantized", QUANTIZATIONS)
    moe_backend: str = _opt("auto", "routed experts: grouped = one grouped GEMM per projection over the rank's "
                                    "experts, routing on the device, no host sync (bf16 or fp8 weights on CUDA; the "
                                    "PyTorch reference on CPU); loop = one expert at a time over its tokens; auto = "
                                    "grouped on CUDA with fp8 or bf16 weights, loop otherwise", MOE_BACKENDS)
    moe_gemm: str = _opt("auto", "fp8 grouped expert GEMM kernel of the grouped backend at prefill sizes: auto = the "
                                 "Gluon warp-specialized kernel on Hopper (sm_90) GPUs from 128 routed rows per "
                                 "expert on average (hidden and intermediate sizes multiples of 128), the Triton "
                                 "kernel elsewhere; triton = the Triton kernel always (an ablation). Decode-size "
                                 "batches always use the Triton kernel", MOE_GEMM)
    moe_schedule: str = _opt("auto", "how the Gluon MoE GEMM's programs take their work items (Hopper, prefill sizes): "
                                     "static = one program per SM, items strided; per_item = one program per work "
                                     "item; queue = one program per SM, each claiming the next item from a counter; "
                                     "auto = queue, the measured default (an ablation flag: a named schedule applies to "
                                     "both GEMMs)", MOE_SCHEDULES)
    moe_group_m: int = _opt(0, "row tiles of one expert that sweep the output columns together in the MoE GEMM (L2 "
                               "reuse of the expert's weights; an ablation flag): 0 = the default (8)")
    moe_mma_order: str = _opt("auto", "the Gluon MoE GEMMs' two consumer warpgroups (Hopper, prefill sizes): ordered = "
                                      "they issue their MMAs in turn, so one's promotion runs under the other's MMA; "
                                      "free = each when ready; auto = the kernel's default (free; an ablation flag, "
                                      "the same outputs either way)", MMA_ORDERS)
    # ---- scheduling and memory ----
    chunked_prefill_size: int = _opt(8192, "max prompt tokens computed in one prefill step (all requests together)")
    prefill_chunk_while_decoding: int = _opt(512, "max prompt tokens in one prefill step while other requests are "
                                                  "decoding: prefill steps and decode steps then alternate, so a "
                                                  "running request waits at most one such chunk for its next token")
    prefill_keys_while_decoding: int = _opt(8 * 2**20, "while other requests are decoding, also cap a prefill "
                                                       "step's indexer work: chunk tokens x keys they see <= this "
                                                       "(default 8M: 512 tokens up to ~16K of context, ~130 at "
                                                       "64K), since a chunk's cost grows with its context; "
                                                       "0 = no cap")
    dynamic_chunking: str = _opt("auto", "shrink the later prefill chunks of a long prompt as its cached prefix "
                                         "grows, so each chunk costs about the same per pipeline stage "
                                         "(--chunked-prefill-size is the first chunk; costs fitted from the "
                                         "profiled phase times, defaults from a 1-GPU breakdown); auto = on "
                                         "when --pp-size > 1", DYNAMIC_CHUNKING_MODES)
    max_num_seqs: int = _opt(64, "max requests in one step")
    max_model_len: int | None = _opt(None, "context limit, prompt + generated tokens; default: the model's "
                                           "max_position_embeddings (lowered if the KV cache is smaller)")
    kv_cache_tokens: int | None = _opt(None, "KV cache capacity in tokens; default: room for a few max_model_len "
                                             "contexts (CPU), 90%% of free GPU memory after the weights (CUDA)")
    page_size: int = _opt(64, "tokens per KV cache page")
    # ---- start-up ----
    enforce_eager: bool = _opt(False, "run decode steps eagerly: no CUDA graphs (graphs are captured per batch-size "
                                      "bucket at start-up on CUDA otherwise)")
    sync_scheduling: bool = _opt(False, "wait for each decode step's tokens on the host before queueing the next "
                                        "decode step (one process; by default the next step is queued while the "
                                        "current one runs, its input tokens fed from the current step's samples on "
                                        "the device, so the host's per-step work hides behind the GPU's)")
    skip_warmup: bool = _opt(False, "skip the start-up warm-up steps that compile every kernel shape bucket before "
                                    "the engine reports ready (development; the first requests then pay the compiles)")
    # ---- communication ----
    pp_comm_ctas: int = _opt(1, "CTAs the NCCL pipeline communicator may use; the indexer kernels leave that many "
                                "SMs free while a pipeline receive or send is pending")
    indexer_num_sms: str = _opt("auto", "SMs of the indexer kernels while a pipeline receive or send is pending: "
                                        "auto (all but --pp-comm-ctas on CUDA), off (no reservation; an ablation) "
                                        "or a number; llm.stats() counts the reserved launches")
    pp_transfer: str = _opt("scattered", "what crosses a pipeline boundary: scattered (each rank sends its own "
                                         "shard) or gathered (the stage all-gathers, then sends; a benchmark "
                                         "ablation)", ("scattered", "gathered"))
    comm_timeout_s: float = _opt(120.0, "seconds any collective or wait may take before the engine gives up")
    heartbeat_timeout_s: float = _opt(20.0, "seconds a worker rank may go without a heartbeat (sent 4 times a "
                                            "second by a background thread, so long steps do not count) before "
                                            "the engine stops with an error naming it: a stopped, frozen or "
                                            "unreachable process")
    master_port: int | None = _opt(None, "rendezvous port of locally spawned workers; default: a free port")
    # ---- weights ----
    load_format: str = _opt("auto", "auto = the checkpoint's safetensors; random = seeded random weights (then "
                                    "--model may be a bare config .json; benchmarks)", ("auto", "random"))
    weights_seed: int = _opt(0, "seed of --load-format random")

    def validate(self) -> None:
        for name in ("chunked_prefill_size", "prefill_chunk_while_decoding", "max_num_seqs", "page_size", "pp_comm_ctas"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        v = self.prefill_keys_while_decoding
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"prefill_keys_while_decoding must be an integer >= 0, got {v!r}")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if str(f.type) == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be True or False, got {value!r}")
            if choices and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        if self.indexer_num_sms not in ("auto", "off"):
            try:
                if int(self.indexer_num_sms) < 1:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"indexer_num_sms must be 'auto', 'off' or a positive integer, got {self.indexer_num_sms!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        for name in ("comm_timeout_s", "heartbeat_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ConfigError(f"{name} must be a number > 0, got {v!r}")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            why = (f"this torch build ({torch.__version__}) has no CUDA support" if torch.version.cuda is None
                   else "torch sees no GPU (check CUDA_VISIBLE_DEVICES and the driver)")
            raise ConfigError(f"device {self.device!r} was asked for, but {why}; use --device cpu, or install a "
                              "CUDA build of torch on a GPU machine")

    def torch_dtype(self, config_dtype: str) -> torch.dtype:
        name = config_dtype if self.dtype == "auto" else self.dtype
        if name not in _DTYPES:
            raise ConfigError(f"dtype {name!r} (from the checkpoint's torch_dtype) is not supported; pass dtype=...")
        return _DTYPES[name]

    # ---- CLI ---------------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("engine")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if str(f.type) == "bool":                        # switches: off by default, the flag turns them on
                group.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=f.metadata["help"])
                continue
            kind = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}.get(str(f.type), str)
            # a None default is explained by the help text itself
            shown = "" if f.default is None else " (default: %(default)s)"
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=f.metadata.get("choices"),
                               help=f.metadata["help"] + shown)

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def replace(self, **changes) -> "EngineArgs":
        return dataclasses.replace(self, **changes)
