"""Rank 0's scheduler: admission, chunked prefill, continuous batching of decodes, stops.

One rule drives everything: a request's next tokens to compute are ``all_tokens[num_scheduled:]``.
Several tokens -> a prefill chunk; one token after a sample -> a decode. Work that does not depend on
an in-flight step (the next prefill chunk of the same prompt) may be scheduled while that step is still
running in the pipeline, which is what lets pipeline stages work on different chunks at once.

Prefill and decode interleave so that a long prompt never freezes the requests already generating:
  * while no request is decoding, a prefill step takes up to ``chunked_prefill_size`` prompt tokens;
  * while some are (they have output tokens), a prefill step takes at most ``prefill_chunk_while_decoding`` tokens,
    and at most ``prefill_keys_while_decoding`` (query token, key) pairs: the indexer scores every earlier key
    of each query, so a chunk at 64K of context costs several times one at 1K and is cut shorter (never
    below ``MIN_CHUNK_WHILE_DECODING`` tokens); at most
    ``max_prefill_inflight_while_decoding`` prefill steps are in flight (one per pipeline stage), and
    after a prefill step the next step is the decode batch whenever one is ready. Steps alternate
    (chunk, decode, chunk, decode ...), so a running request waits at most about one such chunk for each
    token, and a new prompt waits at most one decode step for its first chunk.
Results do not depend on this order: every request's tokens depend only on its own tokens and its own
(seed, index) draws.

``n`` > 1 sequences per request (one prefill): the request's sequences are ``Request`` objects of one group
(index 0..n-1). Sequence 0 prefills the prompt; the step that reaches the end of the prompt samples every
sequence's first token from the same last row (``PlanEntry.forks``) and forks the KV cache: the other
sequences share the prompt's full pages (reference-counted in the ``PageAllocator``) and each gets its own
copy of the partly filled last page (``StepPlan.page_copies``, applied by every rank before the next step
writes anything). Sequence i uses the seed ``child_seed(seed, i)`` (sequence 0 the request's own), so a
forked sequence samples exactly what it would sample alone. A sequence that cannot get its page at the fork
is recomputed from the prompt later, alone, with the same result.

Per-sequence state rank 0 keeps for the sampler: a slot in the last stage's token-count table for requests
with penalties (``CountsRef`` on its entries; forks copy the parent's row), the grammar matcher of a
structured-output request (its next-token mask goes into the ``SampleSpec``), and the eos / stop tokens
banned while ``min_tokens`` is not reached. Prompt logprobs are asked for on the prompt's chunks and
returned with the first output (or alone, for a ``max_tokens=0`` request that only scores its prompt).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dsaserve.cache.allocator import OutOfPagesError, PageAllocator
from dsaserve.engine.structured import GrammarSpec, RequestMatcher, StructuredOutputError, allocate_bitmask
from dsaserve.engine.types import FinishReason, SamplingParams, StepOutput
from dsaserve.runtime.plan import (FED_TOKEN, CountsRef, PlanEntry, PromptLogprobs, SampledToken, SampleSpec,
                                   StepItem, StepPlan)

log = logging.getLogger(__name__)


MIN_CHUNK_WHILE_DECODING = 64  # tokens: the key cap never shrinks a prefill chunk below this


def _pairs(entry: PlanEntry) -> int:
    """(token, key) pairs of a prefill chunk, counted as tokens x the keys its last token sees."""
    return len(entry.token_ids) * (entry.start_pos + len(entry.token_ids))


class Phase(enum.Enum):
    """Where a sequence is in its life: waiting for pages, waiting to fork, running, finished."""

    WAITING = "waiting"      # not admitted (no pages yet)
    FORK = "fork"            # sequence i > 0 of a request: waits for sequence 0's prefill to fork from it
    RUNNING = "running"      # admitted: prefilling or decoding
    FINISHED = "finished"


_SEED_STRIDE = 0x9E3779B97F4A7C15


def child_seed(seed: int, index: int) -> int:
    """The seed of sequence ``index`` of a request seeded ``seed`` (sequence 0 keeps the request's seed)."""
    return seed if index == 0 else (seed + index * _SEED_STRIDE) % (1 << 63)


@dataclass
class Request:
    """A request as rank 0 tracks it. Fields below the line are filled by the scheduler."""

    req_id: int
    external_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    index: int = 0                   # which of the request's n sequences
    # ---- scheduler state ----
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    phase: Phase = Phase.WAITING
    pages: list[int] = field(default_factory=list)
    num_scheduled: int = 0           # tokens of all_tokens whose KV has been sent for computation
    prefill_target: int = 0          # len(all_tokens) at (re)admission: the chunk that reaches it samples
    finish_reason: str | None = None
    forks: list["Request"] = field(default_factory=list)   # sequence 0: the sequences still to fork from it
    counts_slot: int = -1            # row in the last stage's token counts (penalties), while running
    matcher: RequestMatcher | None = None                  # structured output
    prompt_logprobs: dict[int, dict[int, float]] | None = None   # position -> logprobs, until delivered
    bias: tuple[tuple[int, float], ...] = ()

    @property
    def prompt_only(self) -> bool:
        return self.params.max_tokens == 0

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int | None = None) -> list[int]:
        """``all_tokens[start:end]`` (0 <= start, end) without building ``all_tokens``: a decode step takes one
        token per request, which must not cost a copy of the whole context."""
        p = len(self.prompt_token_ids)
        end = self.num_tokens if end is None else max(start, end)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def awaiting_token(self) -> bool:
        """A sample for this request is in flight (two, when a fed decode step follows the first): nothing
        more can be scheduled from the host's tokens until it lands."""
        return (self.phase is Phase.RUNNING and self.num_scheduled >= self.num_tokens
                and self.num_scheduled >= self.prefill_target)


