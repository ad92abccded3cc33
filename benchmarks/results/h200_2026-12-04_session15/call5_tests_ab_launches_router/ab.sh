#!/usr/bin/env bash
# Same-run A/B of this session's last changes: the working tree ("new") vs the dsaserve tree of 8000505 ("old",
# scratch/ab_old: before the sample's fewer launches and the router's 128x128 split-GEMM tiles), interleaved.
OUT=$1; REPO=$(pwd)
run() {  # name dir config
  local name=$1 dir=$2 cfg=$3; local t0=$(date +%s)
  (cd "$dir" && timeout 200 python3 -m dsaserve bench prefill --config "$REPO/$cfg" --layouts 1x1 --input-len 65536 \
    --repeats 1 --warmup once --warmup-len 16384 --breakdown-len all --ablations none --quantization fp8 \
    --warmup each --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1)
  echo "== $name rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^\| (top-k|MoE experts|dense GEMMs) " "$OUT/$name.log"
}
C8=benchmarks/configs/dsv32_8layer_32e.json; C256=benchmarks/configs/dsv32_4layer_256e.json
run ab_8l_new "$REPO" $C8; run ab_8l_old "$REPO/scratch/ab_old" $C8
run ab_8l_new2 "$REPO" $C8; run ab_8l_old2 "$REPO/scratch/ab_old" $C8
run ab_256e_new "$REPO" $C256; run ab_256e_old "$REPO/scratch/ab_old" $C256
run ab_256e_new2 "$REPO" $C256; run ab_256e_old2 "$REPO/scratch/ab_old" $C256
