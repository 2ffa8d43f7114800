#!/usr/bin/env bash
# Session 4's device call: the fast decode path's GPU tests first, then every GPU test, a
# sanitizer pass over a graph-replayed decode, and bench decode on both paths.
# Usage (device): scripts/gpu-session4.sh BIN_DIR OUT_DIR [quick]
set -uo pipefail
B=$1; OUT=$2; MODE=${3:-full}; mkdir -p "$OUT"
export MOELORA_FIXTURES=$PWD/tests/fixtures
timeout 240 "$B/moelora_gpu_tests" --gtest_filter='*DecodeGraph*' > "$OUT/decode_graph.log" 2>&1
echo "decode graph tests rc=$?"
grep -E "^\[  FAILED|^\[  PASSED|^\[       OK|tests ran|Failure|error" "$OUT/decode_graph.log" | head -40
if [ "$MODE" = full ]; then
  timeout 330 "$B/moelora_gpu_tests" --gtest_filter='-*DecodeGraph*' > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$OUT/gpu_tests.log" | head -20
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool $tool "$B/moelora_gpu_tests" \
      --gtest_filter='Formats/DecodeGraphTest.PaddedBucketMatchesEager/bf16' > "$OUT/san_$tool.log" 2>&1
    echo "$tool rc=$?"; tail -2 "$OUT/san_$tool.log"
  done
fi
timeout 240 "$B/moelora" bench decode --batches 1,16,64,128 --lora none,r16x1 --path hooks,fast \
  --steps 10 --json "$OUT/bench_decode.json" > "$OUT/bench_decode.log" 2>&1
echo "bench decode rc=$?"
grep -E "batch|random" "$OUT/bench_decode.log"
