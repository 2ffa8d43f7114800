#!/usr/bin/env bash
# Session 7's device calls. Usage (device): scripts/gpu-session7.sh BIN_DIR OUT_DIR MODE
#   direct: the direct MoE LoRA variant (one kernel per seam from the routing): its layer /
#           decode GPU tests, memcheck and racecheck, bench moe (DTYPES, default fp8) over
#           PATHS (default "overlap direct4 direct8 direct2"), bench decode fast path best vs
#           direct (alternating). Results in $OUT/direct.tgz.
#   profile-direct: why the direct kernel takes 19-37 us per seam (bench/NOTES.md, session 7):
#           Nsight Compute on it at batch 16 and 128 (SpeedOfLight, Occupancy, WarpStateStats,
#           LaunchStats, source counters), cluster sizes 4 and 8. Results in $OUT/profdirect.tgz.
#   final: every GPU test, memcheck (SAN_FILTER, optional), bench decode hooks / fast.
set -uo pipefail
B=$1; OUT=$2; MODE=$3; mkdir -p "$OUT"
export MOELORA_FIXTURES=$PWD/tests/fixtures
decode_ab() {  # decode_ab R VARIANTS...: bench decode fast r16x1 per MoE LoRA variant, twice
  local R=$1; shift
  for rep in 1 2; do
    for v in "$@"; do
      timeout 150 "$B/moelora" bench decode --batches ${DECODE_BATCHES:-1,16,64,128} \
        --lora none,r16x1 --path fast --moe-lora "$v" --steps 10 \
        --json "$R/decode_${v}_$rep.json" > "$R/decode_${v}_$rep.log" 2>&1
      echo "== decode moe-lora $v (run $rep) rc=$?"
      grep -E "batch +[0-9]+ +fast +lora" "$R/decode_${v}_$rep.log"
    done
  done
}
if [ "$MODE" = direct ]; then
  R=$OUT/direct; mkdir -p "$R"
  if [ "${SKIP_TESTS:-0}" = 0 ]; then
    timeout 300 "$B/moelora_gpu_tests" \
      --gtest_filter='CudaMoeLayer.*Lora*:CudaFp8Block.*Lora*:*DecodeGraphDirect*:*DecodeGraphInline*' \
      > "$R/gpu_tests.log" 2>&1
    echo "gpu tests rc=$?"
    grep -E "^\[  FAILED|^\[  PASSED|tests ran|Failure|Expected|Which is|error" "$R/gpu_tests.log" | head -30
    for tool in memcheck racecheck; do
      timeout 200 compute-sanitizer --tool $tool "$B/moelora_gpu_tests" \
        --gtest_filter="${SAN_FILTER:-CudaFp8Block.DirectLoraMatchesReference}" > "$R/san_$tool.log" 2>&1
      echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^\[  PASSED|^\[  FAILED" "$R/san_$tool.log" | tail -3
    done
  fi
  for dt in ${DTYPES:-fp8}; do
    PATHS="${PATHS:-overlap direct4 direct8 direct2}" LORAS=${LORAS:-none,r16x1,r16x4,r64x1} \
      bash scripts/bench-moe-paths.sh "$B/moelora" "$R" "$dt"
  done
  [ -n "${DECODE:-}" ] && decode_ab "$R" $DECODE
  tar -czf "$OUT/direct.tgz" -C "$OUT" direct
fi
if [ "$MODE" = profile-direct ]; then
  R=$OUT/profdirect; mkdir -p "$R"
  for c in 4 8; do
    for b in 16 128; do
      timeout 240 ncu --clock-control none --kernel-name regex:moe_lora_direct --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
        --section SchedulerStats --section SourceCounters --section MemoryWorkloadAnalysis \
        "$B/moelora" bench moe --layers 1 --repeats 1 --dtype fp8 --path direct \
        --direct-cluster $c --lora r16x1 --batches $b > "$R/ncu_c${c}_b${b}.txt" 2>&1
      echo "== cluster $c batch $b rc=$?"
      grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Stall|Warp Cycles Per Issued|DRAM Throughput|Cluster" \
        "$R/ncu_c${c}_b${b}.txt" | head -24
    done
  done
  tar -czf "$OUT/profdirect.tgz" -C "$OUT" profdirect
fi
if [ "$MODE" = final ]; then
  R=$OUT/final; mkdir -p "$R"
  timeout 500 "$B/moelora_gpu_tests" > "$R/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$R/gpu_tests.log" | head -20
  if [ -n "${SAN_FILTER:-}" ]; then
    timeout 200 compute-sanitizer --tool memcheck "$B/moelora_gpu_tests" \
      --gtest_filter="$SAN_FILTER" > "$R/san_memcheck.log" 2>&1
    echo "memcheck rc=$?"; grep -E "ERROR SUMMARY" "$R/san_memcheck.log" | tail -1
  fi
  for path in hooks fast; do
    timeout 200 "$B/moelora" bench decode --batches 1,16,64,128 --lora none,r16x1,r16x4 \
      --path $path --steps 10 --json "$R/decode_$path.json" > "$R/decode_$path.log" 2>&1
    echo "== decode $path rc=$?"; grep -E "batch +[0-9]+ +$path" "$R/decode_$path.log"
  done
  tar -czf "$OUT/final.tgz" -C "$OUT" final
fi
