"""PP x CP output equals the single-process engine, for every small layout and split mode, one-shot and
chunked prefill, on a batch of prompts shorter than C, not divisible by C and well above index_topk; and
the PP boundary moves exactly each rank's own shard; finally a worker of that layout is SIGKILLed
mid-generation and the engine must fail fast with an error naming it and leave no process behind.

One engine per layout (module-scoped, from the session pool) runs every mode: the workers derive the CP
split and chunking from each step plan, so only the scheduler's config changes between tests.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from dsaserve import SamplingParams
from dsaserve.engine.types import EngineDeadError
from tests.parallel.conftest import Reference, wait_all_gone
from tests.parallel._util import (
    LOGPROB_TOL,
    MAX_TOKENS,
    REF_PARAMS,
    TOPK,
    assert_same_outputs,
    batch_prompts,
    prompt_ids,
    set_mode,
)

pytestmark = pytest.mark.timeout(300)

LAYOUTS = [(1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (3, 1), (1, 3)]
# (cp_split, chunked_prefill_size): one-shot, and chunks that divide neither C nor 2C (3 < C=4 too)
MODES = [("round-robin", 8192), ("zigzag", 8192), ("round-robin", 7), ("zigzag", 3)]
HIDDEN = 128          # the tiny config's hidden_size
FP32 = 4


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda pc: f"pp{pc[0]}xcp{pc[1]}")
def layout_llm(request, pool, ds_ckpt):
    P, C = request.param
    key = f"ds-{P}x{C}"
    llm = pool.get(key, ds_ckpt, pp_size=P, cp_size=C)
    yield P, C, llm
    set_mode(llm)
    pool.release(key)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-chunk{m[1]}")
def test_matches_single_process(layout_llm, ds_ref, mode):
    P, C, llm = layout_llm
    set_mode(llm, *mode)
    prompts = batch_prompts()
    outs = llm.generate(prompts, REF_PARAMS)
    assert_same_outputs(outs, ds_ref.outputs(prompts), f"PP{P} x CP{C} {mode}")


# issue 16: penalties, logit_bias, min_tokens, n > 1 (forked KV pages) and prompt logprobs (each CP rank computes
# those of its own rows, no hidden state gathered) give the single-process result in every layout
API_PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=11, n=2, presence_penalty=0.6,
                            frequency_penalty=0.4, repetition_penalty=1.3, logit_bias={40: 3.0, 41: -50.0},
                            min_tokens=2, prompt_logprobs=TOPK, logprobs=TOPK)


@pytest.mark.parametrize("mode", [("zigzag", 8192), ("round-robin", 7)], ids=lambda m: f"{m[0]}-chunk{m[1]}")
def test_api_features_match_single_process(layout_llm, ds_ref, mode):
    P, C, llm = layout_llm
    set_mode(llm, *mode)
    prompts = batch_prompts()
    outs = llm.generate(prompts, API_PARAMS)
    refs = ds_ref.outputs(prompts, API_PARAMS)
    assert len(outs) == len(refs) == 2 * len(prompts)
    worst = 0.0
    for o, r in zip(outs, refs):
        where = f"PP{P} x CP{C} {mode}, prompt of {len(r.prompt_token_ids)} tokens, sequence {r.index}"
        assert (o.index, o.token_ids, o.finish_reason) == (r.index, r.token_ids, r.finish_reason), where
        assert len(o.prompt_logprobs) == len(r.prompt_logprobs) == len(r.prompt_token_ids), where
        for lo, lr in zip(o.prompt_logprobs[1:], r.prompt_logprobs[1:]):
            assert set(lo) == set(lr), where
            worst = max(worst, max(abs(lo[t] - lr[t]) for t in lr))
    assert worst < LOGPROB_TOL, f"prompt logprobs differ by {worst:.2e}"
    assert len({tuple(o.token_ids) for o in outs[:2]}) == 2            # the two sequences differ
    alloc = llm.engine.scheduler.allocator
    assert alloc.num_free == alloc.num_pages


def test_layout_and_ranks(layout_llm):
    """The world really is P x C processes with the documented rank -> (stage, cp_rank) map."""
    P, C, llm = layout_llm
    stats = llm.stats()
    assert sorted(stats) == list(range(P * C))
    for rank, s in stats.items():
        assert (s["stage"], s["cp_rank"]) == (rank // C, rank % C)
    assert len(llm.engine.executor._procs) == P * C - 1
    assert all(p.is_alive() for p in llm.engine.executor._procs)


def test_second_engine_in_process_is_refused(layout_llm, ds_ckpt):
    """rank 0 is this process and a process holds one torch.distributed world: a second multi-process LLM
    must say so before spawning anything, and leave the running engine working."""
    from dsaserve import LLM
    from tests.parallel._util import LLM_DEFAULTS

    P, C, llm = layout_llm
    spawned = len(llm.engine.executor._procs)
    with pytest.raises(RuntimeError, match="already holds a torch.distributed world.*one PP x CP engine per process"):
        LLM(ds_ckpt, pp_size=2, cp_size=1, **LLM_DEFAULTS)
    assert len(llm.engine.executor._procs) == spawned
    out = llm.generate([prompt_ids(5)], SamplingParams(max_tokens=2, ignore_eos=True, logprobs=5))[0]
    assert len(out.token_ids) == 2


@pytest.mark.parametrize("cp_split", ["round-robin", "zigzag"])
def test_pp_boundary_bytes_are_the_local_shard(layout_llm, cp_split):
    """Prefill of N tokens (N divisible by C and 2C): every rank of stage s < P-1 sends exactly its
    own N/C rows of (hidden, residual) in fp32 — 1/C of the gather-then-send volume — in one send per
    chunk; the peer in stage s+1 receives the same. Each decode step then sends the one replicated token."""
    P, C, llm = layout_llm
    N = 144
    assert N % (2 * C) == 0
    shard = N // C * HIDDEN * 2 * FP32
    token = HIDDEN * 2 * FP32
    cases = [  # (chunk size, max_tokens) -> prefill chunks, decode steps
        (8192, 1, 1, 0),
        (8192, 3, 1, 2),
        (48, 1, 3, 0),      # 3 chunks of 48 tokens: still N/C rows in all, now in 3 sends
    ]
    for chunk, max_tokens, n_chunks, n_decode in cases:
        set_mode(llm, cp_split, chunk)
        llm.engine.control("reset")
        llm.generate([prompt_ids(N)], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        stats = llm.stats()
        for rank, s in stats.items():
            b, calls = s["comm"]["bytes"], s["comm"]["calls"]
            what = f"PP{P} x CP{C} rank {rank} chunk {chunk} max_tokens {max_tokens}"
            if s["stage"] < P - 1:
                assert b.get("pp_send") == shard + n_decode * token, (what, b)
                assert calls.get("pp_send") == n_chunks + n_decode, (what, calls)
            else:
                assert "pp_send" not in b, (what, b)
            if s["stage"] > 0:
                assert b.get("pp_recv") == shard + n_decode * token, (what, b)
                assert calls.get("pp_recv") == n_chunks + n_decode, (what, calls)
            else:
                assert "pp_recv" not in b, (what, b)
            if C == 1:
                assert not any(k.startswith(("cp_", "moe_")) for k in b), (what, b)
            else:
                assert b.get("cp_kv_gather", 0) > 0, (what, b)
        llm.engine.control("reset")


# Which rank to kill per layout, and at which submitted step: chunk 16 over 150 + 37 tokens makes 12 prefill
# steps (kill at 4: mid-prefill, other chunks in flight) followed by decode steps (kill at 15: mid-decode).
VICTIMS = {(1, 2): (1, 4), (2, 1): (1, 15), (2, 2): (1, 4), (1, 4): (2, 15), (4, 1): (3, 4), (3, 1): (1, 15),
           (1, 3): (2, 4)}


def test_worker_killed_mid_generation(layout_llm):
    """Defined last in the module so it runs after the layout's other tests (pytest keeps definition order
    within a module-scoped parameter). Covers middle ranks (2x2 rank 1, 3x1 rank 1) and last stages
    (2x1 rank 1, 4x1 rank 3), during prefill and during decode."""
    P, C, llm = layout_llm
    victim, kill_step = VICTIMS[(P, C)]
    ex = llm.engine.executor
    pids = [p.pid for p in ex._procs]
    assert len(pids) == P * C - 1 and all(p.is_alive() for p in ex._procs)
    set_mode(llm, "round-robin", 16)
    orig_submit, submitted, killed_at = ex.submit, [], []

    def submit(plan):
        submitted.append(plan.is_decode)
        if len(submitted) == kill_step:
            os.kill(pids[victim - 1], signal.SIGKILL)
            killed_at.append(time.monotonic())
        return orig_submit(plan)

    ex.submit = submit
    with pytest.raises(EngineDeadError) as info:
        llm.generate([prompt_ids(150), prompt_ids(37)], SamplingParams(max_tokens=6, ignore_eos=True))
    took = time.monotonic() - killed_at[0]
    msg = str(info.value)
    assert submitted[kill_step - 1] == (kill_step > 12), "the kill did not land in the intended phase"
    assert took < 60, f"the dead worker was noticed only after {took:.1f} s"
    assert f"rank {victim} " in msg and "exited with code -9" in msg, f"killed rank {victim}, got: {msg}"
    with pytest.raises(EngineDeadError):                      # the engine stays dead, it does not hang
        llm.generate([prompt_ids(5)], SamplingParams(max_tokens=1))
    assert not llm.engine.is_healthy()
    left = wait_all_gone(pids, timeout_s=15)
    assert not left, f"orphaned worker processes after the failure: {left}"


# ---- GLM-5 (glm_moe_dsa): layer 2 is a 'shared' indexer layer, so the default PP2 split is 1,3 -------------
@pytest.fixture(scope="module")
def glm_llm(pool, glm_ckpt):
    llm = pool.get("glm-2x2", glm_ckpt, pp_size=2, cp_size=2)           # the README's command: no partition
    yield llm
    pool.release("glm-2x2")


@pytest.mark.parametrize("mode", [("round-robin", 8192), ("zigzag", 5)], ids=lambda m: f"{m[0]}-chunk{m[1]}")
def test_glm_matches_single_process(glm_llm, glm_ref, mode):
    assert [list(r) for r in glm_llm.engine.layout.stage_layers] == [[0], [1, 2, 3]]
    set_mode(glm_llm, *mode)
    prompts = batch_prompts()
    outs = glm_llm.generate(prompts, REF_PARAMS)
    worst = assert_same_outputs(outs, glm_ref.outputs(prompts), f"GLM PP2 x CP2 {mode}")
    assert worst < LOGPROB_TOL


# ---- fp8 indexer (Hadamard + e4m3 keys, the production path; on CPU through the references) ------------------
# Issue 14 item 12: every test above forces indexer_mode="exact". Here the CP gathers carry fp8 keys (sent as
# bytes) and their scales, and decode reads the paged fp8 keys under CP; the output must equal one process
# running the same fp8 indexer.
@pytest.fixture(scope="module")
def fp8_ref(ds_ckpt):
    ref = Reference(ds_ckpt, indexer_mode="fp8")
    yield ref
    ref.llm.shutdown()


@pytest.fixture(scope="module")
def fp8_llm(pool, ds_ckpt):
    llm = pool.get("ds-2x2-fp8", ds_ckpt, pp_size=2, cp_size=2, indexer_mode="fp8")
    yield llm
    pool.release("ds-2x2-fp8")


@pytest.mark.parametrize("mode", [("round-robin", 8192), ("zigzag", 5)], ids=lambda m: f"{m[0]}-chunk{m[1]}")
def test_fp8_indexer_matches_single_process(fp8_llm, fp8_ref, ds_ref, mode):
    set_mode(fp8_llm, *mode)
    prompts = batch_prompts()
    refs = fp8_ref.outputs(prompts)
    # the fp8 path is really taken: its selection differs from the exact indexer's somewhere
    exact = ds_ref.outputs(prompts)
    assert any(r.token_ids != e.token_ids or r.logprobs != e.logprobs for r, e in zip(refs, exact))
    outs = fp8_llm.generate(prompts, REF_PARAMS)
    assert_same_outputs(outs, refs, f"fp8 indexer PP2 x CP2 {mode}")
