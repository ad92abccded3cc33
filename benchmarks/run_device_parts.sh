#!/usr/bin/env bash
# Device measurements in named parts, one call (each part under its own timeout; a failure or a timeout is
# reported and the next part still runs). The device returns at most 8 files: every part writes under a
# scratch folder and OUTDIR/all.tar.gz is rebuilt after each part, so a call cut short still brings back
# what finished.
#   bash benchmarks/run_device_parts.sh OUTDIR PART [PART ...]
# PREFILL_EXTRA="..." adds flags to every `bench prefill` part (e.g. "--warmup each": the timed prompt then
# meets no kernel variant the warm-up did not compile, on a machine whose Triton cache is cold).
# Parts:
#   tests_gpu      pytest tests/gpu (every kernel vs its reference on the GPU, decode graphs, fp8 layers)
#   profile        benchmarks/profile_steps.py: kernel tables of a 16K prefill chunk and decode B=1/32 (fp8, bf16)
#   tests_glue     pytest tests/gpu/test_glue_kernels_gpu.py tests/gpu/test_fp8_linear_gpu.py
#   prefill_8l_auto bench prefill 1x1, 8 layers fp8, the defaults only (LENS=... picks the lengths)
#   profile_prefill the same, fp8 only (a 16K prefill chunk's kernel table; decode B=1 alone)
#   profile_prefill_256e the same on the 4-layer / 256-expert model
#   profile_decode the same, fp8 decode only (after a 4K prefill)
#   profile_graphs the same, fp8 decode B=1/32 replayed from the engine's CUDA graphs (kernel times of a busy GPU)
#   profile_chunks bf16 prefill chunks of 512 / 256 tokens at the end of a 64K context (the serving ITL check)
#   decode_kernels benchmarks/decode_kernels.py: fp8 GEMM variants per projection at M = 1 / 32, decode top-k
#   prefill_8l     bench prefill 1x1, 8 layers / 32 experts, 16K / 64K / 128K, fp8 then bf16 (same run)
#   prefill_256e   bench prefill 1x1, 4 layers / 256 experts, 16K / 64K / 128K, fp8 then bf16
#   decode         bench decode 8 layers, B = 1 / 7 / 32 at 4K, graphs on and off, bf16 then fp8
#   decode_fp8     the same, fp8 only
#   tests_graphs   pytest tests/gpu/test_decode_graphs.py (graphs on == off, sync-free steps, staged-ahead inputs)
#   topk_decode    benchmarks/decode_kernels.py --only topk (radix top-k at decode sizes, chunk / warps sweep)
#   mla_decode     benchmarks/sparse_mla_decode.py (split top-k decode kernel sweep)
#   moe_kernels    benchmarks/moe_kernels.py (decode-size experts, prefill fp8 config sweep)
#   serve          benchmarks/run_decode.py --serve-only: dsaserve serve on the bench model + bench serve
#                  (64 clients, 1K in / 256 out; then with a 64K prompt arriving); needs fastapi/uvicorn
#                  (carry .whl and install it first, see /work/.library/device/README.md); SERVE_ARGS="..." adds
#                  `dsaserve serve` flags
#   serve_sync     the same with --sync-scheduling (each decode step planned from the host's tokens: the baseline)
#   decode_long    bench decode fp8, B = 1 / 8 / 32 at 4K / 32K / 64K, graphs on: radix top-k everywhere, then the
#                  default (torch.topk past 32K keys)
#   mla_hopper     pytest tests/gpu/test_sparse_mla_hopper.py, then benchmarks/kernels.py --only mla --quick (the Gluon
#                  sparse MLA prefill kernel beside the Triton variants)
#   topk_cut       the fused top-k's GPU tests (on failure the rest of the call runs the old bisection cut), then
#                  benchmarks/kernels.py --only ceilings,topk (radix16 vs bisect list cut and variants, H = 64 / 32)
#   prefill_mla_ab bench prefill 1x1, 8 layers fp8, the sparse MLA prefill kernel auto (Gluon on Hopper) then triton
#   moe_hopper     pytest tests/gpu/test_moe_gemm_hopper.py (the Gluon grouped MoE GEMM vs the reference and the
#                  Triton kernel), then benchmarks/moe_kernels.py --only ceilings,prefill: Triton default vs Gluon
#   moe_raster     benchmarks/moe_kernels.py --only ceilings,prefill --prefill-configs 7: moe_sched's six, then the
#                  counter at GROUP_M 4 (32 and 256 experts)
#   prefill_moe_ab bench prefill 1x1, 8 layers fp8, --moe-gemm auto (Gluon on Hopper) then triton
#   prefill_moe_ab_256e  the same on the 4-layer / 256-expert model
#   mla_seesaw     the Gluon sparse MLA GPU tests (every variant), then the A/B of ws / ws_bk32 / seesaw vs Triton
#   mla_ab         benchmarks/sparse_mla_hopper_ab.py: Gluon kernel variants vs Triton, random and local indices
#   mla_ncu        ncu (speed of light, warp states, memory) of one Gluon sparse MLA prefill launch
#   logits_knobs   the Gluon logits kernel's GPU tests, then benchmarks/kernels.py --quick --only ceilings,logits,topk:
#                  relu_add / balanced (session 21) against session 20's kernel, the threshold filter's relu A/B
#   logits_hopper  the Gluon indexer logits GPU tests (and the Triton logits tests), then benchmarks/kernels.py
#                  --only ceilings,logits --quick (Triton tiles vs the Gluon kernel, H = 64 / 32, other shapes)
#   moe_ncu        ncu (speed of light, warp states, stall reasons) of one gate_up and one down launch of the Gluon
#                  grouped MoE GEMM at 16K tokens x 32 experts
#   moe_ncu_256    the same at 256 experts (16K tokens: ~512 rows an expert)
#   logits_ncu     the same for one launch of the Gluon indexer logits kernel (8K x 64K causal, H = 64)
#   ncu_src        ncu PC sampling per SASS instruction (source page as CSV) of the Gluon MoE gate_up and down
#                  launches and the Gluon logits kernel: where the warps stall, instruction by instruction
#   tests_rope     the blocked query RoPE and the cuBLASLt path on the norm's fp8 copy, on the GPU
#   threshold      the threshold top-k's GPU tests (filter kernel, exact rows, redo, ties, no sync, memory), then
#                  benchmarks/kernels.py --only ceilings,topk --quick (fused Triton vs threshold, phases, memory)
#   f32_proj       the prefill fp32 projections (router, indexer head weights): GPU tests + benchmarks/f32_projections.py
#   prefill_256e_auto bench prefill 1x1, 4 layers / 256 experts fp8, the defaults only (LENS=... picks the lengths)
#   threshold_bench the benchmark half of threshold alone
#   prefill_topk_ab bench prefill 1x1, 8 layers fp8 (LENS), --indexer-topk fused (threshold on Hopper) then
#                  fused-triton
#   decode_sched   bench decode 8 layers, B = 1 / 7 / 32 at 4K, graphs on and off x async and sync scheduling,
#                  fp8 then bf16
#   tests_moe_idx  the Gluon MoE GEMM, the no-sync MoE forward, the fp8 layers vs CPU and the decode graphs on the GPU
#   prefill_groupm_ab bench prefill 1x1, 8 layers fp8 (LENS), --moe-group-m 0 (the default, 8) then 16, twice
#   redo_probe     benchmarks/threshold_redo_probe.py: which rows the engine's threshold top-k redoes at 64K (8 layers),
#                  and those calls' inputs replayed under other caps / margin / stride
#   prefill_sched_ab bench prefill 1x1, fp8 (LENS), --moe-schedule auto (queue) then static, then per_item (256
#                  experts), 256 experts then 8 layers
#   moe_sched      benchmarks/moe_kernels.py --only ceilings,prefill --prefill-configs 6: the Triton default, the Gluon
#                  kernel's items claimed from a counter (the default) at GROUP_M 8, the same with ordered MMA
#                  issues, at GROUP_M 16, strided over one program per SM (static), gate_up one program per item
#   tests_select   the select tests of tests/gpu/test_threshold_topk_gpu.py (Gluon and Triton kernels vs the torch
#                  reference, Gluon == Triton in order) and the engine's fp8 path vs CPU
#   prefill_select_ab bench prefill 1x1, 8 layers fp8 (LENS), --indexer-select auto (Gluon) then triton
#   profile_chunk64k benchmarks/profile_steps.py fp8: kernel tables of a 16K prompt's prefill and of the last 16K
#                  chunk of a 64K prompt (3 repeats), decode B=1 alone
#   prefill_ab     the same-run A/B of two trees: bench prefill 1x1 at 64K fp8 (--warmup each), the working tree
#                  ("new") and the dsaserve/ in AB_OLD ("old", e.g. `git archive C dsaserve | tar -x -C scratch/ab_old`,
#                  carried to the device), interleaved AB_N times (default 2) on AB_MODELS (default "8l"; "8l 256e")
#   kernels_ab     the same-run A/B of two trees at the kernel level: benchmarks/kernels.py --quick --only KAB_ONLY
#                  (default ceilings,logits,topk) with the working tree's dsaserve/ and with AB_OLD's, interleaved
#                  AB_N times (the bench script is the working tree's in both)
#   mla_pair       the "pair" sparse MLA prefill kernel's GPU tests (a hang is killed at 150 s), then, only if they
#                  all passed, the A/B beside "roles" and Triton with its probes (random / local / L2 indices)
#   order_ab       bench prefill 1x1 at 64K fp8 (--warmup each), the defaults vs ORDER_FLAGS (default: every
#                  session 19 knob on: --moe-mma-order ordered --indexer-mma-order ordered --indexer-filter-regs
#                  240), interleaved AB_N times (default 2) on AB_MODELS (default "8l"; "8l 256e")
#   chunk_ab       bench prefill 1x1 at 64K fp8 (--warmup each), --chunk-size 16384 (the bench default) vs 32768
#                  (each expert's weights read half as often a prompt, twice the rows a tile sweep), on AB_MODELS
#                  (default "8l 256e"): the 256- / 32-expert MoE per-layer ratio at both chunk sizes
#   fused_ab       the same as order_ab with --mla-fused-projections on (the W_UK product + RoPE and the W_UV product +
#                  o_proj's act_quant, one Triton kernel each)
#   query_ab       the same with --indexer-query-kernel gluon (the fp8 indexer's query path, one row a thread)
#   query_gluon    that kernel's GPU tests (== the Triton kernel and the reference, bit for bit), then
#                  benchmarks/indexer_query.py (both kernels on a 16K chunk's queries, both rope layouts)
#   mla_proj       the absorbed MLA projections in one kernel each (W_UK + RoPE; W_UV + o_proj's act_quant): their
#                  GPU tests (vs bmm + the second pass, and the engine's fp8 forward on vs off), then
#                  benchmarks/mla_projections.py (both paths at an attention block of each model, query configs)
#   order          the consumers' MMAs issued in turn (``mma_turns``) and 240 consumer registers for the logits
#                  kernel: the MoE GEMM's GPU tests (a hang is killed), then, only if they all passed,
#                  benchmarks/moe_kernels.py (Triton, Gluon, Gluon ordered; twice); the logits kernel's GPU tests,
#                  then, only if they passed, benchmarks/kernels.py --quick --only ceilings,logits,topk (logits and
#                  threshold filter variants)
set -u
OUT=${1:?usage: bash benchmarks/run_device_parts.sh OUTDIR PART [PART ...]}
shift
PARTS=$(mktemp -d)/parts
mkdir -p "$OUT" "$PARTS"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
P="$PARTS"
T0=$(date +%s)
CFG8=benchmarks/configs/dsv32_8layer_32e.json
CFG256=benchmarks/configs/dsv32_4layer_256e.json

