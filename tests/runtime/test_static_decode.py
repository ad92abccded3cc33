"""The runner's static decode path on CPU, including the CUDA-graph replay path with a stand-in that runs the
captured forward eagerly: steps padded to a batch-size bucket over the full block-table width, padding rows
writing only the sink page, and pipeline stages feeding a later stage's static activation buffers. Each
must give the tokens of the plain eager step (and the same KV cache outside the sink page)."""

from __future__ import annotations

import pytest
import torch

from dsaserve.args import EngineArgs
from dsaserve.config import ModelConfig
from dsaserve.model.shard import StageShard
from dsaserve.runtime.cuda_graphs import DecodeGraphs, batch_buckets, width_classes
from dsaserve.runtime.plan import PlanEntry, SampleSpec, StepPlan
from dsaserve.runtime.runner import ModelRunner

pytestmark = pytest.mark.timeout(300)

PAGE = 64
MAX_LEN = 512


class EagerReplay(DecodeGraphs):
    """What a replay does, without CUDA: the forward a graph would have captured for the bucket runs eagerly on
    the bucket's staged views (same padding, same width, same static activation buffers)."""

    def capture_on_cpu(self) -> None:
        self.graphs = dict(sorted(((b, w), None) for b in self.buckets for w in self.widths))
        self.replayed: list[int] = []
        self.widths_replayed: list[int] = []

    def replay(self, key, n, hidden, residual):
        if not self.first:
            self.hidden_in[:n].copy_(hidden)
            self.residual_in[:n].copy_(residual)
        bucket, width = key
        self.replayed.append(bucket)
        self.widths_replayed.append(width)
        h, r, logits = self._forward(self.inputs.views(bucket, width), bucket)
        return h[:n], r[:n], (logits[:n] if logits is not None else None)


def _runner(ckpt: str, shard: StageShard | None, replay: bool, indexer: str) -> ModelRunner:
    cfg = ModelConfig.from_hf(ckpt)
    args = EngineArgs(attention_backend="triton", indexer_mode=indexer, max_num_seqs=8, kv_cache_tokens=4096,
                      page_size=PAGE)
    r = ModelRunner(ckpt, cfg, shard or StageShard.whole(cfg), args, device=torch.device("cpu"), dtype=torch.float32,
                    progress=False)
    r.allocate_cache(r.propose_num_pages(MAX_LEN))
    r.init_decode(MAX_LEN)
    assert r.static_decode and r.decode_width == MAX_LEN // PAGE
    if replay:
        # two width classes: 2 pages (128 keys) and the full 8
        r.graphs = EagerReplay(r.model, r.cache, r.decode_inputs, r.decode_width, batch_buckets(8),
                               hidden_size=cfg.hidden_size, dtype=torch.float32, device=torch.device("cpu"),
                               widths=width_classes(r.decode_width, PAGE, first_keys=2 * PAGE))
        r.graphs.capture_on_cpu()
    return r


