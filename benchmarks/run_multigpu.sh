#!/usr/bin/env bash
# Issue 15 items 2 and 3: the multi-GPU prefill runs, each part one device call of <= 10 minutes.
#
#   bash benchmarks/run_multigpu.sh OUTDIR PART [--dry-run | --cpu]
#
# PART (one device call each):
#   layouts    4 GPUs: bench prefill 1x1,1x2,2x1,2x2,1x4 at 16K / 64K / 128K, 3 repeats, breakdown at every
#              length, traces at 64K; then the bubble model fitted on this run's 1x1 64K breakdown, set beside
#              this run's measurements (the table printed last)                      -> OUTDIR/prefill_layouts.json
#   ablations  4 GPUs: 2x2 at 64K, 5 repeats each: dynamic vs fixed chunks, SM reservation on vs off,
#              scattered vs gathered PP transfer (1x1 at 64K in the same run for the speedup)
#                                                                                    -> OUTDIR/prefill_ablations.json
#   gpu8       8 GPUs: 1x1, 1x8, 2x4 (the seed's PP2 x CP4), 4x2 at 48.5K and 128K, 3 repeats; ablations
#              at 2x4 / 128K: dynamic vs fixed chunks, PP transfer          -> OUTDIR/prefill_8gpu.json
#   all        the three in order (needs an 8-GPU machine and ~25 minutes: more than one device call)
#
# Ablation not available on main: MoE split by expert vs by intermediate dim. The engine has no flag for it
# (--moe-backend offers only "loop", which splits every expert's intermediate dim over the CP ranks; expert
# placement is issue 11's work). When a --moe-split style flag lands, add it as a bench prefill ablation and
# run it in the ablations part.
#
# --dry-run prints the commands without running them. --cpu runs the same commands on CPU with the tiny
# config, short prompts and 128-token chunks (a check of the script and the bench plumbing; its timings say
# nothing about GPUs).
set -uo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 OUTDIR layouts|ablations|gpu8|all [--dry-run|--cpu]" >&2; exit 2; fi
OUT="$1"; PART="$2"; MODE="${3:-gpu}"
case "$PART" in layouts|ablations|gpu8|all) ;; *) echo "unknown PART '$PART': layouts, ablations, gpu8 or all" >&2; exit 2;; esac
case "$MODE" in gpu|--dry-run|--cpu) ;; *) echo "unknown mode '$MODE': --dry-run or --cpu" >&2; exit 2;; esac
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0                  # NVLink multicast off (device notes)

if [ "$MODE" = "--cpu" ]; then
    MODEL="--config benchmarks/configs/tiny_dsv32.json --device cpu --dtype float32 --chunk-size 128"
    L16=192; L48=320; L64=384; L128=512; DEADLINE=280
else
    MODEL="--config benchmarks/configs/dsv32_8layer_32e.json"
    L16=16384; L48=49664; L64=65536; L128=131072; DEADLINE=540
fi
BENCH="python3 -m dsaserve bench prefill $MODEL"

run() {                                    # print, then run unless --dry-run
    local cmd
    cmd="$(echo "$*" | tr -s ' ')"
    echo "+ $cmd"
    [ "$MODE" = "--dry-run" ] && return 0
    mkdir -p "$OUT"
    eval "$cmd"
}

part_layouts() {
    run "$BENCH --input-len $L16,$L64,$L128 --layouts 1x1,1x2,2x1,2x2,1x4 --repeats 3 \
        --breakdown-len $L16,$L64,$L128 --trace-len $L64 --ablations none --deadline-s $DEADLINE \
        --out $OUT/prefill_layouts.json --trace-dir $OUT/traces"
    run "python3 benchmarks/plot_ttft.py $OUT/prefill_layouts.json $OUT/ttft_prefill.png || echo 'plot skipped'"
    bubble prefill_layouts
}

part_ablations() {
    run "$BENCH --input-len $L64 --layouts 1x1,2x2 --repeats 5 --breakdown-len $L64 \
        --ablations dynamic_chunking,sm_reserve,pp_transfer --ablation-layout 2x2 --ablation-len $L64 \
        --deadline-s $DEADLINE --out $OUT/prefill_ablations.json"
}

part_gpu8() {
    run "$BENCH --input-len $L48,$L128 --layouts 1x1,1x8,2x4,4x2 --repeats 3 --breakdown-len $L48,$L128 \
        --ablations dynamic_chunking,pp_transfer --ablation-layout 2x4 --ablation-len $L128 \
        --deadline-s $DEADLINE --out $OUT/prefill_8gpu.json --trace-dir $OUT/traces8"
    bubble prefill_8gpu "--fit-len $L128 --lengths $L48,$L128 --layouts 1x1,1x8,2x4,4x2"
}

bubble() {                                 # the model fitted on the run's own 1x1 breakdown, beside its measurements
    local name="$1" extra="${2:---fit-len $L64 --lengths $L16,$L64,$L128 --layouts 1x1,1x2,2x1,2x2,1x4}"
    local topk=""; [ "$MODE" = "--cpu" ] && topk="--index-topk 32 --chunk-size 128"
    run "python3 benchmarks/bubble_model.py --breakdown $OUT/$name.json --measured $OUT/$name.json $extra $topk \
        --out $OUT/bubble_$name.json"
}

case "$PART" in
    layouts) part_layouts ;;
    ablations) part_ablations ;;
    gpu8) part_gpu8 ;;
    all) part_layouts; part_ablations; part_gpu8 ;;
esac