# ncu's warp-stall reasons per issued instruction, for the *_ncu parts
STALLS=$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' barrier long_scoreboard \
  short_scoreboard wait mio_throttle lg_throttle math_pipe_throttle not_selected selected dispatch_stall membar \
  sleeping branch_resolving no_instruction drain misc tex_throttle | sed 's/,$//')

run() {  # name timeout_s command...: one part; its rc and duration are reported, never fatal
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  echo "== $name (limit ${limit}s, at +$(( start - T0 ))s): $*"
  timeout --kill-after=5 "$limit" "$@" > "$P/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $(( $(date +%s) - start ))s"
  grep -v "^USDT" "$P/$name.log" | tail -n "${TAIL:-6}" | sed 's/^/   | /'
  tar -czf "$OUT/all.tar.gz.tmp" -C "$(dirname "$P")" parts && mv "$OUT/all.tar.gz.tmp" "$OUT/all.tar.gz"
}

prefill() {  # name config quantization limit [extra bench prefill flags]
  local name=$1 cfg=$2 quant=$3 limit=$4; shift 4
  TAIL=14 run "$name" "$limit" "$PY" -m dsaserve bench prefill --config "$cfg" --layouts 1x1 \
    --input-len "${LENS:-16384,65536,131072}" --repeats 1 --warmup once --warmup-len 16384 --breakdown-len all \
    --ablations none --quantization "$quant" --out "$P/$name.json" "$@" ${PREFILL_EXTRA:-}
}

