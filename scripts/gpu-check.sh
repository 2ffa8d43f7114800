#!/usr/bin/env bash
# Everything the GPU machine should run after a kernel change, in one call:
#   scripts/gpu-check.sh [BUILD_DIR] [tests|sanitize|bench|all]
# GPU tests (ctest label gpu = the moelora_gpu_tests binary), compute-sanitizer memcheck on
# them, and `moelora bench moe` for every LoRA setting. Full logs and JSON go to $OUT (or
# ./gpu-check-out); a short summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}
WHAT=${2:-all}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export MOELORA_FIXTURES=$PWD/tests/fixtures
summary=()

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
  >"$OUT/gpu.txt" 2>&1 || true
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

if [[ $WHAT == all || $WHAT == tests ]]; then
  "$B/bin/moelora_gpu_tests" >"$OUT/gpu_tests.log" 2>&1
  rc=$?
  summary+=("gpu tests: rc=$rc $(grep -E '^\[  (PASSED|FAILED)  \]' "$OUT/gpu_tests.log" | tr '\n' ' ')")
  grep -E '^\[  FAILED  \]' "$OUT/gpu_tests.log" | head -20
fi
if [[ $WHAT == all || $WHAT == sanitize ]]; then
  compute-sanitizer --tool memcheck --error-exitcode 9 "$B/bin/moelora_gpu_tests" \
    --gtest_filter="${SANITIZE_FILTER:-*}" >"$OUT/memcheck.log" 2>&1
  summary+=("memcheck: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1)")
fi
if [[ $WHAT == all || $WHAT == bench ]]; then
  for shape in ${BENCH_SHAPES:-qwen3-30b-a3b}; do
    "$B/bin/moelora" bench moe --shape "$shape" --json "$OUT/bench_moe_${shape}_${commit}.json" \
      >"$OUT/bench_${shape}.log" 2>&1
    summary+=("bench $shape: rc=$?")
  done
fi
echo
for s in "${summary[@]}"; do echo "$s"; done
for shape in ${BENCH_SHAPES:-qwen3-30b-a3b}; do
  [[ -f $OUT/bench_${shape}.log ]] && sed -n '/^shape/,$p' "$OUT/bench_${shape}.log"
done