@dataclass
class SchedulerConfig:
    """The scheduler's limits and prefill / decode interleaving knobs (filled by the engine from ``EngineArgs``)."""

    chunked_prefill_size: int = 8192   # max prompt tokens in one prefill step (all requests together)
    max_num_seqs: int = 64             # max requests in one step
    max_model_len: int = 4096          # prompt + generated tokens
    cp_split: str = "round-robin"      # stamped on every plan: how CP ranks split prefill tokens
    prefill_chunk_while_decoding: int = 512     # prompt tokens per prefill step while requests decode
    prefill_keys_while_decoding: int = 0        # and sum over its tokens of the keys they see (0 = no cap)
    max_prefill_inflight_while_decoding: int = 1  # prefill steps in flight while requests decode
    # decode steps in flight planned from the host's tokens (one per pipeline stage: micro-batches keep the
    # stages busy; with one stage a second one would only split the batch, each half costing a whole weight
    # read); a fed step (``schedule(feed_from=...)``) continues the in-flight one and is not counted against it
    max_decode_inflight: int = 1
    chunk_policy: object | None = None  # engine.chunking.DynamicChunker: shrinks later chunks (--dynamic-chunking)


class Scheduler:
    """FCFS scheduler; prefill chunks and decode batches interleave (see the module docstring)."""

    def __init__(self, config: SchedulerConfig, allocator: PageAllocator, eos_token_ids: list[int],
                 matcher_factory: Callable[[GrammarSpec], RequestMatcher] | None = None):
        self.config = config
        self.allocator = allocator
        self.eos_token_ids = set(eos_token_ids)
        self.matcher_factory = matcher_factory
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self.groups: dict[str, list[Request]] = {}   # external id -> its sequences, by index
        self._ids = itertools.count()
        self._steps = itertools.count()
        self._last_was_prefill = False
        self._prefill_inflight: set[int] = set()     # step ids of scheduled prefill steps without results yet
        self._decode_inflight: set[int] = set()      # and of decode steps
        self._free_slots: list[int] = []             # token-count rows given back (a heap: lowest first)
        self._next_slot = 0
        # copies made while building a plan go into the plan after it (the one that built them wrote the pages)
        self._copies_building: tuple[list, list] = ([], [])
        self._copies_next: tuple[list, list] = ([], [])

    # ---- requests ----------------------------------------------------------------------------------
    def add(self, external_id: str, prompt: list[int], params: SamplingParams) -> Request:
        """Queue a request (its ``n`` sequences); returns sequence 0."""
        if external_id in self.groups:
            raise ValueError(f"request id {external_id!r} is already in use")
        if params.structured_output is not None and self.matcher_factory is None:
            raise ValueError("structured output is not available on this engine (it needs the tokenizer)")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        bias = tuple(sorted((params.logit_bias or {}).items()))
        group = []
        for i in range(params.n):
            req = Request(next(self._ids), external_id, list(prompt), params, child_seed(seed, i), index=i,
                          bias=bias, phase=Phase.WAITING if i == 0 else Phase.FORK)
            if params.structured_output is not None:
                req.matcher = self.matcher_factory(params.structured_output)
            group.append(req)
        group[0].forks = group[1:]
        if params.prompt_logprobs is not None:
            group[0].prompt_logprobs = {}
        for req in group:
            self.requests[req.req_id] = req
        self.groups[external_id] = group
        self.waiting.append(group[0])
        return group[0]

    def abort(self, external_id: str, index: int | None = None) -> list[Request]:
        """Abort a request's sequences (all of them, or only ``index``); returns those that were running."""
        group = self.groups.get(external_id, [])
        stopped = [r for r in list(group) if (index is None or r.index == index) and r.phase is not Phase.FINISHED]
        for req in stopped:
            self._finish(req, FinishReason.ABORT.value)
        return stopped

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ----------------------------------------------------------------------------------
    def schedule(self, feed_from: StepPlan | None = None) -> StepPlan | None:
        """The next step that can run now, or None when everything left waits on in-flight results.

        ``feed_from``: the newest in-flight step, a decode step, when the executor can feed a step's sampled
        tokens to the next step on the device (one process). The decode step then also takes the requests of
        ``feed_from`` that surely go on (see ``_fed_entries``) with their token still in flight, first and in
        ``feed_from``'s order, so the device runs decode steps back to back while the host handles the
        previous step's tokens; a request that turns out to have stopped wastes its row of that step and its
        token is dropped (``process_results``)."""
        plan = None
        if self._last_was_prefill:
            plan = self._schedule_decode(feed_from)              # a decode batch between two prefill steps
        if plan is None:
            plan = self._schedule_prefill()
        if plan is None:
            plan = self._schedule_decode(feed_from)
        if plan is not None:
            self._last_was_prefill = not plan.is_decode
            (self._decode_inflight if plan.is_decode else self._prefill_inflight).add(plan.step_id)
            plan.page_copies, plan.counts_copies = self._copies_next
            self._copies_next, self._copies_building = self._copies_building, ([], [])
        return plan

    def _decoding(self) -> bool:
        """Some request is generating: it has output tokens and its prompt (or recompute) is done. A request
        whose first token is still in flight does not count, so a burst of new prompts still pipelines."""
        return any(r.output_token_ids and r.num_scheduled >= r.prefill_target for r in self.running)

    def _schedule_prefill(self) -> StepPlan | None:
        cfg = self.config
        budget = cfg.chunked_prefill_size
        keys: int | None = None                # (token, key) pairs left in this step, while others decode
        if self._decoding():
            if len(self._prefill_inflight) >= cfg.max_prefill_inflight_while_decoding:
                return None
            budget = min(budget, cfg.prefill_chunk_while_decoding)
            if cfg.prefill_keys_while_decoding > 0:
                keys = cfg.prefill_keys_while_decoding
        entries: list[PlanEntry] = []
        # first the prompts already being prefilled, then admit new ones in arrival order
        for req in self.running:
            if budget <= 0 or (keys is not None and keys <= 0) or len(entries) >= self.config.max_num_seqs:
                break
            if req.num_scheduled < req.prefill_target:
                taken = self._prefill_chunk(req, budget, keys)
                entries.append(taken)
                budget -= len(taken.token_ids)
                keys = None if keys is None else keys - _pairs(taken)
        while (self.waiting and budget > 0 and (keys is None or keys > 0)
               and len(entries) < self.config.max_num_seqs):
            req = self.waiting[0]
            # admit only when the whole prompt fits in free pages, so prefills never deadlock each other (and,
            # while others run, the page copies of its forked sequences too)
            alone = not self.running and not entries
            if self.allocator.pages_needed(req.num_tokens) > self.allocator.num_free:
                if alone:
                    raise OutOfPagesError(f"request {req.external_id!r} needs {req.num_tokens} tokens of KV cache; "
                                          f"the cache holds {self.allocator.num_pages * self.allocator.page_size}")
                break
            if not alone and self._pages_to_admit(req) > self.allocator.num_free:
                break
            self.waiting.popleft()
            req.phase, req.num_scheduled, req.prefill_target = Phase.RUNNING, 0, req.num_tokens
            if req.params.has_penalties:
                req.counts_slot = self._take_slot()
            self.running.append(req)
            taken = self._prefill_chunk(req, budget, keys)
            entries.append(taken)
            budget -= len(taken.token_ids)
            keys = None if keys is None else keys - _pairs(taken)
        if not entries:
            return None
        return StepPlan(next(self._steps), is_decode=False, entries=entries, cp_split=self.config.cp_split)

    def _pages_to_admit(self, req: Request) -> int:
        """Pages a request needs now: its tokens, plus each forked sequence's copy of a partly filled page."""
        partial = 1 if req.num_tokens % self.allocator.page_size else 0
        return self.allocator.pages_needed(req.num_tokens) + (len(req.forks) * partial if not req.prompt_only else 0)

    def _prefill_chunk(self, req: Request, budget: int, keys: int | None = None) -> PlanEntry:
        start = req.num_scheduled
        if self.config.chunk_policy is not None:
            budget = min(budget, self.config.chunk_policy.chunk_len(start))
        if keys is not None:   # tokens x the keys they see (at most start + budget each) within the step's cap
            budget = min(budget, max(MIN_CHUNK_WHILE_DECODING, keys // (start + budget)))
        end = min(req.prefill_target, start + budget)
        self.allocator.grow(req.pages, end)
        req.num_scheduled = end
        last = end == req.prefill_target
        entry = PlanEntry(req.req_id, req.tokens(start, end), start, list(req.pages),
                          self._sample_spec(req) if last and not req.prompt_only else None)
        if req.counts_slot >= 0:
            entry.counts = CountsRef(req.counts_slot, len(req.prompt_token_ids))
        if req.prompt_logprobs is not None and start < len(req.prompt_token_ids):
            entry.prompt_logprobs = req.params.prompt_logprobs
            entry.next_token_id = req.prompt_token_ids[end] if end < len(req.prompt_token_ids) else None
        if last and req.forks and not req.prompt_only:
            entry.forks = self._fork(req)
        return entry

    def _fork(self, parent: Request) -> list[tuple[int, SampleSpec]]:
        """Start the parent's other sequences on its prompt KV (see the module docstring); returns the
        (req id, spec) of each sequence whose first token is sampled with the parent's."""
        ps = self.allocator.page_size
        length = parent.num_scheduled
        full = length // ps
        samples = []
        for child in parent.forks:
            child.pages = self.allocator.share(parent.pages[:full])
            if length % ps:
                try:
                    self.allocator.grow(child.pages, length)
                except OutOfPagesError:               # recomputed later from its prompt, alone
                    self.allocator.free(child.pages)
                    child.phase = Phase.WAITING
                    self.waiting.appendleft(child)
                    continue
                self._copies_building[0].append((parent.pages[full], child.pages[full]))
            child.phase, child.num_scheduled, child.prefill_target = Phase.RUNNING, length, length
            self.running.append(child)
            spec = self._sample_spec(child)
            if parent.counts_slot >= 0:                # the parent's row holds the prompt; the child gets a copy
                child.counts_slot = self._take_slot()
                self._copies_building[1].append((parent.counts_slot, child.counts_slot))
                spec.counts_slot = parent.counts_slot  # its first token is sampled before the copy is made
            samples.append((child.req_id, spec))
        parent.forks = []
        return samples

    def _take_slot(self) -> int:
        if self._free_slots:
            return heapq.heappop(self._free_slots)
        self._next_slot += 1
        return self._next_slot - 1

    def _fed_entries(self, feed_from: StepPlan) -> list[PlanEntry]:
        """Entries for the requests of the in-flight decode step ``feed_from`` whose next token is certain to be
        computed: running, only that token in flight, not ending by length when it lands, no grammar (its mask
        needs the token), and a page for it. Token id FED_TOKEN; sampling spec one output further."""
        entries = []
        for e in feed_from.entries:
            req = self.requests.get(e.req_id)
            if (req is None or req.phase is not Phase.RUNNING or req.matcher is not None or e.forks
                    or req.num_scheduled != req.num_tokens or req.num_scheduled < req.prefill_target
                    or len(req.output_token_ids) + 1 >= req.params.max_tokens
                    or req.num_tokens + 1 >= self.config.max_model_len):
                continue
            try:
                self.allocator.grow(req.pages, req.num_tokens + 1)
            except OutOfPagesError:
                continue                              # it decodes once its token is back (and may preempt then)
            entries.append(self._decode_entry(req, req.num_scheduled, [FED_TOKEN], ahead=1))
        return entries

    def _decode_entry(self, req: Request, start: int, token_ids: list[int], ahead: int = 0) -> PlanEntry:
        """A decode entry of ``token_ids`` from position ``start`` (its pages already cover them), marked
        scheduled; ``ahead``: outputs still in flight before the one it samples."""
        req.num_scheduled = start + len(token_ids)
        entry = PlanEntry(req.req_id, token_ids, start, list(req.pages), self._sample_spec(req, ahead=ahead))
        if req.counts_slot >= 0:
            entry.counts = CountsRef(req.counts_slot, len(req.prompt_token_ids))
        return entry

    def _schedule_decode(self, feed_from: StepPlan | None = None) -> StepPlan | None:
        if feed_from is None and len(self._decode_inflight) >= self.config.max_decode_inflight:
            return None                # the requests that are ready join the next batch instead of splitting it
        fed = self._fed_entries(feed_from) if feed_from is not None else []
        ready = [r for r in self.running if r.num_scheduled < r.num_tokens and r.num_scheduled >= r.prefill_target]
        ready = ready[: self.config.max_num_seqs - len(fed)]
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
            entries.append(self._decode_entry(req, req.num_scheduled, req.tokens(req.num_scheduled)))
        entries = [e for e in entries if self.requests[e.req_id].phase is Phase.RUNNING]
        if not entries and not fed:
            return None
        return StepPlan(next(self._steps), is_decode=True, entries=fed + entries,
                        fed_from=feed_from.step_id if fed else None)

    def _preempt_victim(self, exclude: Request) -> Request | None:
        # the newest running request that is not waiting on an in-flight result gives its pages back
        for req in reversed(self.running):
            if req is not exclude and not req.awaiting_token and req.num_scheduled >= req.prefill_target:
                return req
        return None

    def _preempt(self, req: Request) -> None:
        log.info("preempting request %s (KV cache full); it will be recomputed", req.external_id)
        self.allocator.free(req.pages)
        self._release_slot(req)
        self.running.remove(req)
        req.phase, req.num_scheduled = Phase.WAITING, 0
        self.waiting.appendleft(req)

    def _release_slot(self, req: Request) -> None:
        if req.counts_slot >= 0:
            heapq.heappush(self._free_slots, req.counts_slot)
            req.counts_slot = -1

    def _sample_spec(self, req: Request, ahead: int = 0) -> SampleSpec:
        """``ahead``: outputs still in flight before the one this spec samples."""
        p = req.params
        k = len(req.output_token_ids) + ahead
        spec = SampleSpec(p.temperature, p.top_p, p.top_k, req.seed, k, p.logprobs,
                          presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                          repetition_penalty=p.repetition_penalty, counts_slot=req.counts_slot, logit_bias=req.bias)
        if k < p.min_tokens:                  # eos and stop tokens may not end the output yet
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            spec.banned_token_ids = tuple(sorted(banned))
        if req.matcher is not None:
            mask = allocate_bitmask(1, req.matcher.vocab_size)
            req.matcher.fill_bitmask(mask, 0)
            spec.allowed_bitmask = mask[0]
        return spec

    # ---- results -----------------------------------------------------------------------------------
    def process_results(self, plan: StepPlan, results: list[StepItem]) -> list[StepOutput]:
        """Every finished step comes here (with no results when it sampled nothing), in submission order."""
        self._prefill_inflight.discard(plan.step_id)
        self._decode_inflight.discard(plan.step_id)
        for item in results:
            if isinstance(item, PromptLogprobs):
                req = self.requests.get(item.req_id)
                if req is not None and req.prompt_logprobs is not None:
                    req.prompt_logprobs.update(zip(item.positions, item.logprobs))
        outputs = []
        for res in results:
            if not isinstance(res, SampledToken):
                continue
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
                                      num_prompt_tokens=len(req.prompt_token_ids), index=req.index,
                                      prompt_logprobs=self._deliver_prompt_logprobs(req)))
        for e in plan.entries:                 # prompt-only requests end when their last chunk is computed
            req = self.requests.get(e.req_id)
            if req is not None and req.prompt_only and req.phase is Phase.RUNNING and e.seq_len == req.prefill_target:
                for seq in self.groups.get(req.external_id, []):     # sequence 0 and the unforked others
                    outputs.append(StepOutput(seq.external_id, [], None, finished=True,
                                              finish_reason=FinishReason.LENGTH.value,
                                              num_prompt_tokens=len(seq.prompt_token_ids), index=seq.index,
                                              prompt_logprobs=self._deliver_prompt_logprobs(seq)))
                self._finish(req, FinishReason.LENGTH.value)
        return outputs

    @staticmethod
    def _deliver_prompt_logprobs(req: Request) -> list[dict[int, float] | None] | None:
        """The prompt's logprobs (None for its first token), once, when they are all in."""
        got = req.prompt_logprobs
        if got is None:
            return None
        req.prompt_logprobs = None
        n = len(req.prompt_token_ids)
        missing = [i for i in range(1, n) if i not in got]
        if missing:
            raise RuntimeError(f"prompt logprobs of request {req.external_id!r} lack positions {missing[:5]}")
        return [None] + [got[i] for i in range(1, n)]

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if req.matcher is not None:
            try:
                req.matcher.accept(token)
            except StructuredOutputError as e:   # the mask was applied, so this is a bug: end the sequence loudly
                log.error("request %s: %s", req.external_id, e)
                return FinishReason.ABORT.value
            if req.matcher.is_terminated():
                return FinishReason.STOP.value
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
        self._release_slot(req)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        group = self.groups.get(req.external_id, [])
        if req.index == 0:
            for child in req.forks:            # never forked (the request ended first): they end with it
                if child.phase is Phase.FORK:
                    self._finish(child, reason)
            req.forks = []
        elif group and req in group[0].forks:
            group[0].forks.remove(req)
        if all(r.phase is Phase.FINISHED for r in group):
            self.groups.pop(req.external_id, None)
        self.requests.pop(req.req_id, None)