ab_old() {  # part name -> AB_OLD's absolute path, or (status 1) the message why it cannot be used
  if [ ! -d "${AB_OLD:-}/dsaserve" ]; then
    echo "== $1: AB_OLD must name a folder holding another tree's dsaserve/ (got '${AB_OLD:-}')"; return 1
  fi
  (cd "$AB_OLD" && pwd)
}

prefill_ab() {  # new / old interleaved: each `bench prefill` runs from its own tree (cwd and PYTHONPATH)
  local old i m cfg side dir
  old=$(ab_old prefill_ab) || { echo "$old"; return; }
  for i in $(seq 1 "${AB_N:-2}"); do
    for m in ${AB_MODELS:-8l}; do
      cfg=$CFG8; [ "$m" = 256e ] && cfg=$CFG256
      for side in new old; do
        dir=$REPO; [ "$side" = old ] && dir=$old
        (cd "$dir" && PYTHONPATH="$dir" TAIL=6 run "ab_${m}_${side}$i" 200 "$PY" -m dsaserve bench prefill \
          --config "$REPO/$cfg" --layouts 1x1 --input-len 65536 --repeats 1 --warmup each --warmup-len 16384 \
          --breakdown-len all --ablations none --quantization fp8 --out "$P/ab_${m}_${side}$i.json")
      done
    done
  done
}

