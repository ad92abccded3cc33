#!/usr/bin/env bash
# Final call of session 16: the sample's rows A/B (kernel level), then the working tree ("new") vs 29d65d8 ("old",
# scratch/ab_old: before the sample's keys in place), 8 layers interleaved x2, and the 256-expert model once (new).
OUT=$1; REPO=$(pwd); P=$(mktemp -d)
t0=$(date +%s); timeout 120 python3 scratch/rows_ab.py "$P/rows_ab.json" > "$P/rows_ab.log" 2>&1
echo "rows_ab rc=$? $(( $(date +%s) - t0 ))s"; tail -2 "$P/rows_ab.log" | cut -c1-400
run() {  # name dir config
  local name=$1 dir=$2 cfg=$3; local t0=$(date +%s)
  (cd "$dir" && timeout 150 python3 -m dsaserve bench prefill --config "$REPO/$cfg" --layouts 1x1 --input-len 65536 \
    --repeats 1 --warmup once --warmup-len 16384 --breakdown-len all --ablations none --quantization fp8 \
    --warmup each --out "$P/$name.json" > "$P/$name.log" 2>&1)
  echo "== $name rc=$? $(( $(date +%s) - t0 ))s"; grep -E "TTFT [0-9]|^\| (top-k|MoE experts|dense GEMMs|indexer|sparse attention) " "$P/$name.log"
  tar czf "$OUT/ab4.tar.gz" -C "$P" .
}
C8=benchmarks/configs/dsv32_8layer_32e.json; C256=benchmarks/configs/dsv32_4layer_256e.json
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv > "$P/nvidia_smi.txt"
for i in 1 2; do run ab_8l_new$i "$REPO" $C8; run ab_8l_old$i "$REPO/scratch/ab_old" $C8; done
run prefill_256e_new "$REPO" $C256
