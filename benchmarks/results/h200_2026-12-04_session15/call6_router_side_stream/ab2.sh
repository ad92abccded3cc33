#!/usr/bin/env bash
# Same-run A/B of the router on a side stream: the working tree ("new") vs the dsaserve tree of f6712b6 ("old",
# scratch/ab_old), interleaved; outputs tarred (the device returns a limited number of files).
OUT=$1; REPO=$(pwd); P=$(mktemp -d)
run() {  # name dir config
  local name=$1 dir=$2 cfg=$3; local t0=$(date +%s)
  (cd "$dir" && timeout 150 python3 -m dsaserve bench prefill --config "$REPO/$cfg" --layouts 1x1 --input-len 65536 \
    --repeats 1 --warmup once --warmup-len 16384 --breakdown-len all --ablations none --quantization fp8 \
    --warmup each --out "$P/$name.json" > "$P/$name.log" 2>&1)
  echo "== $name rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^\| (top-k|MoE experts|dense GEMMs) " "$P/$name.log"
}
C8=benchmarks/configs/dsv32_8layer_32e.json; C256=benchmarks/configs/dsv32_4layer_256e.json
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv > "$P/nvidia_smi.txt"
t0=$(date +%s); timeout 120 python3 -m pytest tests/gpu/test_moe_no_sync.py -q -rs -p no:cacheprovider > "$P/tests_moe_no_sync.log" 2>&1
echo "tests rc=$? $(( $(date +%s) - t0 ))s"; tail -1 "$P/tests_moe_no_sync.log"
run ab_256e_new "$REPO" $C256; run ab_256e_old "$REPO/scratch/ab_old" $C256
run ab_256e_new2 "$REPO" $C256; run ab_256e_old2 "$REPO/scratch/ab_old" $C256
run ab_8l_new "$REPO" $C8; run ab_8l_old "$REPO/scratch/ab_old" $C8
tar czf "$OUT/ab2.tar.gz" -C "$P" .
