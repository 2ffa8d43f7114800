#!/usr/bin/env bash
# One device call: every GPU test, then the MoE benchmark for each weight format (LoRA none and
# r16x1, hook path). Usage (device): scripts/gpu-final.sh BIN_DIR OUT_DIR
set -uo pipefail
B=${1:-build/bin}
OUT=${2:-/tmp/out}
mkdir -p "$OUT"
export MOELORA_FIXTURES=$PWD/tests/fixtures
timeout 420 "$B/moelora_gpu_tests" 2>&1 > "$OUT/gpu_tests.log"
echo "gpu tests rc=$?"
grep -E "^\[  (FAILED|PASSED) |^\[  FAILED" "$OUT/gpu_tests.log" | head -20
timeout 240 compute-sanitizer --tool memcheck "$B/moelora_gpu_tests" \
  --gtest_filter="${MEMCHECK_FILTER:-CudaFp8Block.LayerMatchesReferenceBackend:CudaWna16Layer.MatchesReferenceRunner}" 2>&1 |
  tail -2
for dt in int4 int8 fp8 nvfp4; do
  timeout 150 "$B/moelora" bench moe --dtype "$dt" --lora none,r16x1 --json "$OUT/bench_$dt.json" \
    > "$OUT/bench_$dt.log" 2>&1
  echo "bench $dt rc=$?"
done
for dt in int4 int8 fp8 nvfp4; do tail -13 "$OUT/bench_$dt.log" | grep -v "^wrote"; done
