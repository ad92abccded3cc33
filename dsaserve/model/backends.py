"""The model's swappable implementations, chosen by name (from ``EngineArgs``) and handed to the modules.

    attention  "reference" | "triton"   how MLA attends over the selected keys    (model.attention)
    indexer    "exact" | "fp8"          the indexer's numerics                     (model.indexer)
    linear     "dense" | "fp8"          how projections hold weights and multiply  (model.layers)
    experts    "loop" | "grouped"       how the routed experts run                 (model.moe)

"auto" resolves by device: triton attention, the fp8 indexer and grouped experts on CUDA (grouped when its
GEMMs can take the weights: fp8, or bf16 activations); reference, exact and loop elsewhere. The linear
backend follows the weight format (``--quantization``, resolved against the checkpoint by
``resolve_quantization``): "fp8" keeps the quantizable projections and the routed experts in e4m3 128x128
blocks, "none" keeps them in the model dtype. A new backend is a class with the same interface
and an entry in the tables below (and the name in ``dsaserve.args``' choices, which the engine validates
before anything starts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsaserve.config import ConfigError, ModelConfig
from dsaserve.kernels.grouped_moe import MOE_SCHEDULES
from dsaserve.kernels._common import SELECT_KERNELS
from dsaserve.kernels.indexer_logits_hopper import LogitsHopperConfig
from dsaserve.kernels.mma_turns import MMA_ORDERS
from dsaserve.model.attention import ReferenceAttention, TritonAttention
from dsaserve.model.indexer import ExactIndexer, Fp8Indexer, IndexerNumerics
from dsaserve.model.layers import DenseLinear, Fp8LinearFactory, LinearFactory
from dsaserve.model.mla import AttentionBackend
from dsaserve.model.moe import ExpertsFactory, GroupedExperts, GroupedExpertsWith, LoopExperts

# Stateless objects, shared by every module that uses them.
ATTENTION: dict[str, AttentionBackend] = {"reference": ReferenceAttention(), "triton": TritonAttention()}
INDEXER: dict[str, IndexerNumerics] = {"exact": ExactIndexer(), "fp8": Fp8Indexer()}
LINEAR: dict[str, LinearFactory] = {"dense": DenseLinear(), "fp8": Fp8LinearFactory()}
EXPERTS: dict[str, ExpertsFactory] = {"loop": LoopExperts, "grouped": GroupedExperts}
# weight format (resolved --quantization) -> linear backend
LINEAR_OF_QUANTIZATION = {"none": "dense", "fp8": "fp8"}
FP8_KERNEL_BLOCK = (128, 128)


@dataclass(frozen=True)
class ModelBackends:
    """One object per role; every module of a model gets the same ones."""

    attention: AttentionBackend
    indexer: IndexerNumerics
    linear: LinearFactory
    experts: ExpertsFactory

    def names(self) -> dict[str, str]:
        return {"attention": self.attention.name, "indexer": self.indexer.name, "linear": self.linear.name,
                "experts": self.experts.name}


def _filter_config(mma_order: str, consumer_regs: int) -> LogitsHopperConfig | None:
    """The indexer filter kernel's launch config for the ablation knobs, or None for its default."""
    if (mma_order, consumer_regs) == ("auto", 0):
        return None
    pinned = {} if mma_order == "auto" else {"ordered": mma_order == "ordered"}
    if consumer_regs:
        pinned["consumer_regs"] = consumer_regs
    try:
        return LogitsHopperConfig(**pinned)
    except ValueError as e:  # a register split outside the file
        raise ValueError(f"indexer_filter_regs: {e}") from None


