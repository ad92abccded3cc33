"""Decode CUDA graphs on a GPU (skipped without CUDA): graphs on vs off give the same greedy tokens (B = 1, 7,
32), a captured decode step (and the eager static step, and the sampler) issues no host sync, and a backend
that syncs falls back to eager with a reason naming the spot.

Models: the tiny DeepSeek-V3.2 config in fp32 (random weights). The routed experts' "loop" backend sizes its
per-expert batches on the host, so it cannot be captured; the graph tests use an all-dense variant of the
tiny model (``first_k_dense_replace`` = every layer), plus the MoE model with every sync-free experts backend
the build has (with fp8 experts: the bf16 grouped GEMM takes no fp32 weights). Run: ``python -m pytest -q tests/gpu`` (benchmarks/run_decode.sh runs it first).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]

MAX_TOKENS = 16


def _capturable_moe_backends() -> list[str]:
    """Explicit sync-free experts backends ("auto" picks "loop" for these fp32 models: torch's bf16-only
    grouped_mm cannot take fp32 weights, so the grouped runs use fp8 experts, which any model dtype takes)."""
    from dsaserve.args import MOE_BACKENDS

    return [b for b in MOE_BACKENDS if b not in ("loop", "auto")]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from dsaserve.checkpoint.tiny import make_tiny_checkpoint

    base = tmp_path_factory.mktemp("gpu_tiny")
    return {"dense": make_tiny_checkpoint(str(base / "dense"), first_k_dense_replace=4),
            "moe": make_tiny_checkpoint(str(base / "moe"))}


def _llm(path: str, eager: bool, **kw):
    from dsaserve import LLM

    opts = dict(device="cuda", dtype="float32", max_num_seqs=32, kv_cache_tokens=65536, max_model_len=2048,
                skip_warmup=True, enforce_eager=eager)
    opts.update(kw)
    return LLM(path, **opts)


def _prompts(b: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(b)
    lengths = [5, 40, 150, 33, 300, 17, 64, 2]                       # below and well above index_topk = 32
    return [torch.randint(5, 480, (lengths[i % len(lengths)] + i,), generator=g).tolist() for i in range(b)]


def _replays(llm) -> list[tuple[int, int]]:
    """Wrap the runner's graph replay to record the (bucket, width) graphs it replays."""
    graphs = llm.engine.executor.runner.graphs
    seen, replay = [], graphs.replay

    def spy(key, n, hidden, residual):
        seen.append(key)
        return replay(key, n, hidden, residual)

    graphs.replay = spy
    return seen


@pytest.mark.parametrize("model", ["dense", *(f"moe-{b}" for b in _capturable_moe_backends())])
def test_graphs_on_and_off_give_the_same_greedy_tokens(ckpts, model):
    from dsaserve import SamplingParams

    path, moe = ((ckpts["dense"], {}) if model == "dense"
                 else (ckpts["moe"], {"moe_backend": model[4:], "quantization": "fp8"}))
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)
    graphs, eager = _llm(path, False, **moe), _llm(path, True, **moe)
    try:
        runner = graphs.engine.executor.runner
        assert runner.graphs is not None and runner.graphs.reason is None, runner.graphs.report
        assert runner.graphs.report["buckets"] == [1, 2, 4, 8, 16, 32]
        assert eager.engine.executor.runner.graphs is None
        replays = _replays(graphs)
        for b in (1, 7, 32):
            prompts = _prompts(b)
            got, want = graphs.generate(prompts, params), eager.generate(prompts, params)
            for i, (g, w) in enumerate(zip(got, want)):
                assert g.token_ids == w.token_ids, f"B={b}, request {i}: graphs {g.token_ids} != eager {w.token_ids}"
                for lg, lw in zip(g.logprobs, w.logprobs):
                    assert max(abs(lg[t] - lw[t]) for t in lw if t in lg) < 1e-3
        assert {1, 8, 32} <= {b for b, _ in replays}, replays    # B = 7 replays the 8-row bucket with padding
    finally:
        graphs.shutdown()
        eager.shutdown()


