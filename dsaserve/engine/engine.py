"""LLMEngine: rank 0's engine loop (schedule -> run -> postprocess) over an executor.

Used by ``LLM.generate`` (offline) and by the server (one thread calls ``step()`` in a loop).

Start-up: the executor loads every rank's weights, sizes the KV cache and captures the decode CUDA graphs;
then, on CUDA unless ``skip_warmup``, the engine runs warm-up requests through the whole world so that
every kernel shape bucket a request can hit (prefill of 1 token, a short and a long chunk with dense and
sparse top-k, decode batches of 1, a few and many requests, every sampling mode, a step of a few hundred
tokens, a prompt chunked while another request decodes) is compiled before the first real request.
``is_ready()`` turns True after that; ``startup`` says how long each part took.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque

from dsaserve.args import EngineArgs
from dsaserve.cache.allocator import PageAllocator
from dsaserve.config import read_model_config
from dsaserve.engine.chunking import ChunkCostModel, dynamic_chunking_enabled, make_chunker
from dsaserve.engine.scheduler import Scheduler, SchedulerConfig
from dsaserve.engine.structured import GrammarCache, GrammarSpec, StructuredOutputError
from dsaserve.engine.types import EngineDeadError, SamplingParams, StepOutput
from dsaserve.parallel.executor import make_executor
from dsaserve.parallel.layout import Layout

log = logging.getLogger(__name__)


def _generation_eos_ids(model_dir: str) -> list[int]:
    import json

    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


class LLMEngine:
    """Owns the scheduler, the tokenizer and the executor (which owns the ranks and their runners).
    Implements ``EngineClient`` (what the server drives)."""

    def __init__(self, model_dir: str, pp_size: int = 1, cp_size: int = 1, device: str = "cpu",
                 dtype: str = "float32", **options):
        self.args = EngineArgs(pp_size=pp_size, cp_size=cp_size, device=device, dtype=dtype, **options)
        self.args.validate()
        self.model_dir = model_dir
        self.model_name = os.path.basename(os.path.normpath(model_dir))
        self.cfg = read_model_config(model_dir, self.args.load_format)
        self.vocab_size = self.cfg.vocab_size      # the one vocabulary rule: token ids in [0, vocab_size)
        self.model_type = self.cfg.model_type      # picks the chat format and the output parsers
        self.layout = Layout.build(self.cfg, pp_size, cp_size, self.args.pp_layer_partition)
        from dsaserve.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_dir(model_dir) if os.path.isdir(model_dir) else None
        eos = set(self.cfg.eos_token_ids) | set(_generation_eos_ids(model_dir))
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.eos_token_ids = sorted(eos)
        self.max_model_len = self.args.max_model_len or self.cfg.max_position_embeddings
        self.dtype = self.args.torch_dtype(self.cfg.torch_dtype)
        self._ready = False
        t0 = time.perf_counter()
        self.executor = make_executor(model_dir, self.cfg, self.layout, self.args, self.dtype, self.max_model_len)
        self.startup: dict = {"load_and_capture_s": round(time.perf_counter() - t0, 3), "warmup_s": None}
        num_pages = self.executor.num_pages
        if num_pages * self.args.page_size < self.max_model_len:
            log.warning("KV cache holds %d tokens < max_model_len %d; lowering max_model_len",
                        num_pages * self.args.page_size, self.max_model_len)
            self.max_model_len = num_pages * self.args.page_size
        a = self.args
        chunker = None
        if dynamic_chunking_enabled(a.dynamic_chunking, self.layout.pp_size):
            chunker = make_chunker(a.chunked_prefill_size, a.page_size, ChunkCostModel.default(self.cfg.index_topk))
        self._grammars = None                      # GrammarCache, made on the first structured-output request
        self._grammar_lock = threading.Lock()
        self.scheduler = Scheduler(
            SchedulerConfig(a.chunked_prefill_size, a.max_num_seqs, self.max_model_len, a.cp_split,
                            prefill_chunk_while_decoding=a.prefill_chunk_while_decoding,
                            prefill_keys_while_decoding=a.prefill_keys_while_decoding,
                            max_prefill_inflight_while_decoding=self.layout.pp_size,
                            max_decode_inflight=self.layout.pp_size, chunk_policy=chunker),
            PageAllocator(num_pages, a.page_size), self.eos_token_ids,
            matcher_factory=(lambda spec: self.grammars().matcher(spec)) if self.tokenizer is not None else None)
        self._profiled_spans: list[tuple[int, int]] | None = None   # [start, end) computed while profiling
        self._inflight: deque = deque()
        # decode steps queued back to back, each fed the previous one's tokens on the device (one process)
        self._feed_decode = getattr(self.executor, "feeds_tokens", False) and not a.sync_scheduling
        self._dead: str | None = None
        if a.device.startswith("cuda") and not a.skip_warmup:
            self.warmup()
        self._ready = True

    # ---- start-up ------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """True once weights, KV cache, CUDA graphs and the warm-up are done (the server's readiness)."""
        return self._ready and self.is_healthy()

    def warmup(self) -> float:
        """Run warm-up requests through every rank so the kernel shape buckets real requests hit are compiled
        (see the module docstring); their outputs are dropped and their pages freed. Returns the seconds taken
        (also printed and kept in ``startup``)."""
        if self.has_unfinished_requests():
            raise RuntimeError("warm-up needs an idle engine")
        t0 = time.perf_counter()
        topk = self.cfg.index_topk
        cap = max(1, min(self.max_model_len - 8, self.scheduler.allocator.num_pages * self.args.page_size // 4))
        sampled = dict(temperature=0.8, top_k=20, top_p=0.9, seed=1)
        waves = [  # one wave at a time, so each prompt's steps have its own shapes
            [(1, {})],                                         # a 1-token step, then decode of one request
            [(17, dict(logprobs=3))],                          # a short odd step, logprobs
            [(topk + 37, sampled)],                            # past index_topk: sparse top-k, sampled decode
            [(self.args.chunked_prefill_size + 1, {})],        # a full chunk, then 1 token at a long context
            [(3, {})] * min(self.args.max_num_seqs, 4),        # decode of a few
            [(2, sampled if i % 2 else {}) for i in range(min(self.args.max_num_seqs, 17))],   # a wide decode
            [(200, {})],                                       # a step of a few hundred tokens (a late chunk)
        ]
        gen = 0

        def add(n: int, max_tokens: int = 3, **extra) -> None:
            nonlocal gen
            prompt = [(i * 7 + 3) % self.cfg.vocab_size for i in range(min(n, cap))]
            self.add_request(f"warmup-{gen}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **extra))
            gen += 1

        for wave in waves:
            for n, extra in wave:
                add(n, **extra)
            while self.has_unfinished_requests():
                self.step()
        # a prompt that arrives while another request decodes: its chunks take the sizes of a busy server's
        # (prefill_chunk_while_decoding, a multiple of 16, then an odd rest; steps with decode rows and chunks)
        add(3, max_tokens=16)
        for _ in range(2):
            self.step()
        add(self.args.prefill_chunk_while_decoding + 37)
        while self.has_unfinished_requests():
            self.step()
        took = time.perf_counter() - t0
        self.executor.control("warm")          # a Triton compile from now on is a stall: logged per rank
        self.startup["warmup_s"] = round(took, 3)
        print(f"warm-up: {gen} requests through every kernel shape bucket in {took:.1f} s", file=sys.stderr,
              flush=True)
        return took

    # ---- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request. Raises ValueError naming the problem for bad input."""
        self._check_alive()
        if not prompt_token_ids:
            raise ValueError("prompt is empty: give at least one token")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens but the context limit (max_model_len) is "
                             f"{self.max_model_len}; shorten the prompt")
        for name, ids in (("logit_bias", (params.logit_bias or {}).keys()), ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name} names the token id {bad}, outside the vocabulary [0, {self.vocab_size})")
        if params.structured_output is not None:
            self.compile_grammar(params.structured_output)
        self.scheduler.add(request_id, prompt_token_ids, params)

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        """Stop a request's sequences (all, or only sequence ``index``); a no-op for unknown or finished ones."""
        self.scheduler.abort(request_id, index)

    # ---- structured output -------------------------------------------------------------------------------
    def grammars(self) -> GrammarCache:
        """The compiled-grammar cache (built on first use: it needs xgrammar and the tokenizer)."""
        with self._grammar_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise StructuredOutputError("structured output needs the checkpoint's tokenizer.json")
                self._grammars = GrammarCache.from_model_dir(self.model_dir, self.vocab_size)
            return self._grammars

    def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compile (and cache) ``spec``; StructuredOutputError (a ValueError) names what is wrong with it.
        Thread-safe: the server validates requests with it outside the engine thread."""
        self.grammars().compile(spec)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._inflight)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def is_healthy(self) -> bool:
        return self._dead is None and self.executor.is_healthy()

    def liveness_problem(self, step_timeout_s: float | None = None) -> str | None:
        """Thread-safe (callable while ``step()`` runs in another thread): a rank that stopped sending
        heartbeats, or ranks inside one step for longer than ``step_timeout_s``, named; None when all is well."""
        return self.executor.liveness_problem(step_timeout_s)

    def stats(self) -> dict:
        """Per-rank communication counters (bytes/calls by kind) and, when profiling, phase times."""
        self._check_alive()
        return self.executor.stats()

    def control(self, op: str) -> list[dict]:
        """Broadcast a control op to every rank: "profile_on" | "profile_off" | "reset" | "stats" | "warm"."""
        self._check_alive()
        if op == "profile_on" or (op == "reset" and self._profiled_spans is not None):
            self._profiled_spans = []          # the ranks' phase times restart: so do the spans they cover
        elif op == "profile_off":
            self._profiled_spans = None
        return self.executor.control(op)

    def fit_chunk_costs(self) -> ChunkCostModel:
        """Refit the dynamic chunker's cost model from the phase times the ranks recorded since profiling
        was turned on (or last reset), and use it for the next prompts. The per-stage cost of a phase is its
        maximum over ranks (the critical path). Raises RuntimeError when nothing was profiled."""
        if not self._profiled_spans:
            raise RuntimeError("no profiled steps to fit the chunk costs from: control('profile_on'), run "
                               "requests, then call fit_chunk_costs()")
        phases: dict[str, float] = {}
        for rank_stats in self.stats().values():
            for name, ms in rank_stats.get("phases_ms", {}).items():
                phases[name] = max(phases.get(name, 0.0), ms)
        model = ChunkCostModel.fit(phases, self._profiled_spans, self.cfg.index_topk)
        cfg = self.scheduler.config
        if cfg.chunk_policy is not None:
            cfg.chunk_policy = make_chunker(cfg.chunk_policy.first_chunk, self.args.page_size, model)
        return model

    # ---- the loop ------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Submit what can run (up to ``executor.max_inflight`` plans in flight: 2 in one process,
        2 x pp_size across processes), then finish the oldest in-flight step and return its token deltas.
        In one process, while a decode step is in flight the next one is queued behind it with its tokens
        fed on the device (``Scheduler.schedule(feed_from=...)``; off with ``sync_scheduling``)."""
        self._check_alive()
        try:
            while len(self._inflight) < self.executor.max_inflight:
                newest = self._inflight[-1][0] if self._inflight else None
                feed = newest if self._feed_decode and newest is not None and newest.is_decode else None
                plan = self.scheduler.schedule(feed_from=feed)
                if plan is None:
                    break
                self._inflight.append((plan, self.executor.submit(plan)))
            if not self._inflight:
                return []
            plan, handle = self._inflight.popleft()
            results = self.executor.wait(handle)
            if self._profiled_spans is not None:
                self._profiled_spans += [(e.start_pos, e.seq_len) for e in plan.entries]
        except EngineDeadError as e:
            self._dead = str(e)
            self.shutdown()
            raise
        return self.scheduler.process_results(plan, results)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def shutdown(self) -> None:
        ex = getattr(self, "executor", None)
        if ex is not None:
            ex.shutdown()
