"""Check the CUDA kernel path of the model end to end, and time one long prefill on it.

    PYTHONPATH=. python3 benchmarks/cuda_path_check.py [--timing-len 32768] [--out DIR]

Builds a small random DeepSeek-V3.2 checkpoint (cached under --out) whose attention geometry engages the
real Triton kernels (indexer 64 heads x 128, MLA latent 512 + rope 64, 16 heads; hidden 1024, 4 layers), then:
  1. accuracy: the same greedy requests (prompts shorter and longer than index_topk, run together in one
     batch) on CUDA against CPU, and on CUDA with attention_backend "triton" against "reference" (the PyTorch
     path on the same GPU). Prints greedy-token agreement and the max |logprob| difference over the top-5
     logprobs both runs hold. The accuracy model uses index_topk = 256 so the CPU oracle stays quick and
     most rows are really sparse.
  2. speed: one prefill of --timing-len tokens in bf16 (index_topk = 2048, fp8 indexer, one chunk) ->
     TTFT, a per-phase breakdown (dsaserve.profiling) and the decode time per token at that context.
With ``--device cpu --quick`` it runs a shrunken version on CPU (a dry run of the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsaserve import LLM, SamplingParams  # noqa: E402
from dsaserve.checkpoint.tiny import make_tiny_checkpoint  # noqa: E402

GEOMETRY = dict(
    num_hidden_layers=4, first_k_dense_replace=1, hidden_size=1024, num_attention_heads=16,
    num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, intermediate_size=2048, moe_intermediate_size=256, n_routed_experts=8,
    num_experts_per_tok=2, index_n_heads=64, index_head_dim=128, max_position_embeddings=65536,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
)
QUICK = dict(GEOMETRY, num_hidden_layers=2, hidden_size=256, intermediate_size=512)


def prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1000 + length)
    return torch.randint(5, 480, (length,), generator=gen).tolist()


def checkpoint(base: str, name: str, geometry: dict, topk: int) -> str:
    path = os.path.join(base, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        shutil.rmtree(path, ignore_errors=True)
        make_tiny_checkpoint(path, arch="deepseek_v32", seed=0, **geometry, index_topk=topk)
    return path


def greedy(llm, prompts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    return llm.generate(prompts, params, use_tqdm=False)


def compare(name, a, b) -> dict:
    """Greedy-token agreement and the max |logprob| difference over tokens both runs list, per step."""
    same = total = 0
    worst = 0.0
    for oa, ob in zip(a, b):
        for ta, tb in zip(oa.token_ids, ob.token_ids):
            same += ta == tb
            total += 1
        for step, (la, lb) in enumerate(zip(oa.logprobs, ob.logprobs)):
            if oa.token_ids[:step] != ob.token_ids[:step]:
                break  # after a divergence the contexts differ
            for tok in set(la) & set(lb):
                worst = max(worst, abs(la[tok] - lb[tok]))
    res = {"check": name, "token_agreement": round(same / max(total, 1), 4), "tokens": total,
           "max_logprob_diff": float(f"{worst:.3g}")}
    print(json.dumps(res), flush=True)
    return res


def accuracy(model_dir: str, device: str, lengths: list[int], max_tokens: int) -> list[dict]:
    prompts = [prompt(n, i) for i, n in enumerate(lengths)]
    common = dict(kv_cache_tokens=16384, max_model_len=8192, chunked_prefill_size=8192)
    results = []
    for mode in ("exact", "fp8"):
        t0 = time.perf_counter()
        with LLM(model_dir, device="cpu", dtype="float32", indexer_mode=mode, **common) as cpu:
            ref = greedy(cpu, prompts, max_tokens)
        print(f"cpu {mode}: {time.perf_counter() - t0:.1f} s", flush=True)
        with LLM(model_dir, device=device, dtype="float32", indexer_mode=mode, **common) as gpu:
            out = greedy(gpu, prompts, max_tokens)
            results.append(compare(f"{device} fp32 kernels vs cpu fp32 reference, indexer {mode}", out, ref))
        if mode == "exact":
            with LLM(model_dir, device=device, dtype="float32", indexer_mode=mode, attention_backend="reference",
                     **common) as gpu:
                same_dev = greedy(gpu, prompts, max_tokens)
            results.append(compare(f"{device} fp32 kernels vs {device} fp32 reference path, indexer exact",
                                   out, same_dev))
        if mode == "fp8":
            with LLM(model_dir, device=device, dtype="bfloat16", indexer_mode=mode, **common) as gpu:
                out = greedy(gpu, prompts, max_tokens)
                results.append(compare(f"{device} bf16 kernels vs cpu fp32 reference, indexer fp8", out, ref))
    return results


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timing(model_dir: str, device: str, length: int, decode_tokens: int) -> dict:
    from dsaserve.profiling import RECORDER

    cap = length + decode_tokens + 64
    with LLM(model_dir, device=device, dtype="bfloat16", indexer_mode="fp8", kv_cache_tokens=cap + 4096,
             max_model_len=cap, chunked_prefill_size=length) as llm:
        one = SamplingParams(max_tokens=1, ignore_eos=True)
        t0 = time.perf_counter()
        # compile + warm up prefill AND decode kernels (a first timed decode would include Triton compiles)
        llm.generate([prompt(min(length, 4096), 9)], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        sync(device)
        print(f"warm-up (kernel compiles): {time.perf_counter() - t0:.1f} s", flush=True)
        ids = prompt(length, 10)
        RECORDER.enable(cuda=device.startswith("cuda"))
        sync(device)
        t0 = time.perf_counter()
        llm.generate([ids], one, use_tqdm=False)
        sync(device)
        ttft = time.perf_counter() - t0
        phases = {k: round(v, 2) for k, v in sorted(RECORDER.exclusive_ms().items(), key=lambda kv: -kv[1])}
        RECORDER.disable()
        t0 = time.perf_counter()
        llm.generate([ids], SamplingParams(max_tokens=decode_tokens, ignore_eos=True), use_tqdm=False)
        sync(device)
        total = time.perf_counter() - t0
    res = {"prefill_tokens": length, "ttft_s": round(ttft, 3), "prefill_tok_per_s": round(length / ttft),
           "phase_ms": phases,
           "decode_ms_per_token": round((total - ttft) / max(decode_tokens - 1, 1) * 1e3, 2)}
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="/tmp/dsaserve_cuda_check")
    ap.add_argument("--timing-len", type=int, default=32768)
    ap.add_argument("--lengths", default="200,1200", help="accuracy prompt lengths (index_topk = 256)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="shrunken model and sizes (CPU dry run)")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    geometry = QUICK if args.quick else GEOMETRY
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""), flush=True)
    t0 = time.perf_counter()
    acc_dir = checkpoint(args.out, "acc-topk256" + ("-quick" if args.quick else ""), geometry, 256)
    time_dir = checkpoint(args.out, "time-topk2048" + ("-quick" if args.quick else ""), geometry, 2048)
    print(f"checkpoints: {time.perf_counter() - t0:.1f} s", flush=True)
    failed = False
    # timing first (the GPU part), then the accuracy checks with their CPU oracles; one failing part
    # is reported and the other still runs
    parts = [("timing", lambda: timing(time_dir, args.device, args.timing_len, decode_tokens=16))]
    if not args.skip_accuracy:
        lengths = [int(x) for x in args.lengths.split(",")]
        parts.append(("accuracy", lambda: accuracy(acc_dir, args.device, lengths, args.max_tokens)))
    for name, fn in parts:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - report and go on to the next part
            failed = True
            traceback.print_exc()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
