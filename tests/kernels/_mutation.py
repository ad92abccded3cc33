"""Mutation check for the kernel tests: do they notice wrong math?

With ``DSASERVE_KERNEL_MUTATE=<target>`` set (a name from ``TARGETS``), the autouse fixture in conftest.py
wraps that one function so every tensor it returns becomes ``7 * x + 3`` (fp8 outputs via fp32; -1 index
padding becomes -4, -inf stays -inf). A value-checking test must then fail. Each such test declares what it
checks with ``@pytest.mark.checks("target", ...)``; ``python -m tests.kernels.mutation_report`` runs the
kernel tests once per target and verifies that every test fails under the mutation of every target it
declares (and that each target is caught by at least one test).

Only the test helpers read the variable: the library itself never looks at it.
"""

from __future__ import annotations

import functools
import importlib

import torch

ENV = "DSASERVE_KERNEL_MUTATE"
LOG_ENV = "DSASERVE_KERNEL_MUTATE_LOG"  # where conftest appends one JSON line per test outcome

# target name -> (module, attribute). References first, then the kernels' launchers.
TARGETS: dict[str, tuple[str, str]] = {
    "reference.act_quant": ("dsaserve.kernels.reference", "act_quant"),
    "reference.act_dequant": ("dsaserve.kernels.reference", "act_dequant"),
    "reference.ue8m0_scale": ("dsaserve.kernels.reference", "ue8m0_scale"),
    "reference.hadamard_rotate": ("dsaserve.kernels.reference", "hadamard_rotate"),
    "reference.mqa_logits": ("dsaserve.kernels.reference", "mqa_logits"),
    "reference.paged_mqa_logits": ("dsaserve.kernels.reference", "paged_mqa_logits"),
    "reference.topk_indices": ("dsaserve.kernels.reference", "topk_indices"),
    "reference.select_topk_ordered": ("dsaserve.kernels.reference", "select_topk_ordered"),
    "reference.mqa_topk_indices": ("dsaserve.kernels.reference", "mqa_topk_indices"),
    "reference.sparse_mla": ("dsaserve.kernels.reference", "sparse_mla"),
    "reference.merge_attn_states": ("dsaserve.kernels.reference", "merge_attn_states"),
    "reference.rms_norm": ("dsaserve.kernels.reference", "rms_norm"),
    "reference.rope": ("dsaserve.kernels.reference", "rope"),
    "reference.moe_route": ("dsaserve.kernels.reference", "moe_route"),
    "reference.slots_of_positions": ("dsaserve.kernels.reference", "slots_of_positions"),
    "reference.indexer_key": ("dsaserve.kernels.reference", "indexer_key"),
    "reference.mla_latent": ("dsaserve.kernels.reference", "mla_latent"),
    "reference.silu_mul": ("dsaserve.kernels.reference", "silu_mul"),
    "f32_linear.bf16_split3_reference": ("dsaserve.kernels.f32_linear", "bf16_split3_reference"),
    "f32_linear.bf16_split3": ("dsaserve.kernels.f32_linear", "bf16_split3"),
    "f32_linear.linear_f32_split": ("dsaserve.kernels.f32_linear", "linear_f32_split"),
    "threshold_topk.select_candidates_triton": ("dsaserve.kernels.threshold_topk", "select_candidates_triton"),
    "threshold_topk.row_thresholds_triton": ("dsaserve.kernels.threshold_topk", "row_thresholds_triton"),
    "norm_rope.silu_mul_triton": ("dsaserve.kernels.norm_rope", "silu_mul_triton"),
    "norm_rope.mla_latent_triton": ("dsaserve.kernels.norm_rope", "mla_latent_triton"),
    "reference.indexer_query": ("dsaserve.kernels.reference", "indexer_query"),
    "key_path.indexer_query_triton": ("dsaserve.kernels.key_path", "indexer_query_triton"),
    "key_path.indexer_key_triton": ("dsaserve.kernels.key_path", "indexer_key_triton"),
    "paging.slots_of_positions_triton": ("dsaserve.kernels.paging", "slots_of_positions_triton"),
    "router.moe_route_triton": ("dsaserve.kernels.router", "moe_route_triton"),
    "norm_rope.rms_norm_triton": ("dsaserve.kernels.norm_rope", "rms_norm_triton"),
    "norm_rope.rope_triton": ("dsaserve.kernels.norm_rope", "rope_triton"),
    "quant.act_quant_triton": ("dsaserve.kernels.quant", "act_quant_triton"),
    "quant.hadamard_act_quant_triton": ("dsaserve.kernels.quant", "hadamard_act_quant_triton"),
    "indexer_logits.mqa_logits_triton": ("dsaserve.kernels.indexer_logits", "mqa_logits_triton"),
    "indexer_logits.paged_mqa_logits_triton": ("dsaserve.kernels.indexer_logits", "paged_mqa_logits_triton"),
    "indexer_topk.mqa_topk_triton": ("dsaserve.kernels.indexer_topk", "mqa_topk_triton"),
    "topk.topk_indices_radix": ("dsaserve.kernels.topk", "topk_indices_radix"),
    "topk.topk_indices_torch": ("dsaserve.kernels.topk", "topk_indices_torch"),
    "sparse_attention.sparse_mla_triton": ("dsaserve.kernels.sparse_attention", "sparse_mla_triton"),
    "sparse_attention.merge_splits_triton": ("dsaserve.kernels.sparse_attention", "merge_splits_triton"),
    "mla_value.value_proj_reference": ("dsaserve.kernels.mla_value", "value_proj_reference"),
    "mla_value.value_proj_fp8": ("dsaserve.kernels.mla_value", "value_proj_fp8"),
    "mla_query.query_proj_rope_reference": ("dsaserve.kernels.mla_query", "query_proj_rope_reference"),
    "mla_query.query_proj_rope": ("dsaserve.kernels.mla_query", "query_proj_rope"),
    "reference.tile_split": ("dsaserve.kernels.reference", "tile_split"),
    "tile_split.tile_split": ("dsaserve.kernels.tile_split", "tile_split"),
}


def mutate_value(x):
    """7 * x + 3 on every tensor in x (tuples and lists recursed); other values unchanged."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool:
            return ~x
        if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return (x.float() * 7 + 3).to(x.dtype)
        return x * 7 + 3
    if isinstance(x, (tuple, list)):
        return type(x)(mutate_value(v) for v in x)
    return x


def mutated(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return mutate_value(fn(*args, **kwargs))

    return wrapper


def resolve(target: str):
    """(module object, attribute name) of a target; KeyError names the known targets."""
    if target not in TARGETS:
        raise KeyError(f"{ENV}={target!r} is not a mutation target; known: {', '.join(TARGETS)}")
    mod_name, attr = TARGETS[target]
    return importlib.import_module(mod_name), attr
