#!/usr/bin/env bash
# Session 8's last device call. Usage (device): scripts/gpu-session8.sh BIN_DIR OUT_DIR
#   The YaRN transformers goldens (scripts/golden, on the CPU, beside the GPU work), every GPU
#   test, memcheck on the direct kernels, bench decode hooks / fast (batches 1,4,16,64,128).
#   Results in $OUT/s8.tgz.
set -uo pipefail
B=$1; OUT=$2; R=$OUT/s8; mkdir -p "$R/golden"
export MOELORA_FIXTURES=$PWD/tests/fixtures
( timeout 400 python3 scripts/golden/make_deepseek_model_golden.py "$R/golden" \
    deepseek_v2_yarn_tiny deepseek_v3_yarn_tiny > "$R/golden_deepseek.log" 2>&1
  echo "deepseek goldens rc=$?" >> "$R/golden_deepseek.log"
  timeout 300 python3 scripts/golden/make_qwen3_moe_model_golden.py "$R/golden/qwen3_moe_yarn_tiny" \
    --yarn > "$R/golden_qwen3.log" 2>&1
  echo "qwen3 golden rc=$?" >> "$R/golden_qwen3.log" ) &
GOLD=$!
timeout 400 "$B/moelora_gpu_tests" > "$R/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"
grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$R/gpu_tests.log" | head -20
timeout 150 compute-sanitizer --tool memcheck "$B/moelora_gpu_tests" \
  --gtest_filter='*DecodeGraphDirect*:CudaMoeLayer.DirectLoraPath*' > "$R/san_memcheck.log" 2>&1
echo "memcheck rc=$?"; grep -E "ERROR SUMMARY" "$R/san_memcheck.log" | tail -1
for path in hooks fast; do
  timeout 150 "$B/moelora" bench decode --batches 1,4,16,64,128 --lora none,r16x1,r16x4 \
    --path $path --steps 10 --json "$R/decode_$path.json" > "$R/decode_$path.log" 2>&1
  echo "== decode $path rc=$?"; grep -E "batch +[0-9]+ +$path" "$R/decode_$path.log"
done
wait $GOLD
tail -n 2 "$R/golden_deepseek.log" "$R/golden_qwen3.log"
tar -czf "$OUT/s8.tgz" -C "$OUT" s8
