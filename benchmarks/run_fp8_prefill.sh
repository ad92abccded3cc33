#!/usr/bin/env bash
# Issue 11's prefill measurements in ONE device call (1x H200, <= 300 s wall in all): the MoE / MLP
# forwards under torch.cuda.set_sync_debug_mode("error") (tests/gpu/moe_no_sync.py), then
# `dsaserve bench prefill` 1x1 with the per-phase breakdown, random weights drawn on the device:
#   8 layers / 32 experts (dsv32_8layer_32e), fp8 then bf16 weights, 16K and 64K (128K only when the run
#   is still inside its deadline), and 4 layers / 256 experts (dsv32_4layer_256e), fp8, 64K.
# Each part runs under its own timeout (a failure or timeout is reported and the rest goes on); every JSON
# and log goes under OUTDIR; benchmarks/fp8_prefill_table.py prints the table (with the issue's targets)
# last. Imports no server code.
#
#   bash benchmarks/run_fp8_prefill.sh OUTDIR          # on the device
#   bash benchmarks/run_fp8_prefill.sh OUTDIR --cpu    # CPU dry run of the whole script on the tiny config
#   GEMM=1 bash benchmarks/run_fp8_prefill.sh OUTDIR   # also benchmarks/gemm.py (about 95 s more)
set -u
OUT=${1:?usage: bash benchmarks/run_fp8_prefill.sh OUTDIR [--cpu]}
CPU=0
if [ "${2:-}" = "--cpu" ]; then CPU=1; elif [ -n "${2:-}" ]; then echo "unknown option ${2}" >&2; exit 2; fi
mkdir -p "$OUT"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if [ "$CPU" = 1 ]; then
  BIG=tiny_dsv32; WIDE=tiny_dsv32; LENS=64,128,192; WIDE_LEN=128; EXTRA="--device cpu --chunk-size 64"
  DEADLINE=20; T_SYNC=60; T_BIG=120; T_WIDE=120; GEMM_ARGS="--smoke --only ceilings,dense"
else
  # expected: engine start + ceilings 20-30 s, then per length warm-up + timed + profiled prompt
  # (8 layers bf16: 3 x 1 s at 16K, 3 x 4.1 s at 64K, 3 x 9 s at 128K); Triton compiles in the first run
  BIG=dsv32_8layer_32e; WIDE=dsv32_4layer_256e; LENS=16384,65536,131072; WIDE_LEN=65536; EXTRA=""
  DEADLINE=55; T_SYNC=45; T_BIG=85; T_WIDE=70; GEMM_ARGS=""
fi
T0=$(date +%s)

run() {  # name timeout_s command...: one part; its rc and duration are reported, never fatal
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  echo "== $name (limit ${limit}s, at +$(( start - T0 ))s)"
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $(( $(date +%s) - start ))s (log: $OUT/$name.log)"
  if [ $rc -ne 0 ]; then tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'; fi
}

prefill() {  # name limit config quantization lengths: dsaserve bench prefill 1x1 with the breakdown
  # --deadline-s: no new length starts after it (128K runs only when the shorter ones left time)
  run "prefill_$1" "$2" "$PY" -m dsaserve bench prefill --config "benchmarks/configs/$3.json" --layouts 1x1 \
    --input-len "$5" --repeats 1 --breakdown-len all --ablations none --quantization "$4" \
    --deadline-s "$DEADLINE" --out "$OUT/prefill_$1.json" $EXTRA
}

run moe_no_sync "$T_SYNC" "$PY" -m tests.gpu.moe_no_sync
prefill "${BIG}_fp8" "$T_BIG" "$BIG" fp8 "$LENS"
prefill "${BIG}_none" "$T_BIG" "$BIG" none "$LENS"
if [ "$CPU" = 1 ]; then WIDE_NAME=tiny_dsv32_wide; else WIDE_NAME=$WIDE; fi
prefill "${WIDE_NAME}_fp8" "$T_WIDE" "$WIDE" fp8 "$WIDE_LEN"
if [ "${GEMM:-0}" = 1 ]; then run gemm 120 "$PY" benchmarks/gemm.py $GEMM_ARGS --out "$OUT/gemm.json"; fi
echo "== total $(( $(date +%s) - T0 ))s"
echo "moe_no_sync: $(tail -n 1 "$OUT/moe_no_sync.log")"
"$PY" benchmarks/fp8_prefill_table.py "$OUT"
