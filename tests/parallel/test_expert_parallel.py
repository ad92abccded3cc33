"""Expert parallelism over a CP stage equals the single-process MoE, on real gloo process groups.

The MoE layer of each rank (whole experts ``StageShard.expert_range``, uneven splits included, and more
ranks than some layers have experts for none) runs its ``ExpertParallelTokens`` exchange over a gloo group
of C = 2, 3, 4 spawned processes, for 8, 12, 32 and 256 experts, bf16-layout (fp32 values) and fp8 weights,
both expert backends, in prefill (gather + reduce-scatter) and decode (replicated tokens, all-reduce).
Besides the router's own routing, handcrafted routings put a token's experts all on one rank and leave the
experts of the last rank without any token. The single-process reference is the same layer built whole.
End to end (whole engines, exact and fp8 indexers), see ``test_engine_expert_parallel_matches_single_process``
here and every layout of tests/parallel/test_layouts.py (8 experts).
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from dsaserve import SamplingParams
from tests.parallel._util import LLM_DEFAULTS, assert_same_outputs, free_port, prompt_ids, set_mode

pytestmark = pytest.mark.timeout(600)

# experts -> (n_group, topk_group, top-k) of the tiny variant (group-limited routing as in V3.2)
EXPERTS = {8: (2, 1, 2), 12: (2, 1, 3), 32: (4, 2, 4), 256: (8, 4, 8)}
TOKENS_PER_RANK = 6


def _cfg(n_experts: int):
    from dsaserve.checkpoint.tiny import tiny_config_dict
    from dsaserve.config import ModelConfig

    g, tg, k = EXPERTS[n_experts]
    return ModelConfig.from_dict(tiny_config_dict("deepseek_v32", num_hidden_layers=2, n_routed_experts=n_experts,
                                                  n_group=g, topk_group=tg, num_experts_per_tok=k))


def _moe(cfg, shard, quantization: str, experts: str):
    """Layer 1 (the MoE layer) of a 2-layer model holding ``shard``, random weights of seed 3 (each rank
    draws every tensor whole and keeps its part, so all ranks and the reference share one model)."""
    from dsaserve.checkpoint.random_init import init_random_weights
    from dsaserve.model.backends import select_backends
    from dsaserve.model.deepseek_v32 import DSAModel
    from dsaserve.model.state_dict import checkpoint_specs

    backends = select_backends(quantization=quantization, experts=experts)
    model = DSAModel(cfg, shard, backends=backends, dtype=torch.float32)
    init_random_weights(checkpoint_specs(model), seed=3)
    return model.layers["1"].mlp


def _inputs(cfg, n_tokens: int):
    g = torch.Generator().manual_seed(11)
    return torch.randn(n_tokens, cfg.hidden_size, generator=g)


def _handcrafted_ids(n_experts: int, k: int, cp: int, n_tokens: int) -> torch.Tensor:
    """Token 0: k experts all held by rank 0; every token avoids the last rank's experts (they receive
    nothing); the others draw k distinct experts from the rest."""
    from dsaserve.checkpoint.spec import part_range

    ranges = [range(*part_range(n_experts, r, cp)) for r in range(cp)]
    allowed = torch.tensor([e for r in ranges[:-1] for e in r])
    g = torch.Generator().manual_seed(5)
    ids = allowed[torch.rand(n_tokens, len(allowed), generator=g).topk(k, dim=1).indices]
    ids[0] = torch.tensor(list(ranges[0])[:k])
    return ids


def _batch(n: int, decode: bool):
    from dsaserve.model.batch import ForwardBatch

    return ForwardBatch(positions=torch.zeros(n, dtype=torch.long), token_req=torch.zeros(n, dtype=torch.long),
                        req_seq_lens=[n], block_tables=torch.zeros(1, 1, dtype=torch.long),
                        write_slots=torch.zeros(n, dtype=torch.long), is_decode=decode)


def _cases():
    # on CPU both backends run fp8 experts through the same kernel reference: fp8 once
    return [(e, q, b) for e in EXPERTS for q, b in (("none", "loop"), ("none", "grouped"), ("fp8", "grouped"))]


def _run_layer(moe, x: torch.Tensor, batch, ids: torch.Tensor | None) -> torch.Tensor:
    """The MoE layer, or (handcrafted ``ids``, weights from the ids) its routed part through the same exchange."""
    from dsaserve.model.moe import RoutedTokens

    if ids is None:
        return moe(x, batch)
    weights = 1 / (1 + torch.arange(ids.shape[1], dtype=torch.float32)).expand(ids.shape)
    x_in, x_scale = moe.experts.prepare_input(x)
    routed = moe.tokens.dispatch(RoutedTokens(x_in, x_scale, ids, weights), batch)
    return moe.tokens.combine(moe.experts(routed.x, routed.x_scale, routed.ids, routed.weights), batch)


def _worker(rank: int, cp: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    from dsaserve.model.parallelize import ExpertParallelTokens
    from dsaserve.model.shard import StageShard
    from dsaserve.parallel.stage_comm import CommCounters, GroupStageComm

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp)
        counters = CommCounters()
        comm = GroupStageComm(dist.group.WORLD, counters)
        results = {}
        for n_experts, quantization, experts in _cases():
            cfg = _cfg(n_experts)
            shard = StageShard(2, 0, 2, cp_index=rank, cp_size=cp, expert_part=rank, expert_parts=cp)
            moe = _moe(cfg, shard, quantization, experts)
            moe.tokens = ExpertParallelTokens(comm)
            n = TOKENS_PER_RANK * cp
            x = _inputs(cfg, n)
            mine = torch.arange(rank, n, cp)                                     # round-robin shard
            hand = _handcrafted_ids(n_experts, cfg.num_experts_per_tok, cp, n)
            key = (n_experts, quantization, experts)
            counters.reset()
            with torch.inference_mode():
                results[key + ("prefill",)] = _run_layer(moe, x[mine], _batch(len(mine), False), None)
                results[key + ("bytes",)] = dict(counters.bytes)
                results[key + ("prefill-hand",)] = _run_layer(moe, x[mine], _batch(len(mine), False), hand[mine])
                results[key + ("decode",)] = _run_layer(moe, x, _batch(n, True), None)
                results[key + ("decode-hand",)] = _run_layer(moe, x, _batch(n, True), hand)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda c: f"cp{c}")
def ep_results(request, tmp_path_factory):
    cp = request.param
    outdir = str(tmp_path_factory.mktemp(f"ep{cp}"))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, cp, port, outdir)) for port in [free_port()] for r in range(cp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=500)
    errors = [open(os.path.join(outdir, f)).read() for f in sorted(os.listdir(outdir)) if f.endswith(".err")]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return cp, [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(cp)]


@pytest.mark.parametrize("n_experts,quantization,experts", _cases(), ids=lambda v: str(v))
def test_expert_parallel_equals_single_process(ep_results, n_experts, quantization, experts):
    from dsaserve.model.shard import StageShard

    cp, results = ep_results
    cfg = _cfg(n_experts)
    n = TOKENS_PER_RANK * cp
    k = cfg.num_experts_per_tok
    ref = _moe(cfg, StageShard(2, 0, 2), quantization, experts)
    x = _inputs(cfg, n)
    hand = _handcrafted_ids(n_experts, k, cp, n)
    with torch.inference_mode():
        want = {"prefill": ref(x, _batch(n, False)), "prefill-hand": _run_layer(ref, x, _batch(n, False), hand)}
    want["decode"], want["decode-hand"] = want["prefill"], want["prefill-hand"]
    key = (n_experts, quantization, experts)
    for mode, w in want.items():
        for r in range(cp):
            got = results[r][key + (mode,)]
            rows = slice(None) if mode.startswith("decode") else slice(r, n, cp)
            # fp32 values: only the summation order of the ranks' partials differs from one process (a few
            # ulps of the largest of the k terms)
            torch.testing.assert_close(got, w[rows], rtol=1e-5, atol=1e-6 * float(w.abs().max()),
                                       msg=lambda m: f"{mode}, rank {r} of {cp}: {m}")
    # the handcrafted routing really left the last rank's experts without tokens and kept token 0 on rank 0
    assert hand.max() < StageShard(2, 0, 2, cp_index=cp - 1, cp_size=cp, expert_part=cp - 1,
                                   expert_parts=cp).expert_range(n_experts).start
    # bytes each rank received in the prefill gathers: fp8 experts take e4m3 activations (1 byte + 4 per 128)
    h = cfg.hidden_size
    x_row = h + 4 * (h // 128) if quantization == "fp8" else 4 * h
    for r in range(cp):
        b = results[r][key + ("bytes",)]
        assert b["moe_gather"] + b["moe_route_gather"] == (cp - 1) * TOKENS_PER_RANK * (x_row + 2 * k * 4)
        assert b["moe_scatter"] == (cp - 1) * TOKENS_PER_RANK * h * 4


# ---- whole engines ------------------------------------------------------------------------------------
ENGINE_CASES = [  # (experts, pp, cp, extra options): uneven splits, fp8 weights, the fp8 indexer
    (12, 1, 4, dict()),
    (32, 2, 2, dict(indexer_mode="fp8")),
    (256, 1, 3, dict(indexer_mode="fp8")),
    (8, 1, 3, dict(quantization="fp8")),
]


@pytest.mark.parametrize("n_experts,pp,cp,options", ENGINE_CASES,
                         ids=[f"{e}e-{p}x{c}-{'-'.join(o.values()) or 'exact'}" for e, p, c, o in ENGINE_CASES])
def test_engine_expert_parallel_matches_single_process(pool, tmp_path_factory, n_experts, pp, cp, options):
    from dsaserve import LLM
    from dsaserve.checkpoint.tiny import make_tiny_checkpoint

    g, tg, k = EXPERTS[n_experts]
    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp(f"tiny{n_experts}")), n_routed_experts=n_experts,
                                n_group=g, topk_group=tg, num_experts_per_tok=k)
    prompts = [prompt_ids(n) for n in (150, 3, 37)]
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=5)
    ref = LLM(ckpt, **{**LLM_DEFAULTS, **options})
    try:
        want = ref.generate(prompts, params)
    finally:
        ref.shutdown()
    llm = pool.get(f"ep-{n_experts}-{pp}x{cp}", ckpt, pp_size=pp, cp_size=cp, **options)
    try:
        assert_same_outputs(llm.generate(prompts, params), want, f"{n_experts} experts on {pp}x{cp} {options}")
        _check_moe_stats(llm, n_experts, pp, cp, options.get("quantization") == "fp8")
    finally:
        set_mode(llm)
        pool.release(f"ep-{n_experts}-{pp}x{cp}")


def _check_moe_stats(llm, n_experts: int, pp: int, cp: int, fp8: bool) -> None:
    """``llm.stats()`` of every rank: the MoE bytes moved by one prefill (2 chunks, the last one short) ==
    memory_plan.moe_comm_bytes, and the weight bytes allocated == the plan (the tiny experts are too small for
    fp8 to save bytes: their 32-wide intermediate dim pads to one 128 block; see ``dsaserve plan``)."""
    from dsaserve.model import memory_plan as mp
    from dsaserve.parallel.layout import Layout

    cfg = llm.engine.cfg
    layout = Layout.build(cfg, pp, cp)
    n, chunk = 150, 96
    set_mode(llm, "round-robin", chunk)
    llm.engine.control("reset")
    llm.generate([prompt_ids(n)], SamplingParams(max_tokens=1, ignore_eos=True))
    for rank, s in llm.stats().items():
        layers = layout.stage_layers[s["stage"]]
        want = mp.moe_comm_bytes(cfg, layers, prompt_tokens=n, chunk_tokens=chunk, cp_size=cp, dtype="float32",
                                 fp8_experts=fp8)
        got = {k: v for k, v in s["comm"]["bytes"].items() if k.startswith("moe_")}
        assert got == {k: v for k, v in want.items() if v}, f"rank {rank}: {got} vs plan {want}"
        assert got["moe_gather"] > 0, f"rank {rank} moved no MoE activations: the check would be vacuous"
        weights = s["weights"]
        assert weights["quantization"] == ("fp8" if fp8 else "none")
        assert weights["allocated"] == weights["plan"], f"rank {rank}"
