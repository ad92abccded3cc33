#!/usr/bin/env bash
# The 2026-12-02 single-H200 session's measurements in ONE device call (<= ~450 s wall), in priority order,
# each part under its own timeout (a failure or a timeout is reported; the next part still runs):
#   1. tests/gpu                         kernels, decode graphs, MoE without host syncs, fp8 layers vs CPU
#   2. bench prefill 1x1, 8 layers / 32 experts, 64K: fp8 weights, then bf16 (issue 11: fp8 vs bf16 in one run)
#   3. bench decode, 8 layers bf16, grouped experts, B = 1 / 32 at 4K context, CUDA graphs on and off (issue 13)
#   4. bench prefill 1x1, 4 layers / 256 experts, 64K, fp8 (issue 11: MoE at the real expert count)
#   5. benchmarks/fp8_gap.py             where the CUDA fp8-indexer path leaves the CPU path (issue 12 item 5)
# The device returns at most 8 files: the parts write under a scratch folder and OUTDIR/all.tar.gz is rebuilt
# after every part (a call cut short by its time limit still brings back what finished).
#   bash benchmarks/run_h200_session.sh OUTDIR
set -u
OUT=${1:?usage: bash benchmarks/run_h200_session.sh OUTDIR}
PARTS=$(mktemp -d)/parts
mkdir -p "$OUT" "$PARTS"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
P="$PARTS"
T0=$(date +%s)

run() {  # name timeout_s command...: one part; its rc and duration are reported, never fatal
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  echo "== $name (limit ${limit}s, at +$(( start - T0 ))s): $*"
  timeout --kill-after=5 "$limit" "$@" > "$P/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $(( $(date +%s) - start ))s"
  tail -n "${TAIL:-6}" "$P/$name.log" | sed 's/^/   | /'
  tar -czf "$OUT/all.tar.gz.tmp" -C "$(dirname "$P")" parts && mv "$OUT/all.tar.gz.tmp" "$OUT/all.tar.gz"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv > "$P/nvidia_smi.txt" 2>&1
TAIL=8 run tests_gpu 100 "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider
for q in fp8 none; do  # the first pays the Triton compilations
  if [ $q = fp8 ]; then LIM=95; else LIM=70; fi
  TAIL=12 run "prefill_8l_$q" $LIM "$PY" -m dsaserve bench prefill --config benchmarks/configs/dsv32_8layer_32e.json \
    --layouts 1x1 --input-len 65536 --repeats 1 --breakdown-len all --ablations none --quantization "$q" \
    --out "$P/prefill_dsv32_8layer_32e_$q.json"
done
TAIL=10 run decode 55 "$PY" -m dsaserve bench decode --config benchmarks/configs/dsv32_8layer_32e.json \
  --device cuda --dtype bfloat16 --batch-size 1,32 --context-len 4096 --steps 48 --graphs on,off \
  --moe-backend grouped --quantization none --deadline-s 45 --out "$P/bench_decode.json"
TAIL=12 run prefill_256e_fp8 65 "$PY" -m dsaserve bench prefill --config benchmarks/configs/dsv32_4layer_256e.json \
  --layouts 1x1 --input-len 65536 --repeats 1 --breakdown-len all --ablations none --quantization fp8 \
  --out "$P/prefill_dsv32_4layer_256e_fp8.json"
TAIL=25 run fp8_gap 75 "$PY" benchmarks/fp8_gap.py --out "$P/fp8_gap"
echo "== total $(( $(date +%s) - T0 ))s"
"$PY" benchmarks/fp8_prefill_table.py "$P" 2>&1 | tail -n 30
"$PY" benchmarks/fp8_prefill_table.py "$P" > "$P/fp8_prefill_table.txt" 2>&1
tar -czf "$OUT/all.tar.gz" -C "$(dirname "$P")" parts
