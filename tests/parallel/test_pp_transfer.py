"""The gather-then-send PP transfer (``pp_transfer="gathered"``, the benchmark ablation of the pre-CP-aware
scheme) gives the same tokens and moves C times the bytes of the default scattered transfer."""

from __future__ import annotations

import pytest

from dsaserve import SamplingParams
from tests.parallel._util import REF_PARAMS, assert_same_outputs, batch_prompts, prompt_ids, set_mode

pytestmark = pytest.mark.timeout(300)

HIDDEN, FP32 = 128, 4


@pytest.fixture(scope="module")
def gathered_llm(pool, ds_ckpt):
    llm = pool.get("ds-2x2-gathered", ds_ckpt, pp_size=2, cp_size=2, pp_transfer="gathered")
    yield llm
    set_mode(llm)
    pool.release("ds-2x2-gathered")


@pytest.mark.parametrize("mode", [("round-robin", 8192), ("zigzag", 7)], ids=lambda m: f"{m[0]}-chunk{m[1]}")
def test_gathered_transfer_matches_single_process(gathered_llm, ds_ref, mode):
    set_mode(gathered_llm, *mode)
    prompts = batch_prompts()
    assert_same_outputs(gathered_llm.generate(prompts, REF_PARAMS), ds_ref.outputs(prompts), f"gathered {mode}")


@pytest.mark.parametrize("cp_split", ["round-robin", "zigzag"])
def test_gathered_sends_c_times_the_local_shard(gathered_llm, cp_split):
    """Each stage-0 rank sends the whole stage's N rows (C x the N/C of the scattered transfer) after an
    extra all-gather; decode tokens are replicated and still go whole, once."""
    C, N = 2, 144
    scattered = N // C * HIDDEN * 2 * FP32
    token = HIDDEN * 2 * FP32
    set_mode(gathered_llm, cp_split, 8192)
    for max_tokens in (1, 3):
        gathered_llm.engine.control("reset")
        gathered_llm.generate([prompt_ids(N)], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        stats = gathered_llm.stats()
        decode = (max_tokens - 1) * token
        for rank in (0, 1):
            b = stats[rank]["comm"]["bytes"]
            assert b["pp_send"] == C * scattered + decode, (rank, b)
            assert b["pp_gather"] == scattered * (C - 1), (rank, b)      # the shard received from the peer
        for rank in (2, 3):
            assert stats[rank]["comm"]["bytes"]["pp_recv"] == C * scattered + decode
    gathered_llm.engine.control("reset")


def test_indexer_launches_reserve_sms_on_both_stages_while_transfers_pend(pool, ds_ckpt):
    """PP2, fp8 indexer on the kernel path, prompts in several chunks: stage 1 has the next chunk's recv
    posted while it computes, stage 0 the previous chunk's send still pending; both run their prefill
    indexer launches on the reserved budget and ``llm.stats()`` counts them per rank. (CPU: an explicit
    ``--indexer-num-sms`` is passed to the launches as on a GPU; 'auto' reserves only on CUDA.)"""
    llm = pool.get("ds-pp2-fp8-sms", ds_ckpt, pp_size=2, indexer_mode="fp8", attention_backend="triton",
                   indexer_num_sms="5")
    set_mode(llm, "round-robin", 48)
    llm.engine.control("reset")
    llm.generate([prompt_ids(150, seed=s) for s in (1, 2)], SamplingParams(max_tokens=1, ignore_eos=True))
    stats = llm.stats()
    for rank in (0, 1):
        budget = stats[rank]["indexer_sm_budget"]
        # 300 prompt tokens in chunks of 48: >= 7 prefill steps; every step after the first has >32 keys
        assert budget["prefills"] >= 7 and budget["launches"] >= budget["prefills"], (rank, budget)
        assert 0 < budget["reserved_launches"] <= budget["launches"], (rank, budget)
    llm.engine.control("reset")
    assert llm.stats()[0]["indexer_sm_budget"]["launches"] == 0
    set_mode(llm)
    pool.release("ds-pp2-fp8-sms")
