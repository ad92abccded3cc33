"""One rank's model runner: owns this rank's stage of the model and its KV cache, and executes step plans.

The runner turns a ``StepPlan`` (the whole step, identical on every rank) into this rank's
``ForwardBatch`` (its CP shard of the tokens), runs the stage, and on the last stage samples the tokens
whose logits live on this rank. It never communicates across stages itself; the executor moves
(hidden, residual) between stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dsaserve.args import EngineArgs
from dsaserve.cache.kv_cache import KVCache
from dsaserve.cache.sizing import propose_kv_pages
from dsaserve.checkpoint.loader import load_checkpoint
from dsaserve.checkpoint.random_init import init_random_weights
from dsaserve.config import ModelConfig
from dsaserve.model import memory_plan as mp
from dsaserve.model.backends import resolve_quantization, select_backends
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.deepseek_v32 import DSAModel
from dsaserve.model.parallelize import StageComm, parallelize_stage
from dsaserve.model.shard import StageShard
from dsaserve.model.state_dict import checkpoint_specs
from dsaserve.runtime import cp
from dsaserve.runtime.plan import SampledToken, StepPlan
from dsaserve.runtime.sampler import sample

log = logging.getLogger(__name__)


@dataclass
class LocalStep:
    """A plan as seen by this rank: its batch, its input ids and which local rows get sampled."""

    batch: ForwardBatch
    input_ids: torch.Tensor                 # [n] (0 for padding)
    sample_rows: list[tuple[int, int]]      # (plan entry index, local row) pairs this rank samples


class ModelRunner:
    """Builds and loads this rank's shard of the model (backends chosen from ``EngineArgs``; context
    parallelism applied over ``comm`` when the stage has several ranks), owns its KV cache and runs steps."""

    def __init__(self, model_dir: str, cfg: ModelConfig, shard: StageShard, args: EngineArgs, *,
                 device: torch.device, dtype: torch.dtype, comm: StageComm | None = None,
                 progress: bool | None = None):
        self.cfg = cfg
        self.shard = shard
        self.args = args
        self.device = device
        self.dtype = dtype
        self.page_size = args.page_size
        self.quantization = resolve_quantization(args.quantization, cfg)          # "fp8" | "none"
        self.backends = select_backends(attention=args.attention_backend, indexer=args.indexer_mode,
                                        quantization=self.quantization, experts=args.moe_backend, device=device,
                                        dtype=dtype)
        model = DSAModel(cfg, shard, backends=self.backends, dtype=dtype, device=device)
        if args.load_format == "random":
            init_random_weights(checkpoint_specs(model), args.weights_seed)
        else:
            load_checkpoint(model_dir, checkpoint_specs(model), progress=progress)
        self.model = parallelize_stage(model, comm) if comm is not None else model
        self.cache: KVCache | None = None      # allocated by allocate_cache once the world agrees on a size

    def propose_num_pages(self, max_model_len: int, available_bytes: int | None = None) -> int:
        """KV pages this rank can hold now that its weights are loaded (the world takes the minimum). On CUDA:
        the free memory (``available_bytes``, default measured) less ``kv_reserved_bytes``."""
        a = self.args
        return propose_kv_pages(self.cfg, kv_cache_tokens=a.kv_cache_tokens, max_model_len=max_model_len,
                                max_num_seqs=a.max_num_seqs, page_size=a.page_size, num_layers=len(self.shard.layers),
                                dtype=self.dtype, device=self.device, indexer_fp8=self.backends.indexer.fp8,
                                reserved_bytes=self.kv_reserved_bytes(max_model_len), available_bytes=available_bytes)

    def kv_reserved_bytes(self, max_model_len: int) -> int:
        """Memory kept out of the KV cache: the memory plan's prefill transient peak of this rank (a
        ``chunked_prefill_size`` chunk at the end of a ``max_model_len`` context) plus
        ``memory_plan.RUNTIME_HEADROOM_GIB`` (NCCL buffers, cuBLAS / Triton workspaces, fragmentation)."""
        shard = self.shard
        phases = mp.prefill_transients(
            self.cfg, shard.layers, chunk_tokens=min(self.args.chunked_prefill_size, max_model_len),
            context_tokens=max_model_len, cp_rank=shard.cp_index, cp_size=shard.cp_size, dtype=self.dtype,
            indexer_fp8=self.backends.indexer.fp8, cp_split=self.args.cp_split,
            fp8_experts=self.quantization == "fp8")
        return mp.transient_peak(phases)[0] + int(mp.RUNTIME_HEADROOM_GIB * mp.GIB)

    def weight_stats(self) -> dict:
        """Weight bytes this rank allocated, by kind, next to what the memory plan says for its shard."""
        shard = self.shard
        plan = mp.rank_weight_bytes(self.cfg, shard.layers, cp_rank=shard.expert_part, cp_size=shard.expert_parts,
                                    dtype=self.dtype, fp8_block=(128, 128) if self.quantization == "fp8" else None)
        return {"quantization": self.quantization, "allocated": mp.allocated_weight_bytes(self.model), "plan": plan}

    def allocate_cache(self, num_pages: int) -> None:
        self.cache = KVCache(self.cfg, self.model.layer_range, num_pages, self.page_size, self.dtype, self.device,
                             self.backends.indexer.fp8)

    # ---- plan -> this rank's batch -----------------------------------------------------------------
    def prepare(self, plan: StepPlan) -> LocalStep:
        shard, dev = self.shard, self.device
        lens = torch.tensor([len(e.token_ids) for e in plan.entries], dtype=torch.long)
        starts = torch.tensor([e.start_pos for e in plan.entries], dtype=torch.long)
        max_pages = max(len(e.block_table) for e in plan.entries)
        tables = torch.zeros(len(plan.entries), max_pages, dtype=torch.long)
        for r, e in enumerate(plan.entries):
            tables[r, : len(e.block_table)] = torch.tensor(e.block_table, dtype=torch.long)
        # flat per-token tensors of the whole step, built without per-token Python loops (16K-token chunks)
        tokens_t = torch.tensor([t for e in plan.entries for t in e.token_ids], dtype=torch.long)
        req_t = torch.repeat_interleave(torch.arange(len(plan.entries)), lens)             # [N]
        first = torch.cumsum(lens, 0) - lens                                              # flat index of each entry's token 0
        pos_t = starts[req_t] + torch.arange(len(tokens_t)) - first[req_t]                # [N]
        slot_t = tables[req_t, pos_t // self.page_size] * self.page_size + pos_t % self.page_size
        last_row = {r: int(first[r] + lens[r] - 1) for r, e in enumerate(plan.entries) if e.sample is not None}
        n_tokens = len(tokens_t)

        gathered = None
        if plan.is_decode or shard.cp_size == 1:
            # decode tokens are replicated on every CP rank of a stage; CP rank 0 samples them
            local = torch.arange(n_tokens)
            owner_rows = {r: i for r, i in last_row.items()} if shard.cp_index == 0 else {}
        else:
            local = cp.shard_indices(n_tokens, shard.cp_size, shard.cp_index, plan.cp_split)
            g = cp.gathered_indices(n_tokens, shard.cp_size, plan.cp_split)
            gathered = torch.where(g >= 0, slot_t[g.clamp(min=0)], -1)
            row_of = torch.full((n_tokens,), -1, dtype=torch.long)                      # flat index -> local row
            held = local >= 0
            row_of[local[held]] = held.nonzero(as_tuple=True)[0]
            owner_rows = {r: int(row_of[f]) for r, f in last_row.items() if row_of[f] >= 0}
        valid = local >= 0
        safe = local.clamp(min=0)
        batch = ForwardBatch(
            positions=torch.where(valid, pos_t[safe], 0).to(dev),
            token_req=torch.where(valid, req_t[safe], -1).to(dev),
            req_seq_lens=[e.seq_len for e in plan.entries],
            block_tables=tables.to(dev),
            write_slots=torch.where(valid, slot_t[safe], -1).to(dev),
            gathered_write_slots=None if gathered is None else gathered.to(dev),
            is_decode=plan.is_decode,
            page_size=self.page_size,
        )
        input_ids = torch.where(valid, tokens_t[safe], 0).to(dev)
        sample_rows = sorted(owner_rows.items()) if shard.is_last else []
        return LocalStep(batch, input_ids, sample_rows)

    # ---- execution ---------------------------------------------------------------------------------
    def forward(self, step: LocalStep, hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None):
        """Run this stage -> (hidden, residual) [n_local, hidden_size] each."""
        return self.model(step.batch, self.cache, input_ids=step.input_ids if self.shard.is_first else None,
                          hidden=hidden, residual=residual)

    def sample(self, plan: StepPlan, step: LocalStep, hidden: torch.Tensor, residual: torch.Tensor) -> list[SampledToken]:
        """Last stage only: logits for the rows this rank owns, then sampling."""
        if not step.sample_rows:
            return []
        rows = torch.tensor([row for _, row in step.sample_rows], device=hidden.device)
        logits = self.model.compute_logits(hidden[rows], residual[rows])       # [m, vocab]
        entries = [plan.entries[r] for r, _ in step.sample_rows]
        return sample(logits, [e.sample for e in entries], [e.req_id for e in entries])

    def execute_local(self, plan: StepPlan) -> list[SampledToken]:
        """A whole step on a single-rank world (the runner is the only stage)."""
        step = self.prepare(plan)
        hidden, residual = self.forward(step)
        return self.sample(plan, step, hidden, residual)
