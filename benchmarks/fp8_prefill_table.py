"""Short tables of one ``benchmarks/run_fp8_prefill.sh`` run: GEMM options with the ceilings of the same run,
and 1x1 prefill fp8 vs bf16 on the bench models with the phases issue 11 targets.

    python benchmarks/fp8_prefill_table.py OUTDIR [PATTERN]

Reads OUTDIR/gemm.json (``benchmarks/gemm.py``) and OUTDIR/prefill_<model>_<quant>.json (``dsaserve bench
prefill``), or the files PATTERN names (e.g. 'order_ab_*.json', 'chunk_ab_*.json' of
``benchmarks/run_device_parts.sh``); a missing or failed file is reported as such. Files of one side of an A/B
(their names without the model: 8l / 256e or the config's name) get their own targets. The MoE floor is the
routed + shared experts' FLOPs of the MoE layers at the fp8 ceiling measured in the same prefill run (fp8
``torch._scaled_mm``, 8192^3); the issue's target is MoE <= 1.3x that floor and, on the 8-layer model at 64K, dense GEMMs + MoE <= 650 ms.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"_error": f"{type(e).__name__}: {e}"}


def gemm_table(out: str) -> list[str]:
    path = os.path.join(out, "gemm.json")
    if not os.path.exists(path):
        return []
    d = _load(path)
    if "_error" in d:
        return [f"gemm.json: {d['_error']}"]
    c = d.get("ceilings", {})
    lines = [f"GEMM TFLOPS (ceilings this run: bf16 mm {c.get('bf16_mm_tflops', 0):.0f}, "
             f"fp8 {c.get('fp8_ceiling_tflops', 0):.0f})",
             f"{'shape MxKxN':28s} {'bf16 mm':>8s} {'torch blockwise':>16s} {'fp8_linear':>11s} {'triton':>8s}"]
    for r in d.get("dense", []):
        shape = f"{r.get('shape')} {r.get('M')}x{r.get('K')}x{r.get('N')}"
        vals = [r.get(k) for k in ("bf16_mm_tflops", "scaled_mm_tflops", "fp8_linear_cublas_tflops", "triton_tflops")]
        lines.append(f"{shape:28s} " + " ".join(f"{v:>{w}.0f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}"
                                                for v, w in zip(vals, (8, 16, 11, 8))))
    for r in d.get("moe", []):
        lines.append(f"grouped MoE {r.get('experts')} experts x {r.get('tokens')} tok: fp8 {r.get('fp8_ms', 0):.1f} ms "
                     f"({r.get('fp8_over_floor', 0):.2f}x floor), bf16 {r.get('bf16_ms', 0):.1f} ms")
    return lines


def _moe_floor_ms(model: dict, n_moe: int, tokens: int, fp8_tflops: float | None) -> float | None:
    if not fp8_tflops or not n_moe:
        return None
    h, inter = model["hidden"], model.get("moe_inter")
    if inter is None:
        return None
    per_token = 2 * 3 * h * inter * (model["active_experts"] + model.get("shared_experts", 1))
    return n_moe * tokens * per_token / (fp8_tflops * 1e12) * 1e3


def side_of(stem: str) -> str:
    """The A/B side a result file belongs to: its name without the model (``prefill_dsv32_8layer_32e_fp8`` ->
    ``prefill_fp8``, ``order_ab_256e_knobs1`` -> ``order_ab_knobs1``)."""
    return re.sub(r"_(dsv32_8layer_32e|dsv32_4layer_256e|8l|256e)(?=_|$)", "", stem)


def prefill_table(out: str, measured: dict | None = None, pattern: str = "prefill_*.json") -> list[str]:
    """One line per (file, length); ``measured[side][(model, quant, len)]`` gets the numbers (``side_of``)."""
    measured = {} if measured is None else measured
    lines = [f"{'file':30s} {'quant':5s} {'len':>7s} {'TTFT s':>7s} {'dense ms':>9s} {'MoE ms':>8s} "
             f"{'MoE/layer':>9s} {'MoE/floor':>9s} {'attn+idx ms':>11s} {'weights GiB':>11s}  status"]
    files = sorted(glob.glob(os.path.join(out, pattern)))
    if not files:
        return lines + [f"(no {pattern})"]
    for path in files:
        stem = os.path.basename(path)[:-len(".json")]
        d = _load(path)
        if "_error" in d:
            lines.append(f"{stem:30s} {d['_error']}")
            continue
        meta = d.get("meta", {})
        model_name = os.path.basename(meta.get("config", "")).removesuffix(".json")
        quant = meta.get("quantization") or stem.rpartition("_")[2]  # (older files: prefill_<model>_<quant>)
        side = measured.setdefault(side_of(stem), {})
        model = dict(meta.get("model", {}))
        cfg = _load(meta.get("config", ""))
        model["moe_inter"] = cfg.get("moe_intermediate_size")
        model["shared_experts"] = cfg.get("n_shared_experts", 1)
        n_layers = model.get("layers", 0)
        n_moe = n_layers - cfg.get("first_k_dense_replace", 0) if "first_k_dense_replace" in cfg else 0
        fp8_tflops = d.get("ceilings", {}).get("fp8_tflops")
        for r in d.get("runs", []):
            if r.get("variant") != "baseline":
                continue
            n = r["input_len"]
            if r.get("status") != "ok":
                lines.append(f"{stem:30s} {quant:5s} {n:>7d} {'':>7s} {'':>9s} {'':>8s} {'':>9s} {'':>9s} "
                             f"{'':>11s} {'':>11s}  {r.get('status')}")
                continue
            rows = r.get("breakdown", {}).get("rows", {})
            ms = {k: rows.get(k, {}).get("max") for k in ("dense GEMMs", "MoE experts", "sparse attention",
                                                           "indexer logits", "top-k")}
            moe = ms["MoE experts"]
            floor = _moe_floor_ms(model, n_moe, n, fp8_tflops)
            attn = sum(v for k, v in ms.items() if k in ("sparse attention", "indexer logits", "top-k") and v)
            side[(model_name, quant, n)] = {"ttft_s": r["ttft_median_s"], "dense_ms": ms["dense GEMMs"],
                                                "moe_ms": moe, "n_moe": n_moe,
                                                "moe_over_floor": moe / floor if moe and floor else None}
            w = (r.get("weights") or {}).get("0") or (r.get("weights") or {}).get(0) or {}
            alloc = sum(w.get("allocated", {}).values()) / 2**30 if w else None
            plan = sum(w.get("plan", {}).values()) / 2**30 if w else None

            def f(v, fmt):
                return format(v, fmt) if isinstance(v, (int, float)) else "-"

            lines.append(
                f"{stem:30s} {quant:5s} {n:>7d} {r['ttft_median_s']:>7.3f} {f(ms['dense GEMMs'], '>9.0f')} "
                f"{f(moe, '>8.0f')} {f(moe / n_moe if moe and n_moe else None, '>9.1f')} "
                f"{f(moe / floor if moe and floor else None, '>9.2f')} {f(attn or None, '>11.0f')} "
                f"{(f'{alloc:.2f}/{plan:.2f}' if alloc is not None else '-'):>11s}  ok")
    lines.append("weights GiB = allocated / planned (rank 0); MoE/floor: routed + shared expert FLOPs at the fp8 "
                 "ceiling of the same run")
    return lines


# issue 11 (1x H200): before = measured with bf16 weights and the per-expert loop on 2026-12-02
BEFORE_64K = {"dsv32_8layer_32e": {"ttft_s": 4.10, "dense_ms": 922, "moe_ms": 881},
              "dsv32_4layer_256e": {"ttft_s": 2.04, "moe_ms": 567}}
BIG, WIDE, N64K = "dsv32_8layer_32e", "dsv32_4layer_256e", 65536


def targets_table(measured: dict, side: str = "") -> list[str]:
    """The issue's prefill targets at 64K against this run's files of one A/B side (fp8 weights)."""
    def get(model, key):
        return (measured.get((model, "fp8", N64K)) or {}).get(key)

    def verdict(value, limit):
        if value is None:
            return "not measured"
        return "MET" if value <= limit else "missed"

    lines = [f"issue 11 targets at 64K{f' ({side})' if side else ''} (fp8 weights; before = bf16 weights + "
             "per-expert loop, issue's numbers)"]
    dense, moe = get(BIG, "dense_ms"), get(BIG, "moe_ms")
    both = dense + moe if dense is not None and moe is not None else None
    b = BEFORE_64K[BIG]
    lines.append(f"  8-layer dense GEMMs + MoE <= 650 ms: {'-' if both is None else f'{both:.0f} ms'} "
                 f"(before {b['dense_ms'] + b['moe_ms']} ms) -> {verdict(both, 650)}")
    for model in (BIG, WIDE):
        ratio = get(model, "moe_over_floor")
        lines.append(f"  {model} MoE <= 1.3x its fp8 FLOP floor: "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} -> {verdict(ratio, 1.3)}")
    per = {m: get(m, "moe_ms") / get(m, "n_moe") if get(m, "moe_ms") and get(m, "n_moe") else None
           for m in (BIG, WIDE)}
    ratio = per[WIDE] / per[BIG] if per[WIDE] and per[BIG] else None
    lines.append(f"  256-expert MoE per layer <= 1.1x the 32-expert one: "
                 f"{'-' if ratio is None else f'{per[WIDE]:.1f} / {per[BIG]:.1f} ms = {ratio:.2f}x'} "
                 f"-> {verdict(ratio, 1.1)}")
    for model in (BIG, WIDE):
        t = get(model, "ttft_s")
        lines.append(f"  {model} TTFT: {'-' if t is None else f'{t:.2f} s'} (before {BEFORE_64K[model]['ttft_s']} s)")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    measured: dict = {}
    gemm = gemm_table(argv[0])
    lines = (gemm + [""] if gemm else []) + prefill_table(argv[0], measured, *argv[1:])
    for side, numbers in measured.items():
        lines += [""] + targets_table(numbers, side)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
