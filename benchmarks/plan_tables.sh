#!/usr/bin/env bash
# Usage (from the repository root, venv active, PYTHONPATH=$PWD): bash benchmarks/plan_tables.sh
# Every `dsaserve plan` run of docs/BENCHMARKS.md (section "Memory plan"); JSON -> benchmarks/results/
set -euo pipefail
run() {  # model pp cp gib ctx quant moe_split topk
    python -m dsaserve plan --model benchmarks/configs/$1.json --pp-size $2 --cp-size $3 --gpu-memory-gb $4 \
    --max-model-len $5 --chunked-prefill-size 16384 --quantization $6 --moe-split $7 --indexer-topk $8 --json \
    > benchmarks/results/plan_$1_pp$2xcp$3_$4gib_$(($5 / 1024))k_$6_$7_$8.json || [ $? -eq 1 ]  # 1 = does not fit
}
for ctx in 65536 131072; do
  for q in fp8 none; do
    for t in unfused fused; do
      run deepseek_v32 2 8 95.6 $ctx $q expert $t
      run deepseek_v32 2 8 140.4 $ctx $q expert $t
      run deepseek_v32 1 8 140.4 $ctx $q expert $t
    done
    run glm5 2 8 95.6 $ctx $q expert unfused
    run glm5 2 8 140.4 $ctx $q expert unfused
  done
  for t in unfused fused; do  # the engine before issue 11: bf16 (fp8 dequantized at load), experts split by intermediate dim
    run deepseek_v32 2 8 95.6 $ctx none intermediate $t
    run deepseek_v32 2 8 140.4 $ctx none intermediate $t
  done
done
