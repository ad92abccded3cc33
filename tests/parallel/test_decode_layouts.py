"""The static decode path (persistent inputs, sync-free forward and sampling: what a CUDA graph captures, run
eagerly here) gives the reference path's tokens in every layout: the Triton attention backend (the kernels'
PyTorch references on CPU) in 1 process and under PP, CP and PP x CP, against the single-process engine on
the reference attention backend (the oracle). Greedy tokens identical, logprobs within LOGPROB_TOL."""

from __future__ import annotations

import pytest

from tests.parallel._util import LLM_DEFAULTS, REF_PARAMS, assert_same_outputs, batch_prompts

pytestmark = pytest.mark.timeout(300)

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda pc: f"pp{pc[0]}xcp{pc[1]}")
def test_static_decode_matches_the_reference_path(pool, ds_ckpt, ds_ref, layout):
    P, C = layout
    key = f"ds-{P}x{C}-triton"
    llm = pool.get(key, ds_ckpt, pp_size=P, cp_size=C, attention_backend="triton")
    try:
        if P * C == 1:
            assert llm.engine.executor.runner.static_decode       # the path under test is the one taken
        prompts = batch_prompts()
        assert_same_outputs(llm.generate(prompts, REF_PARAMS), ds_ref.outputs(prompts), f"static decode PP{P} x CP{C}")
    finally:
        pool.release(key)


def test_static_decode_with_fp8_index_keys_under_pp_and_cp(pool, ds_ckpt):
    """fp8 indexer keys in 64-token pages: the paged logits path of the static decode, PP2 x CP2 against the
    single-process reference backend with the same fp8 numerics."""
    from dsaserve import LLM

    prompts = batch_prompts()
    ref = LLM(ds_ckpt, **{**LLM_DEFAULTS, "indexer_mode": "fp8"})
    try:
        expected = ref.generate(prompts, REF_PARAMS)
    finally:
        ref.shutdown()
    llm = pool.get("ds-2x2-triton-fp8", ds_ckpt, pp_size=2, cp_size=2, attention_backend="triton", indexer_mode="fp8")
    try:
        assert_same_outputs(llm.generate(prompts, REF_PARAMS), expected, "static decode fp8 PP2 x CP2")
    finally:
        pool.release("ds-2x2-triton-fp8")
