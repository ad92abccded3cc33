"""The model's swappable implementations, chosen by name (from ``EngineArgs``) and handed to the modules.

    attention  "reference" | "triton"   how MLA attends over the selected keys   (model.attention)
    indexer    "exact" | "fp8"          the indexer's numerics                    (model.indexer)
    linear     "dense"                  how projections hold weights and multiply (model.layers)
    experts    "loop"                   how the routed experts run                (model.moe)

"auto" resolves by device: triton attention and the fp8 indexer on CUDA, reference and exact elsewhere.
A new backend is a class with the same interface and an entry in the table below (and the name in
``dsaserve.args``' choices, which the engine validates before anything starts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsaserve.model.attention import ReferenceAttention, TritonAttention
from dsaserve.model.indexer import ExactIndexer, Fp8Indexer, IndexerNumerics
from dsaserve.model.layers import DenseLinear, LinearFactory
from dsaserve.model.mla import AttentionBackend
from dsaserve.model.moe import ExpertsFactory, LoopExperts

# Stateless objects, shared by every module that uses them.
ATTENTION: dict[str, AttentionBackend] = {"reference": ReferenceAttention(), "triton": TritonAttention()}
INDEXER: dict[str, IndexerNumerics] = {"exact": ExactIndexer(), "fp8": Fp8Indexer()}
LINEAR: dict[str, LinearFactory] = {"dense": DenseLinear()}
EXPERTS: dict[str, ExpertsFactory] = {"loop": LoopExperts}


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


def _pick(table: dict, role: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {role} backend {name!r}; choose one of {', '.join(table)}")
    return table[name]


def select_backends(*, attention: str = "auto", indexer: str = "auto", linear: str = "dense", experts: str = "loop",
                    indexer_topk: str = "fused", device: torch.device | str = "cpu") -> ModelBackends:
    """The backends named (``auto`` resolved for ``device``). ``indexer_topk`` ("fused" | "unfused") picks
    the fp8 indexer's prefill top-k on the kernel path (``Fp8Indexer.fused_topk``)."""
    cuda = torch.device(device).type == "cuda"
    if attention == "auto":
        attention = "triton" if cuda else "reference"
    if indexer == "auto":
        indexer = "fp8" if cuda else "exact"
    if indexer_topk not in ("fused", "unfused"):
        raise ValueError(f"unknown indexer top-k {indexer_topk!r}; choose fused or unfused")
    numerics = _pick(INDEXER, "indexer", indexer)
    if numerics.fp8 and indexer_topk == "unfused":
        numerics = Fp8Indexer(fused_topk=False)
    return ModelBackends(_pick(ATTENTION, "attention", attention), numerics,
                         _pick(LINEAR, "linear", linear), _pick(EXPERTS, "experts", experts))
