#!/usr/bin/env bash
# Session 3's closing device call: every GPU test, the sanitizers on the kernels not yet checked,
# and the decode benchmark. Usage (device): scripts/gpu-session3.sh BIN_DIR OUT_DIR
set -uo pipefail
B=$1; OUT=$2; mkdir -p "$OUT"
export MOELORA_FIXTURES=$PWD/tests/fixtures
timeout 330 "$B/moelora_gpu_tests" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"
grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$OUT/gpu_tests.log" | head -20
F='CudaMoeLoraEpilogue.SanitizerSubset:CudaMoeLoraEpilogue.StreamShrinkMatchesHookShrink'
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool "$B/moelora_gpu_tests" --gtest_filter="$F" 2>&1 | tail -2
done
timeout 200 "$B/moelora" bench decode --batches 1,16,64,128 --lora none,r16x1,r16x4 --steps 10 \
  --json "$OUT/bench_decode.json" > "$OUT/bench_decode.log" 2>&1
echo "bench decode rc=$?"
grep -E "batch|random" "$OUT/bench_decode.log"