def test_width_classes_and_the_wide_topk_give_the_tokens_of_eager_decode(ckpts, monkeypatch):
    """Graphs per block-table width class (here 4 / 16 / 32 pages: 256-key classes instead of 32K), steps at the
    narrowest class that holds them, and rows wider than the radix limit (here 256 keys instead of 32K) through
    torch.topk in column order: the greedy tokens of eager decode (exact-width steps)."""
    from dsaserve import SamplingParams
    from dsaserve.model import indexer
    from dsaserve.runtime import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "GRAPH_WIDTH_KEYS", 256)
    monkeypatch.setattr(indexer, "DECODE_RADIX_MAX_KEYS", 256)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)
    graphs, eager = _llm(ckpts["dense"], False), _llm(ckpts["dense"], True)
    try:
        report = graphs.engine.executor.runner.graphs.report
        assert report["width_classes"] == [4, 16, 32] and report["eager_reason"] is None, report
        replays = _replays(graphs)
        for b in (1, 7):
            prompts = _prompts(b)
            for i, (g, w) in enumerate(zip(graphs.generate(prompts, params), eager.generate(prompts, params))):
                assert g.token_ids == w.token_ids, f"B={b}, request {i}: graphs {g.token_ids} != eager {w.token_ids}"
        assert {w for _, w in replays} == {4, 16}, replays     # B=1: 5 + 16 tokens; B=7: up to 306 + 16
    finally:
        graphs.shutdown()
        eager.shutdown()


def test_fed_decode_steps_give_the_tokens_of_sync_scheduling(ckpts):
    """Decode steps queued back to back, each fed the previous step's samples on the device (the engine's default
    in one process), replaying graphs: the tokens of sync scheduling, for greedy and seeded sampled requests."""
    from dsaserve import SamplingParams

    params = [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=MAX_TOKENS - 5, ignore_eos=True, temperature=0.8, top_p=0.9, seed=5)]
    fed, sync = _llm(ckpts["dense"], False), _llm(ckpts["dense"], False, sync_scheduling=True)
    try:
        submitted, submit = [], fed.engine.executor.submit
        fed.engine.executor.submit = lambda plan: (submitted.append(plan), submit(plan))[1]
        for b in (1, 7, 32):
            prompts = _prompts(b)
            ps = [params[i % 2] for i in range(b)]
            for i, (g, w) in enumerate(zip(fed.generate(prompts, ps), sync.generate(prompts, ps))):
                assert g.token_ids == w.token_ids, f"B={b}, request {i}: fed {g.token_ids} != sync {w.token_ids}"
        assert sum(p.fed_from is not None for p in submitted) >= 3 * (MAX_TOKENS - 3)
    finally:
        fed.shutdown()
        sync.shutdown()


def _decode_plan(llm, b: int):
    """Prefill b requests through the engine, then a decode plan of all of them (sampled, with logprobs)."""
    from dsaserve.runtime.plan import PlanEntry, SampleSpec, StepPlan

    engine = llm.engine
    prompts = _prompts(b)
    alloc, ps = engine.scheduler.allocator, engine.args.page_size
    entries = []
    for i, p in enumerate(prompts):
        pages: list[int] = []
        alloc.grow(pages, len(p) + 2)                 # this step and a fed one after it
        prefill = StepPlan(10_000 + i, False, [PlanEntry(10_000 + i, p, 0, pages, None)])
        engine.executor.wait(engine.executor.submit(prefill))
        entries.append(PlanEntry(10_000 + i, [7], len(p), pages, SampleSpec(0.8, 0.9, 20, i, 1, 4)))
    return StepPlan(20_000, True, entries)


