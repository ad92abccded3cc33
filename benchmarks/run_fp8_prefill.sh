#!/usr/bin/env bash
# Issue 11's device measurements in ONE call (1x H200, about 6 minutes expected, under 10 worst case): the
# no-host-sync GPU tests (tests/gpu), the GEMM options with the ceilings of the same run
# (benchmarks/gemm.py), then `dsaserve bench prefill` 1x1 at 16K / 64K / 128K on both bench models (8 layers
# / 32 experts and 4 layers / 256 experts), fp8 vs bf16 weights, random weights drawn on the device, with
# the per-phase breakdown. Every JSON and log goes under OUTDIR; each
# measurement runs on its own (a failure or timeout is reported and the rest goes on); a short table last.
#
#   PYTHONPATH=. bash benchmarks/run_fp8_prefill.sh OUTDIR
#   DRY=1 bash benchmarks/run_fp8_prefill.sh OUTDIR     # CPU dry run of the whole script on the tiny config
set -u
OUT=${1:?usage: bash benchmarks/run_fp8_prefill.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if [ "${DRY:-0}" = 1 ]; then
  MODELS="tiny_dsv32"; LENS=64,128; EXTRA="--device cpu --chunk-size 64"; GEMM_ARGS="--smoke --only ceilings,dense"
  T_TESTS=120; T_GEMM=300; T_PREFILL=300; DEADLINE=240
else
  # expected (issue timings, bf16 8-layer 64K = 4.1 s, 128K = 9 s): ~45 s of gemm.py, 50-90 s per prefill run
  MODELS="dsv32_8layer_32e dsv32_4layer_256e"; LENS=16384,65536,131072; EXTRA=""; GEMM_ARGS=""
  T_TESTS=80; T_GEMM=95; T_PREFILL=105; DEADLINE=65
fi
T0=$(date +%s)

run() {  # name timeout_s command...: one measurement; its rc and duration are reported, never fatal
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  echo "== $name (limit ${limit}s, at +$(( start - T0 ))s)"
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $(( $(date +%s) - start ))s (log: $OUT/$name.log)"
  if [ $rc -ne 0 ]; then tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'; fi
}

# the MoE / MLP forwards under torch.cuda.set_sync_debug_mode("error") (skipped on CPU)
if "$PY" -c "import pytest" 2>/dev/null; then
  run gpu_no_sync_tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests/gpu
else
  run gpu_no_sync_tests "$T_TESTS" "$PY" -m tests.gpu.moe_no_sync
fi
run gemm "$T_GEMM" "$PY" benchmarks/gemm.py $GEMM_ARGS --out "$OUT/gemm.json"
for model in $MODELS; do
  for quant in fp8 none; do
    # --deadline-s: no new length starts after it, so a slow run still leaves time for the others
    run "prefill_${model}_${quant}" "$T_PREFILL" "$PY" -m dsaserve bench prefill \
      --config "benchmarks/configs/${model}.json" --layouts 1x1 --input-len "$LENS" --repeats 1 \
      --breakdown-len all --ablations none --quantization "$quant" --deadline-s "$DEADLINE" \
      --out "$OUT/prefill_${model}_${quant}.json" $EXTRA
  done
done
echo "== total $(( $(date +%s) - T0 ))s"
tail -n 1 "$OUT/gpu_no_sync_tests.log"
"$PY" benchmarks/fp8_prefill_table.py "$OUT"