def _generate(runners: list[ModelRunner], prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list]:
    """Prefill every prompt in one step, then ``steps`` greedy decode steps through the chain of stages."""
    tables, pages = [], iter(range(1000))
    for p in prompts:                                 # pages interleaved between requests, one spare each
        tables.append([next(pages) for _ in range(-(-(len(p) + steps + 1) // PAGE))])

    def run(plan: StepPlan):
        hidden = residual = None
        steps = []
        for r in runners:
            steps.append(r.prepare(plan))
            hidden, residual = r.forward(steps[-1], hidden, residual)
        pending = runners[-1].sample_async(plan, steps[-1], hidden, residual)
        for r, step in zip(runners, steps):            # as the worker does: the next step staged meanwhile
            r.stage_ahead(plan, step)
        return runners[-1].finish(pending)

    spec = lambda i, t: SampleSpec(0.0, 1.0, -1, i, t, 4)          # noqa: E731  greedy, logprobs 4
    out = run(StepPlan(0, False, [PlanEntry(i, p, 0, tables[i][: -(-len(p) // PAGE)], spec(i, 0))
                                  for i, p in enumerate(prompts)]))
    tokens = [[t.token_id] for t in out]
    logprobs = [[t.logprobs] for t in out]
    for s in range(1, steps + 1):
        plan = StepPlan(s, True, [PlanEntry(i, [tokens[i][-1]], len(p) + s - 1,
                                            tables[i][: (len(p) + s - 1) // PAGE + 1], spec(i, s))
                                  for i, p in enumerate(prompts)])
        for t in run(plan):
            tokens[t.req_id].append(t.token_id)
            logprobs[t.req_id].append(t.logprobs)
    return tokens, logprobs


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(5, 480, (length,), generator=g).tolist() for length in (40, 70, 150, 5, 63)[:n]]


def _close(a, b):
    for x, y in zip(a, b):
        for lx, ly in zip(x, y):
            assert set(lx) == set(ly) and max(abs(lx[k] - ly[k]) for k in lx) < 1e-5


@pytest.mark.parametrize("indexer", ["exact", "fp8"])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_padded_bucket_replay_equals_the_eager_step(tiny_ds, indexer, n):
    """Buckets 1, 4 and 8 for 1, 3 and 5 requests (no padding, 1 and 3 padding rows), each at the narrowest
    block-table width class that holds its longest request."""
    eager = _runner(tiny_ds, None, False, indexer)
    padded = _runner(tiny_ds, None, True, indexer)
    prompts = _prompts(n)
    want, want_lp = _generate([eager], prompts, 12)             # 150 + 12 keys: sparse top-k (index_topk 32)
    got, got_lp = _generate([padded], prompts, 12)
    assert got == want
    _close(got_lp, want_lp)
    assert set(padded.graphs.replayed) == {1 if n == 1 else 4 if n == 3 else 8}
    # the narrowest width class that holds the longest request: 1 page (40 + 12 tokens) -> 2; 3 pages -> 8
    assert set(padded.graphs.widths_replayed) == ({2} if n == 1 else {8})
    # 11 decode steps after the first: staged ahead, but for steps whose request crossed into a new page
    ahead = padded.decode_inputs
    assert ahead.ahead_hits >= 11 - n and ahead.ahead_hits + ahead.ahead_misses <= 11
    sink = padded.cache.sink_slot
    for layer, c in padded.cache.layers.items():
        ref = eager.cache.layers[layer]
        assert torch.allclose(c.latent[:sink], ref.latent[:sink], atol=1e-5)        # same pages, same values
        assert torch.equal(ref.latent[sink:], torch.zeros_like(ref.latent[sink:]))  # eager: no padding rows
        if n != 1:
            assert c.latent[sink].abs().sum() > 0                                   # padding wrote the sink


def test_pipeline_stages_replay_with_static_activation_buffers(tiny_ds):
    """Two stages (layers 0-1 and 2-3) chained in one process, both replaying padded buckets: the later stage
    copies the received activations into its static buffers. Same tokens as the whole model eagerly."""
    cfg = ModelConfig.from_hf(tiny_ds)
    whole = _runner(tiny_ds, None, False, "exact")
    stages = [_runner(tiny_ds, StageShard(cfg.num_hidden_layers, 0, 2), True, "exact"),
              _runner(tiny_ds, StageShard(cfg.num_hidden_layers, 2, 4), True, "exact")]
    prompts = _prompts(3)
    want, want_lp = _generate([whole], prompts, 8)
    got, got_lp = _generate(stages, prompts, 8)
    assert got == want
    _close(got_lp, want_lp)
    assert stages[1].graphs.hidden_in is not None and set(stages[1].graphs.replayed) == {4}


def test_decode_inputs_pad_rows_and_reuse_views(tiny_ds):
    r = _runner(tiny_ds, None, False, "exact")
    entries = [PlanEntry(7, [11], 70, [3, 9], SampleSpec(0.5, 0.9, 4, 1, 2, None))]
    v = r.decode_inputs.stage(entries, 4, 8)
    assert v is r.decode_inputs.views(4, 8)                       # fixed views per (rows, width): graph inputs
    assert v.input_ids.tolist() == [11, 0, 0, 0] and v.positions.tolist() == [70, 0, 0, 0]
    assert v.write_slots.tolist() == [9 * PAGE + 6] + [r.cache.sink_slot] * 3
    assert v.context_lens.tolist() == [71, 0, 0, 0] and v.token_req.tolist() == [0, -1, -1, -1]
    assert v.block_tables.tolist() == [[3, 9, 0, 0, 0, 0, 0, 0]] + [[0] * 8] * 3
    assert v.sampling.temperature.tolist() == [0.5, 0, 0, 0] and v.sampling.top_k.tolist() == [4, 0, 0, 0]
    with pytest.raises(ValueError, match="do not fit"):
        r.decode_inputs.stage(entries * 5, 4, 8)


def _staged_bytes(inputs, entries, rows, width) -> dict:
    """The device fields of (rows, width) after staging ``entries`` (what the model's views read), as bytes."""
    inputs.stage(entries, rows, width)
    return {k: bytes(v.numpy()) for k, v in inputs._typed(inputs.device_buf, rows, width).items()}


def test_staging_ahead_writes_what_staging_the_step_writes():
    """``stage_ahead`` + ``stage`` leave the same device bytes as ``stage`` alone, whether the prediction holds
    (every request one token further) or not (a new page, another sampling spec, a request more, a grammar
    mask, another width); only a held prediction counts as a hit."""
    from dataclasses import replace

    from dsaserve.runtime.decode_inputs import DecodeInputs

    def spec(i, t, **kw):
        return SampleSpec(0.7, 0.9, 5, 100 + i, t, None, counts_slot=i, presence_penalty=0.5, **kw)

    cur = [PlanEntry(3, [11], 70, [3, 9], spec(0, 4)), PlanEntry(8, [12], 126, [4, 6], spec(1, 9))]

    def nxt(entries, tokens):
        return [PlanEntry(e.req_id, [t], e.start_pos + 1, list(e.block_table), replace(e.sample,
                          output_index=e.sample.output_index + 1)) for e, t in zip(entries, tokens)]

    held = nxt(cur, [21, 22])
    crossed = nxt(cur[:1], [21]) + [PlanEntry(8, [22], 128, [4, 6, 7], spec(1, 10))]   # 128: a new page
    cases = [  # (the step after ``cur``, staged ahead from ``cur``?, hit?)
        (held, True, True),
        ([held[0], replace(held[1], sample=replace(held[1].sample, temperature=0.0))], True, False),
        (held + [PlanEntry(9, [5], 3, [1], spec(2, 0))], True, False),
        ([held[0], replace(held[1], block_table=[4, 5])], True, False),
        ([held[0], replace(held[1], start_pos=125)], True, False),
        ([held[0], replace(held[1], sample=replace(held[1].sample, allowed_bitmask=torch.ones(4, dtype=torch.int32)))],
         True, False),
    ]
    for want_next, made, hit in cases:
        plain = DecodeInputs(4, 8, torch.device("cpu"), PAGE, 999)
        _staged_bytes(plain, cur, 4, 8)
        want = _staged_bytes(plain, want_next, 4, 8)
        ahead = DecodeInputs(4, 8, torch.device("cpu"), PAGE, 999)
        _staged_bytes(ahead, cur, 4, 8)
        assert ahead.stage_ahead(cur, 4, 8) is made
        assert _staged_bytes(ahead, want_next, 4, 8) == want
        assert (ahead.ahead_hits, ahead.ahead_misses) == ((1, 0) if hit else (0, 1))
    # a request whose next token needs a page it does not have yet: nothing is predicted
    edge = [PlanEntry(8, [12], 127, [4, 6], spec(1, 9))]
    inputs = DecodeInputs(4, 8, torch.device("cpu"), PAGE, 999)
    assert inputs.stage_ahead(edge, 4, 8) is False
    # another (rows, width) than predicted: a miss, the right bytes
    plain = DecodeInputs(4, 8, torch.device("cpu"), PAGE, 999)
    inputs.stage_ahead(cur, 4, 8)
    assert _staged_bytes(inputs, held, 2, 8) == _staged_bytes(plain, held, 2, 8) and inputs.ahead_misses == 1


def test_the_static_decode_code_has_no_host_sync_calls():
    """Source check (CPU side of the GPU test under set_sync_debug_mode): no .item() / .tolist() / .cpu() /
    nonzero / bincount on the static decode path (fed token ids included); the sampler's copy back is queued
    by start_host_copy and read in to_host only (two tolist: the pinned copy's, and the no-CUDA fallback's)."""
    from dsaserve.cache.kv_cache import write_rows_unmasked
    from dsaserve.model.attention import TritonAttention
    from dsaserve.model.indexer import Indexer
    from dsaserve.model.mla import CacheWriter
    from dsaserve.runtime import sampler
    from dsaserve.runtime.decode_inputs import DecodeInputs
    from tests.kernels.sync_check import host_sync_calls

    for fn in (Indexer.decode_topk_slots, Indexer._gathered_decode_logits, TritonAttention.attend, CacheWriter.write,
               write_rows_unmasked, DecodeGraphs.replay, DecodeGraphs._forward, DecodeInputs.stage,
               DecodeInputs.stage_ahead, DecodeInputs._fill, DecodeInputs._send,
               sampler.sample_tensors, sampler._draw, sampler._exponential_noise, sampler.hash_exponential,
               ModelRunner.forward, ModelRunner.sample_async, ModelRunner._prepare_static_decode,
               ModelRunner._feed_tokens, ModelRunner._fed_rows, sampler.SampleOutput.start_host_copy,
               sampler.SampleOutput._packed):
        assert host_sync_calls(fn) == [], fn.__qualname__
    assert [c.split(": ")[1] for c in host_sync_calls(sampler.to_host)] == [".tolist(", ".tolist("]


def test_glm_shared_indexer_layers_on_the_static_path(tiny_glm):
    """GLM "shared" indexer layers reuse the last indexer layer's top-k inside a static decode step too."""
    from dsaserve import LLM, SamplingParams

    prompts = _prompts(3)
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=4)
    opts = dict(kv_cache_tokens=4096, max_model_len=MAX_LEN, indexer_mode="exact")
    ref, ker = LLM(tiny_glm, **opts), LLM(tiny_glm, attention_backend="triton", **opts)
    try:
        assert ker.engine.executor.runner.static_decode
        want, got = ref.generate(prompts, params), ker.generate(prompts, params)
    finally:
        ref.shutdown()
        ker.shutdown()
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    _close([o.logprobs for o in got], [o.logprobs for o in want])


def test_buckets_and_the_sync_culprit():
    from dsaserve.runtime.cuda_graphs import _sync_culprit

    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64] and batch_buckets(80) == [1, 2, 4, 8, 16, 32, 64, 80]
    assert batch_buckets(1) == [1]
    # width classes: 32K keys, x4, then the full width; one class when the full width is narrower
    assert width_classes(2560, 64) == [512, 2048, 2560] and width_classes(512, 64) == [512]
    assert width_classes(100, 64) == [100] and width_classes(8, 64, first_keys=128) == [2, 8]
    from dsaserve.runtime.decode_inputs import DecodeInputs

    inputs = DecodeInputs(2, 2, torch.device("cpu"), PAGE, 0)
    with pytest.raises(ValueError) as info:
        inputs.views(5, 5)                          # raised inside dsaserve: the culprit names that line
    assert _sync_culprit(info.value).startswith("the decode step synchronizes with the host at "
                                                "dsaserve/runtime/decode_inputs.py:")


def test_decode_topk_limit_from_the_environment(monkeypatch):
    """DSASERVE_DECODE_RADIX_MAX_KEYS reaches the indexer's limit through the runtime (the model layer reads no
    environment); a bad value is an error naming the variable."""
    from dsaserve.config import ConfigError
    from dsaserve.model import indexer
    from dsaserve.runtime.runner import apply_decode_topk_env

    monkeypatch.setattr(indexer, "DECODE_RADIX_MAX_KEYS", 32768)
    monkeypatch.delenv("DSASERVE_DECODE_RADIX_MAX_KEYS", raising=False)
    apply_decode_topk_env()
    assert indexer.DECODE_RADIX_MAX_KEYS == 32768
    monkeypatch.setenv("DSASERVE_DECODE_RADIX_MAX_KEYS", "1000000")
    apply_decode_topk_env()
    assert indexer.DECODE_RADIX_MAX_KEYS == 1000000
    for bad in ("0", "many"):
        monkeypatch.setenv("DSASERVE_DECODE_RADIX_MAX_KEYS", bad)
        with pytest.raises(ConfigError, match="DSASERVE_DECODE_RADIX_MAX_KEYS"):
            apply_decode_topk_env()
