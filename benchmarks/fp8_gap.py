"""Where does the CUDA fp8-indexer path leave the CPU path? Layer by layer, switch by switch (issue 12, item 5).

    PYTHONPATH=. python3 benchmarks/fp8_gap.py --out $OUT/fp8_gap          # one H200, < 120 s
    PYTHONPATH=. python3 benchmarks/fp8_gap.py --cpu --out /tmp/fp8_gap    # dry run: the "device" is the CPU

docs/BENCHMARKS.md measured a 1.53 max logprob difference between CUDA fp32 and CPU fp32 with the fp8 indexer
(0.041 with the exact indexer) on the cuda_path_check model (4 layers, hidden 1024, indexer 64 x 128,
index_topk 256). This script runs that model's one-shot prefill of one prompt on both sides with the same
weights and compares, per decoder layer: the hidden state (x + residual) relative error and, on indexer
layers, the top-k set overlap (rows that select index_topk of more keys; mean overlap and identical rows),
then the output log-probs (max |diff| over the CPU's top-5 tokens at every position). Runs ("switches"):

  cuda_fp8            the engine's CUDA path: triton attention, fp8 indexer, fused top-k, TF32 off for torch
  cuda_fp8_forced     the same, but every layer gets the CPU's input of that layer (teacher forcing): the
                      error one layer adds on its own, without compounding
  cuda_fp8_torch_tf32 torch.backends.cuda.matmul.allow_tf32 = True (projections, MoE in TF32)
  cuda_fp8_ref_attn   attention_backend reference on the GPU: PyTorch attention + PyTorch indexer scores
                      (no Triton: no TF32 in sparse MLA, no fp8 MMA)
  cuda_fp8_unfused    --indexer-topk unfused (mqa_logits + topk_indices)
  cuda_fp8_triton_ieee  TRITON_F32_DEFAULT=ieee in a subprocess: Triton's fp32 dots without TF32
  cuda_exact          exact indexer on the GPU vs the CPU's exact indexer
  cpu_fp8_perturbed   CPU only: the indexer's q and k multiplied by (1 + 1e-6) before quantization, vs the
                      CPU: how much a perturbation far below any GPU/CPU difference moves the fp8 path
  cpu_exact_perturbed the same perturbation with the exact indexer (the control)
and "kernel_only": the GPU fused top-k kernel on the CPU run's own e4m3 q / k / scales / weights of each
layer, vs the CPU's sets (the fp8 MMA accumulation alone). The verdict names the switch(es) whose gap is
far below cuda_fp8's. JSON to --out/fp8_gap.json, a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cuda_path_check import GEOMETRY, QUICK, checkpoint, prompt  # noqa: E402

from dsaserve import kernels  # noqa: E402
from dsaserve.cache.kv_cache import KVCache  # noqa: E402
from dsaserve.checkpoint.loader import load_checkpoint  # noqa: E402
from dsaserve.config import ModelConfig  # noqa: E402
from dsaserve.model.backends import select_backends  # noqa: E402
from dsaserve.model.batch import ForwardBatch  # noqa: E402
from dsaserve.model.deepseek_v32 import DSAModel  # noqa: E402
from dsaserve.model.indexer import Fp8Indexer, ExactIndexer  # noqa: E402
from dsaserve.model.state_dict import checkpoint_specs  # noqa: E402

PAGE = 64
TOP_LOGPROBS = 5


class Capture:
    """What one prefill produced: per layer the input / output (x, residual), the indexer's slots, and the
    fp8 indexer kernel inputs; the final fp32 log-probs [n, vocab]. All on the CPU."""

    def __init__(self):
        self.layer_in: dict[int, tuple] = {}
        self.layer_out: dict[int, torch.Tensor] = {}   # x + residual, fp64 [n, hidden]
        self.slots: dict[int, torch.Tensor] = {}       # [n, width] int32
        self.kernel_inputs: dict[int, tuple] = {}      # (q8, w, keys8, key_scale, q_pos)
        self.logprobs: torch.Tensor | None = None


def _cpu(t):
    return None if t is None else t.detach().to("cpu")


def run_prefill(model_dir: str, ids: list[int], device: str, *, indexer: str = "fp8", attention: str = "triton",
                indexer_topk: str = "fused", force_inputs: Capture | None = None, perturb: float = 0.0) -> Capture:
    """One-shot prefill of ``ids`` on ``device`` through ``DSAModel`` (fp32), recording a ``Capture``.

    ``force_inputs``: each decoder layer runs on that capture's input of the same layer (teacher forcing).
    ``perturb``: the indexer's q and k are multiplied by (1 + perturb) before quantization."""
    cfg = ModelConfig.from_hf(model_dir)
    backends = select_backends(attention=attention, indexer=indexer, indexer_topk=indexer_topk, device=device,
                               dtype=torch.float32)          # the fp32 model: "auto" experts = the loop oracle
    if perturb:
        base = backends.indexer

        class Perturbed(type(base)):
            fused_key = False  # the key is perturbed between its norm and its quantization: op by op

            def quantize(self, q, w, k, head_dim):
                return base.quantize(q * (1 + perturb), w, k * (1 + perturb), head_dim)

        numerics = Perturbed(fused_topk=base.fused_topk) if isinstance(base, Fp8Indexer) else Perturbed()
        backends = type(backends)(backends.attention, numerics, backends.linear, backends.experts)
    model = DSAModel(cfg, backends=backends, dtype=torch.float32, device=device)
    load_checkpoint(model_dir, checkpoint_specs(model), progress=False)
    model.weights_loaded()                                               # as the engine's runner does
    n = len(ids)
    pages = -(-n // PAGE)
    dev = torch.device(device)
    cache = KVCache(cfg, model.layer_range, pages, PAGE, torch.float32, dev, backends.indexer.fp8)
    batch = ForwardBatch(positions=torch.arange(n, device=dev), token_req=torch.zeros(n, dtype=torch.long, device=dev),
                         req_seq_lens=[n], block_tables=torch.arange(pages, device=dev)[None],
                         write_slots=torch.arange(n, device=dev), page_size=PAGE)
    cap = Capture()
    hooks = []
    for name, layer in model.layers.items():
        i = int(name)

        def pre(mod, args, i=i):
            x, residual = args[0], args[1]
            cap.layer_in[i] = (_cpu(x), _cpu(residual))
            if force_inputs is not None:
                fx, fr = force_inputs.layer_in[i]
                return (fx.to(dev), None if fr is None else fr.to(dev), *args[2:])
            return None

        def post(mod, args, out, i=i):
            x, residual = out
            cap.layer_out[i] = (x.double() + residual.double()).cpu()

        hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
        ix = layer.self_attn.indexer
        if ix is not None:
            orig_slots, orig_sel, orig_ref = ix.topk_slots, ix.select_kernels, ix.select

            def topk_slots(*a, _orig=orig_slots, i=i, **k):
                s = _orig(*a, **k)
                cap.slots[i] = _cpu(s)
                return s

            def select_kernels(q, w, keys, key_scale, q_pos, *a, _orig=orig_sel, i=i, **k):
                cap.kernel_inputs[i] = tuple(_cpu(t) for t in (q, w, keys, key_scale, q_pos))
                return _orig(q, w, keys, key_scale, q_pos, *a, **k)

            def select(*a, _orig=orig_ref, i=i, **k):   # the reference attention's per-request top-k
                s = _orig(*a, **k)                        # positions; one request at slots 0..n-1: = slots
                cap.slots[i] = _cpu(s)
                return s

            ix.topk_slots, ix.select_kernels, ix.select = topk_slots, select_kernels, select
    with torch.inference_mode():
        hidden, residual = model(batch, cache, input_ids=torch.tensor(ids, device=dev))
        cap.logprobs = model.compute_logits(hidden, residual).log_softmax(-1).cpu()
    for h in hooks:
        h.remove()
    return cap


def topk_overlap(a: torch.Tensor, b: torch.Tensor, topk: int) -> dict:
    """Rows of b (the CPU) that select topk of more keys: mean |a & b| / topk and the identical fraction."""
    rows = [i for i in range(b.shape[0]) if int((b[i] >= 0).sum()) == topk]
    if not rows:
        return {"rows": 0}
    ov = []
    for i in rows:
        sa, sb = set(a[i].tolist()) - {-1}, set(b[i].tolist()) - {-1}
        ov.append(len(sa & sb) / topk)
    return {"rows": len(rows), "mean_overlap": round(sum(ov) / len(ov), 5),
            "identical_rows": round(sum(o == 1.0 for o in ov) / len(ov), 4)}


def compare(run: Capture, ref: Capture, topk: int) -> dict:
    """Per layer hidden-state rel. error and top-k overlap of ``run`` against ``ref``; output log-prob gap."""
    layers = []
    for i in sorted(ref.layer_out):
        a, b = run.layer_out[i], ref.layer_out[i]
        row = {"layer": i, "hidden_rel_err": float(f"{((a - b).norm() / b.norm()).item():.3g}")}
        if i in ref.slots:
            row["topk"] = topk_overlap(run.slots[i], ref.slots[i], topk)
        layers.append(row)
    top = ref.logprobs.topk(TOP_LOGPROBS, dim=-1).indices                       # [n, 5] the CPU's top tokens
    diff = (run.logprobs.gather(1, top) - ref.logprobs.gather(1, top)).abs()      # [n, 5]
    return {"layers": layers, "max_logprob_diff": float(f"{diff.max().item():.3g}"),
            "last_token_logprob_diff": float(f"{diff[-1].max().item():.3g}"),
            "argmax_agreement": round((run.logprobs.argmax(-1) == ref.logprobs.argmax(-1)).float().mean().item(), 4)}


def kernel_only(ref: Capture, device: str, topk: int) -> list[dict]:
    """The device's fused top-k kernel on the CPU run's own fp8 indexer inputs, per layer, vs the CPU's sets."""
    out = []
    for i, (q, w, keys, kscale, q_pos) in sorted(ref.kernel_inputs.items()):
        ke = (q_pos + 1).to(torch.int32)
        ks = torch.zeros_like(ke)
        args = [t.to(device) for t in (q, keys, kscale.float(), w, ks, ke)]
        got = kernels.mqa_topk_indices(*args, k=topk).cpu()
        want = kernels.mqa_topk_indices(q, keys, kscale.float(), w, ks, ke, k=topk, backend="reference")
        out.append({"layer": i, **topk_overlap(got, want, topk)})
    return out


def triton_ieee_run(args, model_dir: str, ids: list[int], timeout_s: float) -> Capture:
    """cuda_fp8 with TRITON_F32_DEFAULT=ieee (read when a kernel compiles, so a fresh process)."""
    path = os.path.join(args.out, "ieee_capture.pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--child-ieee", path, "--out", args.out,
           "--prompt-len", str(args.prompt_len)] + (["--quick"] if args.quick else [])
    # a fresh Triton cache too: a cached TF32 binary must not be reused whatever the cache key holds
    env = dict(os.environ, TRITON_F32_DEFAULT="ieee", TRITON_CACHE_DIR=os.path.join(args.out, "triton_cache_ieee"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        raise RuntimeError(f"the TRITON_F32_DEFAULT=ieee run failed (rc {r.returncode}): {r.stderr[-1500:]}")
    return torch.load(path, weights_only=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for fp8_gap.json (created)")
    ap.add_argument("--cpu", action="store_true", help="dry run: the device side runs on the CPU too")
    ap.add_argument("--quick", action="store_true", help="the 2-layer hidden-256 model (implied by --cpu)")
    ap.add_argument("--prompt-len", type=int, default=600, help="prompt tokens (index_topk 256)")
    ap.add_argument("--perturb", type=float, default=1e-6, help="relative perturbation of the CPU sensitivity runs")
    ap.add_argument("--skip-ieee", action="store_true", help="skip the TRITON_F32_DEFAULT=ieee subprocess")
    ap.add_argument("--budget-s", type=float, default=110.0,
                    help="seconds after which the remaining parts are skipped (the ieee run, last, gets what is left)")
    ap.add_argument("--child-ieee", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.quick = args.quick or args.cpu
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, min(16, len(os.sched_getaffinity(0)))))
    device = "cpu" if args.cpu else "cuda"
    model_dir = checkpoint(args.out, "acc-topk256" + ("-quick" if args.quick else ""),
                           QUICK if args.quick else GEOMETRY, 256)
    ids = prompt(args.prompt_len, 0)
    if args.child_ieee:
        torch.save(run_prefill(model_dir, ids, device), args.child_ieee)
        return
    topk = ModelConfig.from_hf(model_dir).index_topk
    t_start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "model_dir": model_dir, "prompt_len": len(ids), "index_topk": topk,
              "perturb": args.perturb, "runs": {}, "errors": {}, "kernel_only": [], "timings_s": {}}

    def save() -> None:
        result["total_s"] = round(time.perf_counter() - t_start, 1)
        with open(os.path.join(args.out, "fp8_gap.json"), "w") as f:
            json.dump(result, f, indent=1)

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    def step(name, fn):
        """Run one part; a failure is recorded and the next part still runs (partial JSON after each)."""
        if left() <= 0:
            result["errors"][name] = f"skipped: over --budget-s {args.budget_s}"
            return None
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - report and go on
            result["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"{name} FAILED: {e}", file=sys.stderr, flush=True)
            return None
        finally:
            result["timings_s"][name] = round(time.perf_counter() - t0, 2)
            print(f"{name}: {result['timings_s'][name]} s", flush=True)
            save()

    refs = {"fp8": step("cpu_fp8", lambda: run_prefill(model_dir, ids, "cpu")),
            "exact": step("cpu_exact", lambda: run_prefill(model_dir, ids, "cpu", indexer="exact"))}

    def run(name, mode, fn):
        cap = step(name, fn)
        if cap is not None and refs[mode] is not None:
            result["runs"][name] = compare(cap, refs[mode], topk)
            save()

    def torch_tf32_run():
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return run_prefill(model_dir, ids, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False

    # most telling first: a run over --budget-s skips what is left
    run("cuda_fp8", "fp8", lambda: run_prefill(model_dir, ids, device))
    run("cuda_fp8_forced", "fp8", lambda: run_prefill(model_dir, ids, device, force_inputs=refs["fp8"]))
    if refs["fp8"] is not None:
        result["kernel_only"] = step("kernel_only", lambda: kernel_only(refs["fp8"], device, topk)) or []
    run("cuda_exact", "exact", lambda: run_prefill(model_dir, ids, device, indexer="exact"))
    run("cpu_fp8_perturbed", "fp8", lambda: run_prefill(model_dir, ids, "cpu", perturb=args.perturb))
    run("cuda_fp8_ref_attn", "fp8", lambda: run_prefill(model_dir, ids, device, attention="reference"))
    if device == "cuda":
        run("cuda_fp8_torch_tf32", "fp8", torch_tf32_run)
    run("cuda_fp8_unfused", "fp8", lambda: run_prefill(model_dir, ids, device, indexer_topk="unfused"))
    run("cpu_exact_perturbed", "exact", lambda: run_prefill(model_dir, ids, "cpu", indexer="exact",
                                                            perturb=args.perturb))
    if device == "cuda" and not args.skip_ieee:
        run("cuda_fp8_triton_ieee", "fp8", lambda: triton_ieee_run(args, model_dir, ids, max(5.0, left())))
    runs = result["runs"]
    gap = runs.get("cuda_fp8", {}).get("max_logprob_diff")
    result["verdict"] = {
        "cuda_fp8_gap": gap, "exact_gap": runs.get("cuda_exact", {}).get("max_logprob_diff"),
        "cpu_perturbed_fp8_gap": runs.get("cpu_fp8_perturbed", {}).get("max_logprob_diff"),
        # a switch "removes" the gap when it leaves less than a tenth of it
        "switches_that_remove_gap": [] if not gap else [
            n for n, r in runs.items() if n.startswith("cuda_fp8_") and r["max_logprob_diff"] < 0.1 * gap],
        "kernel_only_identical_rows": [k.get("identical_rows") for k in result["kernel_only"]],
    }
    save()
    print_table(result)


def print_table(res: dict) -> None:
    print(f"\nfp8 gap, {res['device']}, prompt {res['prompt_len']} tokens, index_topk {res['index_topk']} "
          f"(vs the CPU run of the same indexer mode; overlap = mean top-k overlap / identical rows)")
    names = list(res["runs"])
    if not names:
        print(f"no run finished; errors: {res['errors']}")
        return
    layers = [row["layer"] for row in res["runs"][names[0]]["layers"]]
    head = f"{'run':22s} {'max dlogp':>9s} {'last':>7s} {'argmax':>6s} | " + " | ".join(
        f"L{i} relerr  overlap  ident" for i in layers)
    print(head)
    for name in names:
        r = res["runs"][name]
        cells = []
        for row in r["layers"]:
            t = row.get("topk", {})
            ov = f"{t['mean_overlap']:.4f}  {t['identical_rows']:.3f}" if t.get("rows") else "   -       -  "
            cells.append(f"{row['hidden_rel_err']:8.2e} {ov}")
        print(f"{name:22s} {r['max_logprob_diff']:9.3g} {r['last_token_logprob_diff']:7.3g} "
              f"{r['argmax_agreement']:6.3f} | " + " | ".join(cells))
    print("kernel_only (device fused top-k on the CPU's fp8 inputs): " + ", ".join(
        f"L{k['layer']} ident {k.get('identical_rows', '-')}" for k in res["kernel_only"]))
    print("verdict: " + json.dumps(res["verdict"]))
    if res["errors"]:
        print("errors: " + json.dumps(res["errors"]))
    print(f"total {res['total_s']} s")


if __name__ == "__main__":
    main()