kernels_ab() {  # kernel bench, new / old dsaserve/ interleaved (the working tree's benchmarks/kernels.py in both)
  local old i side dir
  old=$(ab_old kernels_ab) || { echo "$old"; return; }
  for i in $(seq 1 "${AB_N:-2}"); do
    for side in new old; do
      dir=$REPO; [ "$side" = old ] && dir=$old
      (cd "$dir" && PYTHONPATH="$dir:$REPO/benchmarks" TAIL=40 run "kab_${side}$i" 300 "$PY" \
        "$REPO/benchmarks/kernels.py" --quick --only "${KAB_ONLY:-ceilings,logits,topk}" --out "$P/kab_${side}$i.json")
    done
  done
}

mla_pair() {  # the pair kernel's GPU tests; its A/B only if they all passed (a wrong barrier would hang it)
  TAIL=20 run mla_pair_tests 150 "$PY" -m pytest tests/gpu/test_sparse_mla_hopper.py -q -rs -x -k pair \
    -p no:cacheprovider
  if grep -q " passed" "$P/mla_pair_tests.log" && ! grep -q -E "failed|error|Timeout" "$P/mla_pair_tests.log"; then
    TAIL=40 run mla_pair_ab 240 "$PY" benchmarks/sparse_mla_hopper_ab.py \
      --only triton,hopper_roles,hopper_pair,hopper_pair_late_s,probe_pair_2,probe_pair_4,probe_pair_6 \
      --out "$P/mla_pair_ab.json"
  else
    echo "== mla_pair_ab skipped: the pair kernel's GPU tests did not all pass"
  fi
}

logits_knobs() {  # session 21: relu_add and the balanced schedule (the logits kernel's GPU tests gate the bench)
  TAIL=12 run logits_knobs_tests 240 "$PY" -m pytest tests/gpu/test_indexer_logits_hopper.py \
    tests/gpu/test_threshold_topk_gpu.py -q -rs -x -k "not select" -p no:cacheprovider
  if grep -q " passed" "$P/logits_knobs_tests.log" && ! grep -q -E "failed|error|Timeout" "$P/logits_knobs_tests.log"; then
    TAIL=60 run logits_knobs_kernels 300 "$PY" benchmarks/kernels.py --quick --only ceilings,logits,topk \
      --out "$P/logits_knobs_kernels.json"
  else
    echo "== logits_knobs_kernels skipped: the logits kernel's GPU tests did not all pass"
  fi
}

order() {  # the ordered MMA issues (and the logits kernel's register split): each kernel's tests gate its benches
  passed() { grep -q " passed" "$P/$1.log" && ! grep -q -E "failed|error|Timeout" "$P/$1.log"; }
  TAIL=12 run order_tests_moe 200 "$PY" -m pytest tests/gpu/test_moe_gemm_hopper.py -q -rs -x \
    -k "matches_reference_and_triton" -p no:cacheprovider      # a wrong turn would hang: killed at 200 s
  if passed order_tests_moe; then
    for i in 1 2; do
      TAIL=12 run "order_moe$i" 200 "$PY" benchmarks/moe_kernels.py --only ceilings,prefill --prefill-configs 3 \
        --budget-s 170 --out "$P/order_moe$i.json"
    done
  else
    echo "== order_moe skipped: the MoE GEMM's GPU tests did not all pass"
  fi
  TAIL=12 run order_tests_logits 150 "$PY" -m pytest tests/gpu/test_indexer_logits_hopper.py -q -rs -x \
    -k "ordered or ring_depths" -p no:cacheprovider
  if passed order_tests_logits; then
    TAIL=60 run order_kernels 300 "$PY" benchmarks/kernels.py --quick --only ceilings,logits,topk \
      --out "$P/order_kernels.json"
  else
    echo "== order_kernels skipped: the logits kernel's GPU tests did not all pass"
  fi
}

