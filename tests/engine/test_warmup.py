"""Start-up warm-up (on CUDA by default, ``skip_warmup`` to turn it off): the warm-up requests go through the
whole engine, cover the shape buckets real requests hit, and leave nothing behind; ``is_ready``."""

from __future__ import annotations

import pytest

from dsaserve import SamplingParams
from dsaserve.engine.engine import LLMEngine

pytestmark = pytest.mark.timeout(300)


def test_warmup_covers_the_shape_buckets_and_leaves_the_engine_clean(world, capsys):
    ckpt = world.ckpt("deepseek_v32")
    engine = LLMEngine(ckpt, kv_cache_tokens=4096, max_model_len=1024, chunked_prefill_size=64, max_num_seqs=20,
                       attention_backend="triton")
    try:
        assert engine.is_ready() and engine.startup["warmup_s"] is None     # CPU: no warm-up by default
        plans = []
        submit = engine.executor.submit
        engine.executor.submit = lambda plan: (plans.append(plan), submit(plan))[1]
        took = engine.warmup()
        del engine.executor.submit
        assert took > 0 and engine.startup["warmup_s"] == round(took, 3)
        assert "warm-up:" in capsys.readouterr().err
        prefill = {p.num_tokens for p in plans if not p.is_decode}          # tokens per prefill step
        decode = sorted({len(p.entries) for p in plans if p.is_decode})
        assert {1, 17, 64} <= prefill                                       # 1 token, short and odd, a full chunk
        # a prompt chunked while another request decodes: decode steps run between its chunks
        last = engine.args.prefill_chunk_while_decoding + 37
        rid = next(e.req_id for p in plans if not p.is_decode for e in p.entries if e.seq_len == last)
        steps = [i for i, p in enumerate(plans) if any(e.req_id == rid for e in p.entries)]
        assert len(steps) > 2 and any(plans[i].is_decode for i in range(steps[0], steps[-1]))
        assert any(e.seq_len == 200 for p in plans if not p.is_decode for e in p.entries)  # a few hundred tokens
        topk = engine.cfg.index_topk
        assert any(e.start_pos + len(e.token_ids) > topk for p in plans if not p.is_decode for e in p.entries)
        assert 1 in decode and 17 in decode and max(decode) >= 4            # decode of one, a few, many
        assert any(e.sample.temperature > 0 for p in plans for e in p.entries if e.sample)
        assert any(e.sample.logprobs for p in plans for e in p.entries if e.sample)
        # nothing left behind: no request, every page free, and the engine serves normally
        assert not engine.has_unfinished_requests() and not engine.scheduler.requests
        assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_pages
        with pytest.raises(RuntimeError, match="idle engine"):
            engine.add_request("x", [5, 6, 7], SamplingParams(max_tokens=2))
            engine.warmup()
    finally:
        engine.shutdown()
