"""Shared constants and comparison helpers of the PP x CP tests."""

from __future__ import annotations

import socket

import torch

from dsaserve import SamplingParams

# Small caches: the CPU default would reserve room for 64 x 16K tokens per rank.
# comm_timeout_s stays at its default (120 s): a dead worker must be detected by liveness checks, not timeouts.
LLM_DEFAULTS = dict(kv_cache_tokens=4096, max_model_len=2048, indexer_mode="exact")
# Prompt lengths: shorter than C (1, 2, 3), not divisible by C=2,3,4 (5, 37), well above index_topk=32 (150).
PROMPT_LENS = (150, 1, 2, 3, 5, 37)
MAX_TOKENS = 4
TOPK = 5
LOGPROB_TOL = 1e-4
REF_PARAMS = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOPK)


def prompt_ids(length: int, seed: int = 7) -> list[int]:
    """A deterministic prompt of ordinary (non-special) token ids."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return torch.randint(5, 480, (length,), generator=gen).tolist()


def batch_prompts() -> list[list[int]]:
    return [prompt_ids(n) for n in PROMPT_LENS]


def assert_same_outputs(outs, refs, what: str) -> float:
    """Greedy tokens identical and top-k logprobs within LOGPROB_TOL, prompt by prompt; returns the max diff."""
    assert len(outs) == len(refs), what
    worst = 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        where = f"{what}, prompt {i} ({len(r.prompt_token_ids)} tokens)"
        assert o.prompt_token_ids == r.prompt_token_ids, where
        assert o.token_ids == r.token_ids, f"{where}: tokens {o.token_ids} != reference {r.token_ids}"
        assert o.logprobs is not None and len(o.logprobs) == len(r.logprobs), where
        for step, (lo, lr) in enumerate(zip(o.logprobs, r.logprobs)):
            assert set(lo) == set(lr), f"{where}, token {step}: top-{TOPK} ids {sorted(lo)} != {sorted(lr)}"
            diff = max(abs(lo[t] - lr[t]) for t in lr)
            assert diff < LOGPROB_TOL, f"{where}, token {step}: logprob diff {diff:.2e}"
            worst = max(worst, diff)
    return worst


def set_mode(llm, cp_split: str = "round-robin", chunk: int = 8192) -> None:
    """Switch a live engine's prefill split / chunk size (workers read both from each step plan)."""
    cfg = llm.engine.scheduler.config
    cfg.cp_split, cfg.chunked_prefill_size = cp_split, chunk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
