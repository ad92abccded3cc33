#!/usr/bin/env bash
# Same-run A/B: the working tree ("new") vs the dsaserve tree in scratch/ab_old ("old": see the results README),
# interleaved, 8-layer bench model at 64K fp8; outputs tarred into $OUT/ab3.tar.gz.
OUT=$1; REPO=$(pwd); N=${N:-2}; P=$(mktemp -d)
run() {  # name dir config
  local name=$1 dir=$2 cfg=$3; local t0=$(date +%s)
  (cd "$dir" && timeout 150 python3 -m dsaserve bench prefill --config "$REPO/$cfg" --layouts 1x1 --input-len 65536 \
    --repeats 1 --warmup once --warmup-len 16384 --breakdown-len all --ablations none --quantization fp8 \
    --warmup each --out "$P/$name.json" > "$P/$name.log" 2>&1)
  echo "== $name rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^\| (top-k|MoE experts|dense GEMMs) " "$P/$name.log"
  tar czf "$OUT/ab3.tar.gz" -C "$P" .
}
C8=benchmarks/configs/dsv32_8layer_32e.json
for i in $(seq 1 $N); do run ab_8l_new$i "$REPO" $C8; run ab_8l_old$i "$REPO/scratch/ab_old" $C8; done