chunk_ab() {  # the prefill chunk size's effect on the MoE phase (and the rest), same tree
  local m cfg c
  for m in ${AB_MODELS:-8l 256e}; do
    cfg=$CFG8; [ "$m" = 256e ] && cfg=$CFG256
    for c in 16384 32768; do
      TAIL=6 run "chunk_ab_${m}_$c" 200 "$PY" -m dsaserve bench prefill --config "$cfg" --layouts 1x1 \
        --input-len 65536 --repeats 1 --warmup each --warmup-len "$c" --chunk-size "$c" --breakdown-len all \
        --ablations none --quantization fp8 --out "$P/chunk_ab_${m}_$c.json"
    done
  done
}

flags_ab() {  # tag "flags": the engine with the flags vs the defaults, same tree, interleaved AB_N times on AB_MODELS
  local tag=$1 knobs=$2 i m cfg side flags
  for i in $(seq 1 "${AB_N:-2}"); do
    for m in ${AB_MODELS:-8l}; do
      cfg=$CFG8; [ "$m" = 256e ] && cfg=$CFG256
      for side in default knobs; do
        flags=""; [ "$side" = knobs ] && flags=$knobs
        # shellcheck disable=SC2086  # the flags are words
        TAIL=6 run "${tag}_${m}_${side}$i" 200 "$PY" -m dsaserve bench prefill --config "$cfg" --layouts 1x1 \
          --input-len 65536 --repeats 1 --warmup each --warmup-len 16384 --breakdown-len all --ablations none \
          --quantization fp8 --out "$P/${tag}_${m}_${side}$i.json" $flags
      done
    done
  done
}

order_ab() {  # the engine with the session 19 knobs on vs the defaults
  flags_ab order_ab "${ORDER_FLAGS:-"--moe-mma-order ordered --indexer-mma-order ordered --indexer-filter-regs 240"}"
}

moe_ncu() {  # name experts: ncu of one gate_up and one down launch of the Gluon MoE GEMM (persistent), 16K tokens
  TAIL=80 run "$1" 240 ncu --kernel-name regex:_moe_fp8_gemm_hopper_kernel --launch-count 2 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --metrics "$STALLS" \
    "$PY" benchmarks/moe_kernels.py --profile-once --profile-experts "$2"
}