@pytest.mark.parametrize("eager", [False, True], ids=["graph", "eager"])
def test_a_decode_step_issues_no_host_sync(ckpts, eager):
    """Forward (a graph replay, or the eager static step) and sampling under set_sync_debug_mode("error")."""
    from dataclasses import replace

    from dsaserve.runtime.plan import FED_TOKEN, PlanEntry, StepPlan
    from dsaserve.runtime.sampler import sample_tensors, to_host

    llm = _llm(ckpts["dense"], eager)
    try:
        runner = llm.engine.executor.runner
        plan = _decode_plan(llm, 7)
        step = runner.prepare(plan)                       # host work: staging + one non-blocking copy
        assert (step.graph_bucket is None) == eager
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            hidden, residual = runner.forward(step)
            pending = runner.sample_async(plan, step, hidden, residual)
            rows = step.sampling.temperature.shape[0]     # a graph step's tensors are padded to its bucket (8)
            again = sample_tensors(pending.output.tokens.new_zeros(rows, 512).float().normal_(), pending.specs,
                                   step.sampling)         # the sampler alone too, every filter on
            runner.stage_ahead(plan, step)
            # the next step, fed this one's samples on the device, queued before this one's tokens are read
            fed_plan = StepPlan(plan.step_id + 1, True, [
                PlanEntry(e.req_id, [FED_TOKEN], e.start_pos + 1, e.block_table, replace(e.sample, output_index=2))
                for e in plan.entries], fed_from=plan.step_id)
            fed_step = runner.prepare(fed_plan)
            fed_pending = runner.sample_async(fed_plan, fed_step, *runner.forward(fed_step))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        tokens = runner.finish(pending)                   # the one sync of the step
        assert len(tokens) == 7 and all(t.logprobs is not None and len(t.logprobs) >= 4 for t in tokens)
        fed_ids = fed_step.input_ids[:7].tolist()
        assert fed_ids == [t.token_id for t in tokens]    # the fed step read this step's samples
        assert len(runner.finish(fed_pending)) == 7
        assert len(to_host(again, pending.specs, pending.req_ids)) == 7
    finally:
        llm.shutdown()


def test_a_syncing_backend_falls_back_to_eager_with_the_reason(ckpts):
    """The loop experts read per-expert counts on the host: no graphs, the reason names moe.py, decode works."""
    from dsaserve import SamplingParams

    llm = _llm(ckpts["moe"], False, moe_backend="loop")
    try:
        graphs = llm.engine.executor.runner.graphs
        assert graphs.graphs == {} and graphs.reason and "moe.py" in graphs.reason, graphs.report
        out = llm.generate(_prompts(3), SamplingParams(max_tokens=4, ignore_eos=True))
        assert all(len(o.token_ids) == 4 for o in out)
    finally:
        llm.shutdown()


def test_a_prefill_chunk_forward_issues_no_host_sync(ckpts):
    """A prefill step's forward (fp8 indexer top-k over the cache, dense requests too, a chunk that starts
    mid-prompt) under set_sync_debug_mode("error"): the per-request token lists and key ranges come from the
    host copies the runner keeps, and the runner's input copies do not wait for the GPU."""
    from dsaserve.runtime.plan import PlanEntry, StepPlan

    llm = _llm(ckpts["dense"], True)
    try:
        engine, runner = llm.engine, llm.engine.executor.runner
        alloc = engine.scheduler.allocator
        long_prompt = torch.randint(5, 480, (330,), generator=torch.Generator().manual_seed(3)).tolist()
        short_prompt = list(range(5, 25))                                     # index_topk is 32: dense
        pages_a: list[int] = []
        pages_b: list[int] = []
        alloc.grow(pages_a, len(long_prompt))
        alloc.grow(pages_b, len(short_prompt))
        first = StepPlan(30_000, False, [PlanEntry(30_000, long_prompt[:200], 0, pages_a)])
        engine.executor.wait(engine.executor.submit(first))
        plan = StepPlan(30_001, False, [PlanEntry(30_000, long_prompt[200:], 200, pages_a),
                                        PlanEntry(30_001, short_prompt, 0, pages_b)])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step = runner.prepare(plan)
            hidden, _ = runner.forward(step)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert hidden.shape[0] == len(long_prompt) - 200 + len(short_prompt)
        assert torch.isfinite(hidden).all()
    finally:
        llm.shutdown()
