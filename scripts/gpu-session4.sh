#!/usr/bin/env bash
# Session 4's device call: every GPU test, sanitizers over a graph-replayed decode and the
# dense ops, and bench decode on both paths (qwen3-30b-a3b fp8 and deepseek-v2-lite).
# Usage (device): scripts/gpu-session4.sh BIN_DIR OUT_DIR
set -uo pipefail
B=$1; OUT=$2; mkdir -p "$OUT"
export MOELORA_FIXTURES=$PWD/tests/fixtures
timeout 400 "$B/moelora_gpu_tests" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"
grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$OUT/gpu_tests.log" | head -20
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool "$B/moelora_gpu_tests" \
    --gtest_filter='Formats/DecodeGraphTest.PaddedBucketMatchesEager/bf16:Sizes/DenseOpsGpu.*/3:DenseLoraGpu*/1' \
    > "$OUT/san_$tool.log" 2>&1
  echo "$tool rc=$?"; tail -1 "$OUT/san_$tool.log"
done
timeout 300 "$B/moelora" bench decode --batches 1,16,64,128 --lora none,r16x1,r16x4 --path hooks,fast \
  --steps 10 --json "$OUT/bench_decode_qwen3.json" > "$OUT/bench_decode_qwen3.log" 2>&1
echo "bench decode qwen3 rc=$?"
grep -E "batch" "$OUT/bench_decode_qwen3.log" | grep -v download
