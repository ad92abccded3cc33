"""Rank 0's scheduler: admission, chunked prefill, continuous batching of decodes, stops.

One rule drives everything: a request's next tokens to compute are ``all_tokens[num_scheduled:]``.
Several tokens -> a prefill chunk; one token after a sample -> a decode. Work that does not depend on
an in-flight step (the next prefill chunk of the same prompt) may be scheduled while that step is still
running in the pipeline, which is what lets pipeline stages work on different chunks at once.

Prefill and decode interleave so that a long prompt never freezes the requests already generating:
  * while no request is decoding, a prefill step takes up to ``chunked_prefill_size`` prompt tokens;
  * while some are (they have output tokens), a prefill step takes at most ``prefill_chunk_while_decoding`` tokens, at most
    ``max_prefill_inflight_while_decoding`` prefill steps are in flight (one per pipeline stage), and
    after a prefill step the next step is the decode batch whenever one is ready. Steps alternate
    (chunk, decode, chunk, decode ...), so a running request waits at most about one such chunk for each
    token, and a new prompt waits at most one decode step for its first chunk.
Results do not depend on this order: every request's tokens depend only on its own tokens and its own
(seed, index) draws.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
from collections import deque
from dataclasses import dataclass, field

from dsaserve.cache.allocator import OutOfPagesError, PageAllocator
from dsaserve.engine.types import FinishReason, SamplingParams, StepOutput
from dsaserve.runtime.plan import PlanEntry, SampledToken, SampleSpec, StepPlan

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    WAITING = "waiting"      # not admitted (no pages yet)
    RUNNING = "running"      # admitted: prefilling or decoding
    FINISHED = "finished"


@dataclass
class Request:
    """A request as rank 0 tracks it. Fields below the line are filled by the scheduler."""

    req_id: int
    external_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    # ---- scheduler state ----
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    phase: Phase = Phase.WAITING
    pages: list[int] = field(default_factory=list)
    num_scheduled: int = 0           # tokens of all_tokens whose KV has been sent for computation
    prefill_target: int = 0          # len(all_tokens) at (re)admission: the chunk that reaches it samples
    finish_reason: str | None = None

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def awaiting_token(self) -> bool:
        """A sample for this request is in flight: nothing more can be scheduled until it lands."""
        return self.phase is Phase.RUNNING and self.num_scheduled == self.num_tokens and self.num_scheduled >= self.prefill_target


@dataclass
class SchedulerConfig:
    chunked_prefill_size: int = 8192   # max prompt tokens in one prefill step (all requests together)
    max_num_seqs: int = 64             # max requests in one step
    max_model_len: int = 4096          # prompt + generated tokens
    cp_split: str = "round-robin"      # stamped on every plan: how CP ranks split prefill tokens
    prefill_chunk_while_decoding: int = 512     # prompt tokens per prefill step while requests decode
    max_prefill_inflight_while_decoding: int = 1  # prefill steps in flight while requests decode
    chunk_policy: object | None = None  # engine.chunking.DynamicChunker: shrinks later chunks (--dynamic-chunking)


class Scheduler:
    """FCFS scheduler; prefill chunks and decode batches interleave (see the module docstring)."""

    def __init__(self, config: SchedulerConfig, allocator: PageAllocator, eos_token_ids: list[int]):
        self.config = config
        self.allocator = allocator
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self.by_external: dict[str, Request] = {}
        self._ids = itertools.count()
        self._steps = itertools.count()
        self._last_was_prefill = False
        self._prefill_inflight: set[int] = set()     # step ids of scheduled prefill steps without results yet

    # ---- requests ----------------------------------------------------------------------------------
    def add(self, external_id: str, prompt: list[int], params: SamplingParams) -> Request:
        if external_id in self.by_external:
            raise ValueError(f"request id {external_id!r} is already in use")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        req = Request(next(self._ids), external_id, list(prompt), params, seed)
        self.requests[req.req_id] = req
        self.by_external[external_id] = req
        self.waiting.append(req)
        return req

    def abort(self, external_id: str) -> Request | None:
        req = self.by_external.get(external_id)
        if req is None or req.phase is Phase.FINISHED:
            return None
        self._finish(req, FinishReason.ABORT.value)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ----------------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The next step that can run now, or None when everything left waits on in-flight results."""
        plan = None
        if self._last_was_prefill:
            plan = self._schedule_decode()                      # a decode batch between two prefill steps
        if plan is None:
            plan = self._schedule_prefill()
        if plan is None:
            plan = self._schedule_decode()
        if plan is not None:
            self._last_was_prefill = not plan.is_decode
            if not plan.is_decode:
                self._prefill_inflight.add(plan.step_id)
        return plan

    def _decoding(self) -> bool:
        """Some request is generating: it has output tokens and its prompt (or recompute) is done. A request
        whose first token is still in flight does not count, so a burst of new prompts still pipelines."""
        return any(r.output_token_ids and r.num_scheduled >= r.prefill_target for r in self.running)

    def _schedule_prefill(self) -> StepPlan | None:
        cfg = self.config
        budget = cfg.chunked_prefill_size
        if self._decoding():
            if len(self._prefill_inflight) >= cfg.max_prefill_inflight_while_decoding:
                return None
            budget = min(budget, cfg.prefill_chunk_while_decoding)
        entries: list[PlanEntry] = []
        # first the prompts already being prefilled, then admit new ones in arrival order
        for req in self.running:
            if budget <= 0 or len(entries) >= self.config.max_num_seqs:
                break
            if req.num_scheduled < req.prefill_target:
                taken = self._prefill_chunk(req, budget)
                entries.append(taken)
                budget -= len(taken.token_ids)
        while self.waiting and budget > 0 and len(entries) < self.config.max_num_seqs:
            req = self.waiting[0]
            # admit only when the whole prompt fits in free pages, so prefills never deadlock each other
            if self.allocator.pages_needed(req.num_tokens) > self.allocator.num_free:
                if not self.running and not entries:
                    raise OutOfPagesError(f"request {req.external_id!r} needs {req.num_tokens} tokens of KV cache; "
                                          f"the cache holds {self.allocator.num_pages * self.allocator.page_size}")
                break
            self.waiting.popleft()
            req.phase, req.num_scheduled, req.prefill_target = Phase.RUNNING, 0, req.num_tokens
            self.running.append(req)
            taken = self._prefill_chunk(req, budget)
            entries.append(taken)
            budget -= len(taken.token_ids)
        if not entries:
            return None
        return StepPlan(next(self._steps), is_decode=False, entries=entries, cp_split=self.config.cp_split)

    def _prefill_chunk(self, req: Request, budget: int) -> PlanEntry:
        start = req.num_scheduled
        if self.config.chunk_policy is not None:
            budget = min(budget, self.config.chunk_policy.chunk_len(start))
        end = min(req.prefill_target, start + budget)
        self.allocator.grow(req.pages, end)
        req.num_scheduled = end
        return PlanEntry(req.req_id, req.all_tokens[start:end], start, list(req.pages),
                         self._sample_spec(req) if end == req.prefill_target else None)

    def _schedule_decode(self) -> StepPlan | None:
        ready = [r for r in self.running if r.num_scheduled < r.num_tokens and r.num_scheduled >= r.prefill_target]
        ready = ready[: self.config.max_num_seqs]
        entries = []
        for req in ready:
            if req.phase is not Phase.RUNNING:
                continue  # preempted below while making room
            while True:
                try:
                    self.allocator.grow(req.pages, req.num_tokens)
                    break
                except OutOfPagesError:
                    victim = self._preempt_victim(exclude=req)
                    if victim is None:
                        # every other request is already in this step (or in flight): this one, the one
                        # that cannot grow, gives its pages back and is recomputed later
                        self._preempt(req)
                        break
                    self._preempt(victim)
            if req.phase is not Phase.RUNNING:
                continue
            start = req.num_scheduled
            req.num_scheduled = req.num_tokens
            entries.append(PlanEntry(req.req_id, req.all_tokens[start:], start, list(req.pages), self._sample_spec(req)))
        entries = [e for e in entries if self.requests[e.req_id].phase is Phase.RUNNING]
        if not entries:
            return None
        return StepPlan(next(self._steps), is_decode=True, entries=entries)

    def _preempt_victim(self, exclude: Request) -> Request | None:
        # the newest running request that is not waiting on an in-flight result gives its pages back
        for req in reversed(self.running):
            if req is not exclude and not req.awaiting_token and req.num_scheduled >= req.prefill_target:
                return req
        return None

    def _preempt(self, req: Request) -> None:
        log.info("preempting request %s (KV cache full); it will be recomputed", req.external_id)
        self.allocator.free(req.pages)
        self.running.remove(req)
        req.phase, req.num_scheduled = Phase.WAITING, 0
        self.waiting.appendleft(req)

    def _sample_spec(self, req: Request) -> SampleSpec:
        p = req.params
        return SampleSpec(p.temperature, p.top_p, p.top_k, req.seed, len(req.output_token_ids), p.logprobs)

    # ---- results -----------------------------------------------------------------------------------
    def process_results(self, plan: StepPlan, results: list[SampledToken]) -> list[StepOutput]:
        """Every finished step comes here (with no results when it sampled nothing), in submission order."""
        self._prefill_inflight.discard(plan.step_id)
        outputs = []
        for res in results:
            req = self.requests.get(res.req_id)
            if req is None or req.phase is not Phase.RUNNING:
                continue  # aborted while in flight
            req.output_token_ids.append(res.token_id)
            if res.logprobs is not None:
                req.output_logprobs.append(res.logprobs)
            reason = self._stop_reason(req, res.token_id)
            if reason:
                self._finish(req, reason)
            outputs.append(StepOutput(req.external_id, [res.token_id],
                                      [res.logprobs] if res.logprobs is not None else None,
                                      finished=reason is not None, finish_reason=reason,
                                      num_prompt_tokens=len(req.prompt_token_ids)))
        return outputs

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return FinishReason.STOP.value
        if token in p.stop_token_ids:
            return FinishReason.STOP.value
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH.value
        return None

    def _finish(self, req: Request, reason: str) -> None:
        req.phase, req.finish_reason = Phase.FINISHED, reason
        self.allocator.free(req.pages)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.by_external.pop(req.external_id, None)
        self.requests.pop(req.req_id, None)
