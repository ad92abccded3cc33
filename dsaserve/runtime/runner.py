"""One rank's model runner: owns this rank's stage of the model and its KV cache, and executes step plans.

The runner turns a ``StepPlan`` (the whole step, identical on every rank) into this rank's
``ForwardBatch`` (its CP shard of the tokens), runs the stage, and on the last stage samples the tokens
whose logits live on this rank. It never communicates across stages itself; the executor moves
(hidden, residual) between stages.

Two ways a step runs:
  * the general path (prefill chunks; decode on backends without a static decode path): per-step tensors
    built from the plan, the model's per-request logic;
  * the static decode path (``attention.supports_static_decode``): the step's inputs are staged into
    persistent buffers with one host->device copy (``runtime.decode_inputs``), the forward and the sampler
    issue no host sync, and on CUDA the forward replays a CUDA graph of the step's batch-size bucket
    (``runtime.cuda_graphs``) unless ``enforce_eager``, profiling, or a failed capture says otherwise.
Only the sampled token ids (and logprobs) come back to the host, once per step.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from dsaserve.args import EngineArgs
from dsaserve.cache.kv_cache import KVCache
from dsaserve.cache.sizing import propose_kv_pages
from dsaserve.checkpoint.loader import load_checkpoint
from dsaserve.checkpoint.random_init import init_random_weights
from dsaserve.config import ConfigError, ModelConfig
from dsaserve.model import indexer as indexer_module
from dsaserve.model import memory_plan as mp
from dsaserve.model.backends import resolve_quantization, select_backends
from dsaserve.model.batch import ForwardBatch, IndexerLaunches
from dsaserve.model.deepseek_v32 import DSAModel
from dsaserve.model.moe import GroupedExperts
from dsaserve.model.parallelize import StageComm, parallelize_stage
from dsaserve.model.shard import StageShard
from dsaserve.model.state_dict import checkpoint_specs
from dsaserve.profiling import RECORDER
from dsaserve.runtime import compile_watch, cp, prompt_logprobs
from dsaserve.runtime.cuda_graphs import DecodeGraphs, batch_buckets, width_classes
from dsaserve.runtime.decode_inputs import DecodeInputs
from dsaserve.runtime.logits_processors import TokenCounts
from dsaserve.runtime.plan import FED_TOKEN, StepItem, StepPlan
from dsaserve.runtime.sampler import SampleOutput, SamplingTensors, sample_tensors, to_host

log = logging.getLogger(__name__)


def apply_decode_topk_env() -> None:
    """DSASERVE_DECODE_RADIX_MAX_KEYS (a benchmark knob): the widest decode logits row whose top-k takes the radix
    select instead of torch.topk (``model.indexer.DECODE_RADIX_MAX_KEYS``; the model layer reads no environment)."""
    raw = os.environ.get("DSASERVE_DECODE_RADIX_MAX_KEYS")
    if raw is None:
        return
    try:
        value = int(raw)
        if value < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"DSASERVE_DECODE_RADIX_MAX_KEYS must be a positive integer, got {raw!r}") from None
    indexer_module.DECODE_RADIX_MAX_KEYS = value


@dataclass
class LocalStep:
    """A plan as seen by this rank: its batch, its input ids and which local rows get sampled."""

    batch: ForwardBatch
    input_ids: torch.Tensor                 # [n] (0 for padding)
    sample_rows: list[tuple[int, int]]      # (plan entry index, local row) pairs this rank samples
    prompt_rows: prompt_logprobs.PromptRows | None = None   # rows whose prompt logprobs this rank computes
    # static decode only: the step's requests (rows 0..rows-1; the batch may hold padding rows after them),
    # the staged sampling parameters, and the CUDA-graph bucket it replays (None: eager)
    rows: int | None = None
    sampling: SamplingTensors | None = None
    graph_bucket: tuple[int, int] | None = None     # the (rows, width) graph it replays
    logits: torch.Tensor | None = None      # [rows, vocab] when the graph computed them (last stage)
    staged: tuple[int, int] | None = None   # static decode: the (rows, width) its inputs were staged in


@dataclass
class PendingStep:
    """A launched step whose sampled tokens are still on the device (``ModelRunner.finish`` fetches them)."""

    plan: StepPlan
    specs: list = field(default_factory=list)
    req_ids: list[int] = field(default_factory=list)
    output: SampleOutput | None = None
    prompt: prompt_logprobs.PendingPromptLogprobs | None = None


@dataclass
class PrefillIndexerLaunches:
    """Indexer kernel launches of this rank's prefill steps since the last reset, and how many ran on a
    reserved SM budget (a PP transfer in flight; see ``dsaserve.parallel.sm_budget``)."""

    prefills: int = 0
    launches: int = 0
    reserved: int = 0
    last_launches: int = 0        # of the latest prefill step
    last_reserved: int = 0
    redo_rows: torch.Tensor | None = None  # device int64 [1]: rows the threshold top-k redid (read by snapshot)

    def record(self, step: IndexerLaunches) -> None:
        self.prefills += 1
        self.launches += step.launches
        self.reserved += step.reserved
        self.last_launches, self.last_reserved = step.launches, step.reserved
        if step.redo_rows is not None:  # summed on the device: no sync per step
            self.redo_rows = step.redo_rows if self.redo_rows is None else self.redo_rows + step.redo_rows

    def snapshot(self) -> dict:
        """The counts so far (``threshold_redo_rows`` is read from the device: call it from ``stats()`` only)."""
        return {"prefills": self.prefills, "launches": self.launches, "reserved_launches": self.reserved,
                "last_prefill": {"launches": self.last_launches, "reserved_launches": self.last_reserved},
                "threshold_redo_rows": 0 if self.redo_rows is None else int(self.redo_rows.item())}

    def reset(self) -> None:
        self.__init__()


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
                                        quantization=self.quantization, experts=args.moe_backend, moe_gemm=args.moe_gemm,
                                        moe_schedule=args.moe_schedule, moe_group_m=args.moe_group_m,
                                        indexer_topk=args.indexer_topk, indexer_select=args.indexer_select,
                                        moe_mma_order=args.moe_mma_order, indexer_mma_order=args.indexer_mma_order,
                                        indexer_filter_regs=args.indexer_filter_regs,
                                        sparse_mla_prefill=args.sparse_mla_prefill,
                                        mla_fused_projections=args.mla_fused_projections,
                                        indexer_query_kernel=args.indexer_query_kernel,
                                        device=device,
                                        dtype=dtype)
        model = DSAModel(cfg, shard, backends=self.backends, dtype=dtype, device=device)
        if args.load_format == "random":
            init_random_weights(checkpoint_specs(model), args.weights_seed)
        else:
            load_checkpoint(model_dir, checkpoint_specs(model), progress=progress)
        model.weights_loaded()
        self.model = parallelize_stage(model, comm) if comm is not None else model
        self.cache: KVCache | None = None      # allocated by allocate_cache once the world agrees on a size
        self.decode_inputs: DecodeInputs | None = None    # set by init_decode (static decode path)
        self.graphs: DecodeGraphs | None = None
        self.decode_width = 0                  # block-table columns that cover max_model_len
        self.use_graphs = True                 # benchmarks switch replays off on a live runner
        self.host_prepare_s: deque[float] = deque(maxlen=1024)   # host time of the last static decode preps
        self._eager_reasons: set[str] = set()
        self.prefill_indexer = PrefillIndexerLaunches()   # launches on a reserved SM budget, for llm.stats()
        self.token_counts: TokenCounts | None = None   # last stage, once a request asks for penalties
        # the latest step's sampled tokens, still on the device: (step id, req id of each row, tokens [m] int64);
        # a fed decode step (StepPlan.fed_from) takes its input tokens from here
        self._sampled: tuple[int, list[int], torch.Tensor] | None = None
        if self.device.type == "cuda":
            compile_watch.install_if_asked()   # a compile after the warm-up is logged (DSASERVE_LOG_COMPILES=0: off)
        apply_decode_topk_env()

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
            fused_topk=getattr(self.backends.indexer, "fused_topk", False), fp8_experts=self.quantization == "fp8",
            fp8_linears=self.backends.linear.fp8)
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

    # ---- the static decode path ---------------------------------------------------------------------
    @property
    def static_decode(self) -> bool:
        return self.decode_inputs is not None

    def init_decode(self, max_model_len: int, agree: Callable[[bool], bool] | None = None) -> dict | None:
        """After ``allocate_cache``: persistent decode buffers and, on CUDA unless ``enforce_eager``, the decode
        CUDA graphs. ``agree(ok)`` -> True iff every CP rank of this stage is ok (CP ranks capture together).
        Returns the capture report (None when no graphs are attempted); it is also printed."""
        if self.device.type == "cuda":
            self.warm_kernels()
        if not self.backends.attention.supports_static_decode:
            return None                        # the reference attention: the general path decodes
        a = self.args
        self.decode_width = min(-(-max_model_len // self.page_size), self.cache.num_pages)
        self.decode_inputs = DecodeInputs(a.max_num_seqs, self.decode_width, self.device, self.page_size,
                                          self.cache.sink_slot)
        if self.device.type != "cuda":
            return None
        where = f"[layers {self.shard.layer_start}-{self.shard.layer_end - 1}, CP rank {self.shard.cp_index}]"
        if a.enforce_eager:
            print(f"{where} CUDA graphs off (--enforce-eager): decode runs eagerly", file=sys.stderr, flush=True)
            return None
        self.graphs = DecodeGraphs(self.model, self.cache, self.decode_inputs, self.decode_width,
                                   batch_buckets(a.max_num_seqs), hidden_size=self.cfg.hidden_size, dtype=self.dtype,
                                   device=self.device, widths=width_classes(self.decode_width, self.page_size))
        report = self.graphs.capture(agree or (lambda ok: ok))
        if report["eager_reason"]:
            msg = f"{where} CUDA graphs off, decode runs eagerly: {report['eager_reason']}"
        else:
            msg = (f"{where} CUDA graphs: decode buckets {report['buckets']} x block-table widths "
                   f"{report['width_classes']} pages captured in {report['capture_s']:.2f} s, "
                   f"{report['memory_mib']:.0f} MiB")
        print(msg, file=sys.stderr, flush=True)
        return report

    def warm_kernels(self) -> None:
        """Compile the kernel variants whose choice depends on a step's size and that neither the graph capture
        nor the engine's warm-up requests are sure to meet (the MoE routing plan's size buckets): a Triton
        compile in the middle of serving stalls every running request for seconds."""
        warmed = set()
        for m in self.model.modules():
            if isinstance(m, GroupedExperts) and (key := (m.n_experts, tuple(m.local))) not in warmed:
                warmed.add(key)
                m.warm_up(self.cfg.num_experts_per_tok)

    def _prepare_static_decode(self, plan: StepPlan) -> LocalStep:
        t0 = time.perf_counter()
        n = len(plan.entries)
        if any(len(e.token_ids) != 1 for e in plan.entries):
            raise ValueError(f"step {plan.step_id} is marked decode but has entries with several tokens")
        pages = max(len(e.block_table) for e in plan.entries)
        key = None
        if self.graphs is not None and self.graphs.graphs:
            key = self.graphs.key_for(n, pages)
            reason = ("replays are switched off" if not self.use_graphs else "profiling is on" if RECORDER.enabled
                      else "more requests than the largest graph bucket" if key is None else None)
            if reason is not None:
                key = None
                if reason not in self._eager_reasons:
                    self._eager_reasons.add(reason)
                    log.info("decode step %d runs eagerly: %s", plan.step_id, reason)
        rows, width = key or (n, pages)
        views = self.decode_inputs.stage(plan.entries, rows, width)
        if plan.fed_from is not None:
            self._feed_tokens(plan, views.input_ids)
        samples = self.shard.is_last and self.shard.cp_index == 0     # decode is replicated: CP rank 0 samples
        self.host_prepare_s.append(time.perf_counter() - t0)
        return LocalStep(views.batch(self.page_size), views.input_ids, [(i, i) for i in range(n)] if samples else [],
                         rows=n, sampling=views.sampling, graph_bucket=key, staged=(rows, width))

    def _fed_rows(self, plan: StepPlan) -> tuple[list[int], list[int]]:
        """(rows of ``plan`` whose token is fed, the rows of the feeding step's samples they take)."""
        if self._sampled is None or self._sampled[0] != plan.fed_from:
            have = None if self._sampled is None else self._sampled[0]
            raise RuntimeError(f"decode step {plan.step_id} takes its tokens from step {plan.fed_from}, but the "
                               f"latest step this rank sampled is {have}: a fed step must follow its source step")
        rows_of = {r: i for i, r in enumerate(self._sampled[1])}        # built only when a step is fed
        dst, src = [], []
        for i, e in enumerate(plan.entries):
            if e.token_ids[0] == FED_TOKEN:
                if e.req_id not in rows_of:
                    raise RuntimeError(f"decode step {plan.step_id}: request {e.req_id} was not sampled by step "
                                       f"{plan.fed_from}, whose tokens feed it")
                dst.append(i)
                src.append(rows_of[e.req_id])
        return dst, src

    def _feed_tokens(self, plan: StepPlan, input_ids: torch.Tensor) -> None:
        """Write the fed entries' token ids (sampled by step ``plan.fed_from``, still on the device) into the
        staged ``input_ids`` [rows]: queued after the staging copy, before the forward; no host sync."""
        dst, src = self._fed_rows(plan)
        tokens = self._sampled[2]
        k = len(dst)
        if dst == src == list(range(k)):          # the usual case: the same requests first, in the same order
            input_ids[:k].copy_(tokens[:k])
        elif k:
            dev = input_ids.device
            rows = torch.tensor([dst, src], dtype=torch.long).to(dev, non_blocking=True)
            input_ids.index_copy_(0, rows[0], tokens.index_select(0, rows[1]))

    def _with_fed_tokens(self, plan: StepPlan) -> StepPlan:
        """``plan`` with its fed token ids read back to the host (a sync: for the paths without staged decode
        inputs, where the tokens are needed on the host anyway)."""
        dst, src = self._fed_rows(plan)
        values = self._sampled[2].tolist()
        entries = list(plan.entries)
        for d, s in zip(dst, src):
            entries[d] = replace(entries[d], token_ids=[values[s]])
        return replace(plan, entries=entries, fed_from=None)

    def stage_ahead(self, plan: StepPlan, step: LocalStep) -> None:
        """After a static decode step's device work is queued (its sampling included): stage the inputs of the
        step that most likely follows it while the device runs this one (``DecodeInputs.stage_ahead``)."""
        if step.staged is not None and self.decode_inputs is not None:
            self.decode_inputs.stage_ahead(plan.entries, *step.staged)

    # ---- plan -> this rank's batch -----------------------------------------------------------------
    def prepare(self, plan: StepPlan) -> LocalStep:
        self.cache.copy_pages(plan.page_copies)       # forked sequences' pages, before anything writes them
        if plan.is_decode and self.static_decode:
            return self._prepare_static_decode(plan)
        if plan.fed_from is not None:
            raise RuntimeError(f"step {plan.step_id} has fed token ids, which only the static decode path or "
                               f"ModelRunner.launch resolve")
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
        row_of = None
        if plan.is_decode or shard.cp_size == 1:
            # decode tokens are replicated on every CP rank of a stage; CP rank 0 samples them
            local = torch.arange(n_tokens)
            owner_rows = dict(last_row) if shard.cp_index == 0 else {}
            if shard.cp_index == 0:
                row_of = local
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
        host_positions = torch.where(valid, pos_t[safe], 0)
        host_token_req = torch.where(valid, req_t[safe], -1)

        def to_dev(t: torch.Tensor) -> torch.Tensor:
            # asynchronous from pageable memory: CUDA stages the bytes before returning, and a blocking copy
            # would first wait for the GPU to finish the previous step (a stream sync per tensor)
            return t.to(dev, non_blocking=True)

        batch = ForwardBatch(
            positions=to_dev(host_positions),
            token_req=to_dev(host_token_req),
            host_positions=host_positions,
            host_token_req=host_token_req,
            req_seq_lens=[e.seq_len for e in plan.entries],
            block_tables=to_dev(tables),
            write_slots=to_dev(torch.where(valid, slot_t[safe], -1)),
            gathered_write_slots=None if gathered is None else to_dev(gathered),
            is_decode=plan.is_decode,
            page_size=self.page_size,
        )
        input_ids = to_dev(torch.where(valid, tokens_t[safe], 0))
        sample_rows = sorted(owner_rows.items()) if shard.is_last else []
        prompt_rows = None
        if shard.is_last and row_of is not None and any(e.prompt_logprobs is not None for e in plan.entries):
            prompt_rows = prompt_logprobs.select_rows(plan, row_of)     # this rank's own rows only
        return LocalStep(batch, input_ids, sample_rows, prompt_rows)

    # ---- execution ---------------------------------------------------------------------------------
    def forward(self, step: LocalStep, hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None):
        """Run this stage -> (hidden, residual) [n_local, hidden_size] each (a static decode step: [rows, ...],
        its padding rows dropped)."""
        if step.graph_bucket is not None:
            hidden, residual, step.logits = self.graphs.replay(step.graph_bucket, step.rows, hidden, residual)
            return hidden, residual
        hidden, residual = self.model(step.batch, self.cache, input_ids=step.input_ids if self.shard.is_first else None,
                                      hidden=hidden, residual=residual)
        if not step.batch.is_decode:
            self.prefill_indexer.record(step.batch.indexer_launches)
        if step.rows is not None:
            return hidden[:step.rows], residual[:step.rows]
        return hidden, residual

    def _record_counts(self, plan: StepPlan, step: LocalStep) -> None:
        """Every last-stage rank keeps the token counts of penalized requests (runtime.logits_processors):
        the plan's row copies, then its tokens (a static decode step: from the staged device inputs)."""
        uses = plan.counts_copies or any(e.counts is not None for e in plan.entries)
        if not uses:
            return
        if self.token_counts is None:
            self.token_counts = TokenCounts(self.cfg.vocab_size, self.device)
        static = step.rows is not None
        self.token_counts.apply_plan(plan, record_entries=not static)
        if static and any(e.counts is not None for e in plan.entries):
            n = len(plan.entries)
            self.token_counts.record_decode(step.sampling.counts_slot[:n], step.input_ids[:n])

    def sample_async(self, plan: StepPlan, step: LocalStep, hidden: torch.Tensor, residual: torch.Tensor) -> PendingStep:
        """Last stage only: logits for the rows this rank owns, then sampling (and prompt logprobs), left on
        the device."""
        pending = PendingStep(plan)
        self._record_counts(plan, step)
        if step.prompt_rows is not None:
            pending.prompt = prompt_logprobs.compute(
                step.prompt_rows, lambda rows: self.model.compute_logits(hidden[rows], residual[rows]),
                self.cfg.vocab_size, hidden.device)
        if not step.sample_rows:
            return pending
        if step.rows is not None:                                # static decode: rows 0..n-1, params staged
            entries = [plan.entries[r] for r, _ in step.sample_rows]
            pending.specs, pending.req_ids = [e.sample for e in entries], [e.req_id for e in entries]
            logits = step.logits if step.logits is not None else self.model.compute_logits(hidden, residual)
            params = step.sampling.rows(step.rows)
        else:
            # one logits row per sample: a forked request (n > 1) samples its siblings from the same row
            rows = []
            for r, row in step.sample_rows:
                e = plan.entries[r]
                for req_id, spec in [(e.req_id, e.sample)] + e.forks:
                    pending.specs.append(spec)
                    pending.req_ids.append(req_id)
                    rows.append(row)
            rows_t = torch.tensor(rows, device=hidden.device)
            logits = self.model.compute_logits(hidden[rows_t], residual[rows_t])   # [m, vocab]
            params = SamplingTensors.from_specs(pending.specs, logits.device)
        pending.output = sample_tensors(logits, pending.specs, params, self.token_counts)
        pending.output.start_host_copy()
        self._sampled = (plan.step_id, pending.req_ids, pending.output.tokens)
        return pending

    @staticmethod
    def finish(pending: PendingStep) -> list[StepItem]:
        """The sampled tokens (and prompt logprobs) of a launched step (waits for the device: the one sync
        of a decode step)."""
        items: list[StepItem] = []
        if pending.prompt is not None:
            items += prompt_logprobs.to_host(pending.prompt)
        if pending.output is not None:
            items += to_host(pending.output, pending.specs, pending.req_ids)
        return items

    def launch(self, plan: StepPlan) -> PendingStep:
        """A whole step on a single-rank world, queued on the device; ``finish`` returns its tokens. A fed
        decode step (``plan.fed_from``) may be launched before the step it follows has been finished."""
        if plan.fed_from is not None and not (plan.is_decode and self.static_decode):
            plan = self._with_fed_tokens(plan)
        step = self.prepare(plan)
        hidden, residual = self.forward(step)
        pending = self.sample_async(plan, step, hidden, residual)
        self.stage_ahead(plan, step)
        return pending

    def execute_local(self, plan: StepPlan) -> list[StepItem]:
        """A whole step on a single-rank world (the runner is the only stage)."""
        return self.finish(self.launch(plan))
