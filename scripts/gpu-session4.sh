#!/usr/bin/env bash
# Session 4's device calls. Usage (device): scripts/gpu-session4.sh BIN_DIR OUT_DIR tests|bench
#   tests: every GPU test, memcheck over graph-replayed decode steps (fp8 experts: the overlap
#          MoE LoRA), bench moe hooks vs overlap for the formats not measured yet.
#   bench: bench decode on both paths, qwen3-30b-a3b fp8 and deepseek-v2-lite.
set -uo pipefail
B=$1; OUT=$2; MODE=$3; mkdir -p "$OUT"
export MOELORA_FIXTURES=$PWD/tests/fixtures
if [ "$MODE" = tests ]; then
  timeout 330 "$B/moelora_gpu_tests" > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$OUT/gpu_tests.log" | head -20
  timeout 120 compute-sanitizer --tool memcheck "$B/moelora_gpu_tests" \
    --gtest_filter='Formats/DecodeGraphTest.PaddedBucketMatchesEager/fp8_block' > "$OUT/san_memcheck.log" 2>&1
  echo "memcheck rc=$?"; tail -1 "$OUT/san_memcheck.log"
  PATHS="hooks overlap" bash scripts/bench-moe-paths.sh "$B/moelora" "$OUT" bf16 int8 nvfp4
else
  timeout 240 "$B/moelora" bench decode --batches 1,16,64,128 --lora none,r16x1,r16x4 --path hooks,fast \
    --steps 10 --json "$OUT/bench_decode_qwen3.json" > "$OUT/bench_decode_qwen3.log" 2>&1
  echo "bench decode qwen3 rc=$?"
  grep -E "batch" "$OUT/bench_decode_qwen3.log" | grep -v download
  timeout 200 "$B/moelora" bench decode --shape deepseek-v2-lite --batches 1,16,64,128 --lora none,r16x1 \
    --path hooks,fast --steps 10 --json "$OUT/bench_decode_dsv2lite.json" > "$OUT/bench_decode_dsv2lite.log" 2>&1
  echo "bench decode deepseek rc=$?"
  grep -E "batch" "$OUT/bench_decode_dsv2lite.log" | grep -v download
fi