def _pick(table: dict, role: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {role} backend {name!r}; choose one of {', '.join(table)}")
    return table[name]


def resolve_quantization(requested: str, cfg: ModelConfig) -> str:
    """``--quantization`` -> the weight format the engine holds: "fp8" or "none".

    auto = the checkpoint's own (its quantization_config: fp8 -> "fp8", none -> "none"); fp8 = fp8 blocks
    (an fp8 checkpoint's as stored, a bf16 one's quantized at load); none = the model dtype (an fp8
    checkpoint is dequantized at load).
    """
    if requested not in ("auto", "fp8", "none"):
        raise ConfigError(f"quantization must be 'auto', 'fp8' or 'none', got {requested!r}")
    fmt = ("fp8" if cfg.fp8 is not None else "none") if requested == "auto" else requested
    if fmt == "fp8" and cfg.fp8 is not None and tuple(cfg.fp8.block_size) != FP8_KERNEL_BLOCK:
        raise ConfigError(f"the checkpoint's fp8 blocks are {cfg.fp8.block_size}; the fp8 kernels take 128x128: "
                          "pass --quantization none to dequantize at load")
    return fmt


def select_backends(*, attention: str = "auto", indexer: str = "auto", quantization: str = "none",
                    experts: str = "auto", indexer_topk: str = "fused", sparse_mla_prefill: str = "auto",
                    moe_gemm: str = "auto", moe_schedule: str = "auto", moe_group_m: int = 0,
                    indexer_select: str = "auto", moe_mma_order: str = "auto", indexer_mma_order: str = "auto",
                    indexer_filter_regs: int = 0, mla_fused_projections: str = "off",
                    indexer_query_kernel: str = "triton", device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.bfloat16) -> ModelBackends:
    """The backends named (``auto`` resolved for ``device`` and the model ``dtype``); ``quantization`` is the
    resolved weight format; ``indexer_topk`` ("fused" | "fused-triton" | "unfused") picks the fp8 indexer's
    prefill top-k on the kernel path (``Fp8Indexer.fused_topk``); ``sparse_mla_prefill`` ("auto" | "triton")
    the kernel path's sparse MLA prefill kernel (``TritonAttention.prefill_kernel``); ``moe_gemm`` ("auto" |
    "triton") the grouped experts' fp8 GEMM kernel at prefill sizes (``GroupedExperts.gemm_kernel``),
    ``moe_schedule`` ("auto" | "static" | "per_item" | "queue") how its Hopper kernel hands out work items and
    ``moe_group_m`` (0 = the default) how many row tiles of an expert sweep the columns together;
    ``indexer_select`` ("auto" | "gluon" | "triton") the threshold top-k's row kernels (``Fp8Indexer``);
    ``moe_mma_order`` / ``indexer_mma_order`` ("auto" | "ordered" | "free") whether the Gluon MoE GEMMs' / indexer
    filter's two consumer warpgroups issue their MMAs in turn (``kernels.mma_turns``; auto = the kernels' default)
    and ``indexer_filter_regs`` (0 = the default) the filter's consumer registers: ablation knobs, same results;
    ``mla_fused_projections`` ("off" | "on") whether the kernel path's absorbed projections each take one Triton
    kernel with the pass beside them (``TritonAttention.fused_projections``); ``indexer_query_kernel`` ("triton" |
    "gluon") the fp8 indexer's query-path kernel (``Fp8Indexer.query_kernel``; the same bits)."""
    cuda = torch.device(device).type == "cuda"
    if attention == "auto":
        attention = "triton" if cuda else "reference"
    if indexer == "auto":
        indexer = "fp8" if cuda else "exact"
    if experts == "auto":  # torch's grouped_mm (bf16 weights) takes bf16 activations only
        experts = "grouped" if cuda and (quantization == "fp8" or dtype == torch.bfloat16) else "loop"
    linear = _pick(LINEAR_OF_QUANTIZATION, "quantization", quantization)
    if indexer_topk not in ("fused", "fused-triton", "unfused"):
        raise ValueError(f"unknown indexer top-k {indexer_topk!r}; choose fused, fused-triton or unfused")
    if indexer_select not in SELECT_KERNELS:
        raise ValueError(f"unknown indexer select kernels {indexer_select!r}; choose one of {SELECT_KERNELS}")
    for name, v in (("moe_mma_order", moe_mma_order), ("indexer_mma_order", indexer_mma_order)):
        if v not in MMA_ORDERS:
            raise ValueError(f"unknown {name} {v!r}; choose one of {MMA_ORDERS}")
    filter_config = _filter_config(indexer_mma_order, indexer_filter_regs)
    if indexer_query_kernel not in ("triton", "gluon"):
        raise ValueError(f"unknown indexer query kernel {indexer_query_kernel!r}; choose triton or gluon")
    numerics = _pick(INDEXER, "indexer", indexer)
    if numerics.fp8 and indexer_topk != "fused":
        numerics = Fp8Indexer(fused_topk=indexer_topk == "fused-triton", topk_kernel="triton",
                              query_kernel=indexer_query_kernel)
    elif numerics.fp8 and (indexer_select != "auto" or filter_config is not None or indexer_query_kernel != "triton"):
        numerics = Fp8Indexer(select_kernel=indexer_select, filter_config=filter_config,
                              query_kernel=indexer_query_kernel)
    if sparse_mla_prefill not in ("auto", "triton"):
        raise ValueError(f"unknown sparse MLA prefill kernel {sparse_mla_prefill!r}; choose auto or triton")
    if mla_fused_projections not in ("off", "on"):
        raise ValueError(f"unknown mla_fused_projections {mla_fused_projections!r}; choose off or on")
    attn = _pick(ATTENTION, "attention", attention)
    if isinstance(attn, TritonAttention) and (sparse_mla_prefill, mla_fused_projections == "on") != \
            (attn.prefill_kernel, attn.fused_projections):
        attn = TritonAttention(prefill_kernel=sparse_mla_prefill, fused_projections=mla_fused_projections == "on")
    if moe_gemm not in ("auto", "triton"):
        raise ValueError(f"unknown MoE GEMM kernel {moe_gemm!r}; choose auto or triton")
    if moe_schedule not in ("auto",) + MOE_SCHEDULES:
        raise ValueError(f"unknown MoE GEMM schedule {moe_schedule!r}; choose auto or one of {MOE_SCHEDULES}")
    if moe_group_m < 0:
        raise ValueError(f"moe_group_m must be >= 0 (0 = the default), got {moe_group_m}")
    experts_factory = _pick(EXPERTS, "experts", experts)
    if experts_factory is GroupedExperts and (moe_gemm, moe_schedule, moe_group_m, moe_mma_order) != \
            ("auto", "auto", 0, "auto"):
        experts_factory = GroupedExpertsWith(gemm_kernel=moe_gemm, schedule=moe_schedule, group_m=moe_group_m,
                                             mma_order=moe_mma_order)
    return ModelBackends(attn, numerics, _pick(LINEAR, "linear", linear), experts_factory)
