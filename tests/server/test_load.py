"""64 concurrent requests (mixed lengths, half streaming) against the fake engine: all complete, and
greedy outputs equal those of sequential runs."""

from __future__ import annotations

import pytest

pytest.importorskip("openai")

from .fake_engine import TOKENIZER, expected_greedy_ids  # noqa: E402
from .load_util import make_requests, run_load  # noqa: E402


def test_64_concurrent_equal_sequential(fake_server):
    reqs = make_requests(64, seed=1)
    engine = fake_server.engine
    steps0 = engine.steps
    sequential = run_load(fake_server.base_url, "fake-model", reqs, concurrent=False)
    seq_steps = engine.steps - steps0
    steps0 = engine.steps
    concurrent = run_load(fake_server.base_url, "fake-model", reqs, concurrent=True)
    conc_steps = engine.steps - steps0
    assert concurrent == sequential
    for r, (text, n) in zip(reqs, sequential):
        assert n == r["max_tokens"]
        if not r["chat"]:
            ids = TOKENIZER.encode(r["text"])
            assert text == TOKENIZER.decode(expected_greedy_ids(ids, n))
    # Continuous batching really happened: far fewer engine steps than one request at a time.
    assert conc_steps < seq_steps / 2, (conc_steps, seq_steps)
    assert not engine.has_unfinished_requests()