threshold_bench() {  # the threshold top-k beside the fused Triton kernel: variants, phases, memory
  TAIL=60 run threshold_bench 300 "$PY" benchmarks/kernels.py --only ceilings,topk --quick --out "$P/kernels_topk.json"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv > "$P/nvidia_smi.txt" 2>&1
for part in "$@"; do
  case $part in
    mla_hopper) TAIL=30 run mla_hopper_tests 200 "$PY" -m pytest tests/gpu/test_sparse_mla_hopper.py -q -rs -x \
        -p no:cacheprovider
      TAIL=30 run mla_hopper_bench 200 "$PY" benchmarks/kernels.py --only mla --quick --out "$P/mla_hopper.json" ;;
    topk_cut) TAIL=12 run topk_cut_tests 150 "$PY" -m pytest tests/gpu/test_kernels_gpu.py -q -rs -k fused_topk \
        -p no:cacheprovider
      if ! grep -q " passed" "$P/topk_cut_tests.log" || grep -q "failed\|error" "$P/topk_cut_tests.log"; then
        # a failing new cut must not skew the parts after it: they run with the old (bisection) cut
        sed -i 's/cut: str = "radix16"/cut: str = "bisect"/' dsaserve/kernels/indexer_topk.py
        echo "   !! fused top-k GPU tests failed: the rest of this call runs with TopkConfig.cut = 'bisect'"
      fi
      TAIL=40 run topk_cut_bench 240 "$PY" benchmarks/kernels.py --only ceilings,topk --out "$P/kernels_topk.json" ;;
    moe_hopper) TAIL=20 run moe_hopper_tests 300 "$PY" -m pytest tests/gpu/test_moe_gemm_hopper.py -q -rs -s \
        -p no:cacheprovider
      TAIL=20 run moe_hopper_bench 200 "$PY" benchmarks/moe_kernels.py --only ceilings,prefill --prefill-configs 4 \
        --budget-s 150 --out "$P/moe_hopper_bench.json" ;;
    moe_raster) TAIL=30 run moe_raster_bench 240 "$PY" benchmarks/moe_kernels.py --only ceilings,prefill \
        --prefill-configs 7 --budget-s 200 --out "$P/moe_raster_bench.json" ;;
    prefill_moe_ab) prefill prefill_8l_fp8_moe_auto "$CFG8" fp8 150 --moe-gemm auto
      prefill prefill_8l_fp8_moe_triton "$CFG8" fp8 150 --moe-gemm triton ;;
    prefill_moe_ab_256e) prefill prefill_256e_fp8_moe_auto "$CFG256" fp8 150 --moe-gemm auto
      prefill prefill_256e_fp8_moe_triton "$CFG256" fp8 150 --moe-gemm triton ;;
    prefill_mla_ab) prefill prefill_8l_fp8_mla_auto "$CFG8" fp8 120 --sparse-mla-prefill auto
      prefill prefill_8l_fp8_mla_triton "$CFG8" fp8 120 --sparse-mla-prefill triton ;;
    mla_seesaw) TAIL=30 run mla_seesaw_tests 240 "$PY" -m pytest tests/gpu/test_sparse_mla_hopper.py -q -rs -x \
        -p no:cacheprovider
      TAIL=30 run mla_seesaw_ab 150 "$PY" benchmarks/sparse_mla_hopper_ab.py \
        --only triton,hopper_ws,hopper_ws_bk32,hopper_seesaw --out "$P/mla_seesaw_ab.json" ;;
    mla_ab) TAIL=30 run mla_ab 200 "$PY" benchmarks/sparse_mla_hopper_ab.py --out "$P/mla_ab.json" ;;
    mla_ncu) TAIL=60 run mla_ncu 240 ncu --kernel-name regex:_sparse_mla_prefill_kernel --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        --section Occupancy --metrics "$STALLS" \
        "$PY" benchmarks/kernels.py --profile-once ;;
    logits_knobs) logits_knobs ;;
    logits_hopper) TAIL=20 run logits_hopper_tests 200 "$PY" -m pytest tests/gpu/test_indexer_logits_hopper.py \
        tests/gpu/test_kernels_gpu.py -q -rs -k "logits" -p no:cacheprovider
      TAIL=40 run logits_hopper_bench 240 "$PY" benchmarks/kernels.py --only ceilings,logits --quick \
        --out "$P/kernels_logits.json" ;;
    moe_ncu) moe_ncu moe_ncu 32 ;;
    moe_ncu_256) moe_ncu moe_ncu_256 256 ;;
    logits_ncu) TAIL=60 run logits_ncu 200 ncu --kernel-name regex:_mqa_logits_hopper_kernel --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
        --metrics "$STALLS" "$PY" benchmarks/kernels.py --profile-once ;;
    ncu_src)
      for spec in "moe_gate_up:_moe_fp8_gemm_hopper_kernel:0:benchmarks/moe_kernels.py" \
                  "moe_down:_moe_fp8_gemm_hopper_kernel:1:benchmarks/moe_kernels.py" \
                  "logits:_mqa_logits_hopper_kernel:0:benchmarks/kernels.py"; do
        IFS=: read -r tag kern skip script <<< "$spec"
        TAIL=4 run "ncu_src_$tag" 150 ncu --kernel-name "regex:$kern" --launch-skip "$skip" --launch-count 1 \
          --section SourceCounters --section WarpStateStats --section SpeedOfLight -f -o "$P/ncu_$tag" \
          "$PY" "$script" --profile-once
        TAIL=4 run "ncu_src_${tag}_csv" 60 bash -c "ncu -i '$P/ncu_$tag.ncu-rep' --page source --csv --print-source sass \
          > '$P/ncu_src_$tag.csv'"
      done ;;
    tests_rope) TAIL=6 run tests_rope 150 "$PY" -m pytest tests/gpu/test_query_rope_blocks_gpu.py \
        tests/gpu/test_fp8_linear_gpu.py -q -rs -p no:cacheprovider ;;
    tests_graphs) TAIL=6 run tests_graphs 170 "$PY" -m pytest tests/gpu/test_decode_graphs.py -q -rs -p no:cacheprovider ;;
    topk_decode) TAIL=80 run topk_decode 150 "$PY" benchmarks/decode_kernels.py --only topk --out "$P/topk_decode.json" ;;
    decode_fp8) TAIL=12 run decode_fp8 110 "$PY" -m dsaserve bench decode --config "$CFG8" --batch-size 1,7,32 \
      --context-len 4096 --steps 32 --graphs on,off --moe-backend grouped --quantization fp8 --deadline-s 95 \
      --out "$P/decode_fp8.json" ;;
    tests_moe_idx) TAIL=10 run tests_moe_idx 240 "$PY" -m pytest tests/gpu/test_moe_gemm_hopper.py \
        tests/gpu/test_moe_no_sync.py tests/gpu/test_fp8_layers.py tests/gpu/test_decode_graphs.py -q -rs -p no:cacheprovider ;;
    prefill_groupm_ab) prefill prefill_8l_fp8_group8_a "$CFG8" fp8 150 --moe-group-m 0
      prefill prefill_8l_fp8_group16_a "$CFG8" fp8 100 --moe-group-m 16
      prefill prefill_8l_fp8_group8_b "$CFG8" fp8 100 --moe-group-m 0
      prefill prefill_8l_fp8_group16_b "$CFG8" fp8 100 --moe-group-m 16 ;;
    redo_probe) TAIL=60 run redo_probe 420 "$PY" benchmarks/threshold_redo_probe.py --out "$P/redo_probe.json" ;;
    prefill_sched_ab) prefill prefill_256e_fp8_sched_auto "$CFG256" fp8 110 --moe-schedule auto
      prefill prefill_256e_fp8_sched_static "$CFG256" fp8 110 --moe-schedule static
      prefill prefill_256e_fp8_sched_per_item "$CFG256" fp8 110 --moe-schedule per_item
      prefill prefill_8l_fp8_sched_auto "$CFG8" fp8 130 --moe-schedule auto
      prefill prefill_8l_fp8_sched_static "$CFG8" fp8 130 --moe-schedule static ;;
    moe_sched) TAIL=30 run moe_sched_bench 200 "$PY" benchmarks/moe_kernels.py --only ceilings,prefill \
        --prefill-configs 6 --budget-s 160 --out "$P/moe_sched_bench.json" ;;
    tests_gpu) TAIL=10 run tests_gpu 480 "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider ;;
    profile) TAIL=40 run profile 200 "$PY" benchmarks/profile_steps.py --out "$P/profile" ;;
    tests_glue) TAIL=12 run tests_glue 200 "$PY" -m pytest tests/gpu/test_glue_kernels_gpu.py tests/gpu/test_fp8_linear_gpu.py \
        -q -rs -p no:cacheprovider ;;
    prefill_8l_auto) prefill prefill_8l_fp8_auto "$CFG8" fp8 240 ;;
    profile_prefill) TAIL=40 run profile_prefill 150 "$PY" benchmarks/profile_steps.py --quantization fp8 \
      --batch-size 1 --steps 2 --warmup-steps 1 --out "$P/profile_prefill" ;;
    profile_prefill_256e) TAIL=40 run profile_prefill_256e 150 "$PY" benchmarks/profile_steps.py --config "$CFG256" \
      --quantization fp8 --batch-size 1 --steps 2 --warmup-steps 1 --out "$P/profile_prefill_256e" ;;
    profile_decode) TAIL=30 run profile_decode 120 "$PY" benchmarks/profile_steps.py --quantization fp8 \
      --prefill-len 4096 --batch-size 1,32 --out "$P/profile_decode" ;;
    profile_graphs) TAIL=30 run profile_graphs 150 "$PY" benchmarks/profile_steps.py --quantization fp8 \
      --prefill-len 4096 --batch-size 1,32 --graphs --out "$P/profile_graphs" ;;
    profile_chunks) TAIL=40 run profile_chunks 200 "$PY" benchmarks/profile_steps.py --quantization none \
      --prefill-len 16384 --chunk-context 65536 --chunk-len 512,256,128 --batch-size 1 --steps 2 \
      --out "$P/profile_chunks" ;;
    decode_kernels) TAIL=40 run decode_kernels 240 "$PY" benchmarks/decode_kernels.py --out "$P/decode_kernels.json" ;;
    prefill_8l) prefill prefill_8l_fp8 "$CFG8" fp8 110; prefill prefill_8l_bf16 "$CFG8" none 100 ;;
    prefill_256e) prefill prefill_256e_fp8 "$CFG256" fp8 90; prefill prefill_256e_bf16 "$CFG256" none 90 ;;
    decode)
      for q in none fp8; do
        TAIL=12 run "decode_$q" 100 "$PY" -m dsaserve bench decode --config "$CFG8" --batch-size 1,7,32 \
          --context-len 4096 --steps 32 --graphs on,off --moe-backend grouped --quantization "$q" \
          --deadline-s 85 --out "$P/decode_$q.json"
      done ;;
    mla_decode) TAIL=30 run mla_decode 90 "$PY" benchmarks/sparse_mla_decode.py --out "$P/mla_decode.json" ;;
    moe_kernels)
      TAIL=40 run moe_decode 100 "$PY" benchmarks/moe_kernels.py --only ceilings,decode --out "$P/moe_decode.json"
      TAIL=40 run moe_prefill 100 "$PY" benchmarks/moe_kernels.py --only ceilings,prefill,decode_bf16_sweep \
        --out "$P/moe_prefill.json" ;;
    serve) TAIL=30 run serve 330 "$PY" benchmarks/run_decode.py "$P/serve" --serve-only --server-args "${SERVE_ARGS:-}" ;;
    serve_sync) TAIL=30 run serve_sync 330 "$PY" benchmarks/run_decode.py "$P/serve_sync" --serve-only \
      --server-args "--sync-scheduling ${SERVE_ARGS:-}" ;;
    decode_long)   # the decode top-k past 32K keys: radix everywhere (the old rule) vs the default, same call
      for mode in radix default; do
        lim=32768; [ "$mode" = radix ] && lim=1000000000
        TAIL=14 run "decode_long_$mode" 200 env DSASERVE_DECODE_RADIX_MAX_KEYS=$lim "$PY" -m dsaserve bench decode \
          --config "$CFG8" --batch-size 1,8,32 --context-len 4096,32768,65536 --steps 32 --graphs on \
          --scheduling async --moe-backend grouped --quantization fp8 --deadline-s 180 --out "$P/decode_long_$mode.json"
      done ;;
    decode_sched)
      for q in fp8 none; do
        TAIL=16 run "decode_sched_$q" 120 "$PY" -m dsaserve bench decode --config "$CFG8" --batch-size 1,7,32 \
          --context-len 4096 --steps 48 --graphs on,off --scheduling async,sync --moe-backend grouped \
          --quantization "$q" --deadline-s 100 --out "$P/decode_sched_$q.json"
      done ;;
    threshold) TAIL=30 run threshold_tests 200 "$PY" -m pytest tests/gpu/test_threshold_topk_gpu.py -q -rs \
        -p no:cacheprovider
      threshold_bench ;;
    threshold_bench) threshold_bench ;;
    tests_select) TAIL=12 run tests_select 200 "$PY" -m pytest tests/gpu/test_threshold_topk_gpu.py -q -rs \
        -p no:cacheprovider ;;
    prefill_select_ab) prefill prefill_8l_fp8_select_auto "$CFG8" fp8 130 --indexer-select auto
      prefill prefill_8l_fp8_select_triton "$CFG8" fp8 130 --indexer-select triton ;;
    prefill_ab) prefill_ab ;;
    kernels_ab) kernels_ab ;;
    mla_pair) mla_pair ;;
    order) order ;;
    order_ab) order_ab ;;
    fused_ab) flags_ab fused_ab "--mla-fused-projections on" ;;
    query_ab) flags_ab query_ab "--indexer-query-kernel gluon" ;;
    query_gluon) TAIL=10 run query_gluon_tests 150 "$PY" -m pytest tests/gpu/test_glue_kernels_gpu.py -q -rs \
        -k indexer_query_gluon -p no:cacheprovider
      TAIL=6 run query_gluon 90 "$PY" benchmarks/indexer_query.py --out "$P/indexer_query.json" ;;
    mla_proj) TAIL=10 run mla_proj_tests 200 "$PY" -m pytest tests/gpu/test_mla_projections_gpu.py -q -rs \
        -p no:cacheprovider
      TAIL=6 run mla_proj 150 "$PY" benchmarks/mla_projections.py --out "$P/mla_projections.json" ;;
    chunk_ab) chunk_ab ;;
    profile_chunk64k) TAIL=40 run profile_chunk64k 200 "$PY" benchmarks/profile_steps.py --quantization fp8 \
      --batch-size 1 --steps 1 --warmup-steps 1 --chunk-context 65536 --chunk-len 16384 --out "$P/profile_chunk64k" ;;
    prefill_topk_ab) prefill prefill_topk_threshold "$CFG8" fp8 150
      prefill prefill_topk_triton "$CFG8" fp8 150 --indexer-topk fused-triton ;;
    f32_proj) TAIL=10 run f32_proj_tests 150 "$PY" -m pytest tests/gpu/test_fp8_linear_gpu.py -q -rs -k linear_f32 \
        -p no:cacheprovider
      TAIL=8 run f32_proj 120 "$PY" benchmarks/f32_projections.py --out "$P/f32_projections.json" ;;
    prefill_256e_auto) prefill prefill_256e_fp8_auto "$CFG256" fp8 200 ;;
    *) echo "unknown part $part" ;;
  esac
done
echo "== total $(( $(date +%s) - T0 ))s"
tar -czf "$OUT/all.tar.gz" -C "$(dirname "$P")" parts
