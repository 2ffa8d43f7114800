#!/usr/bin/env bash
# Session 6's device calls. Usage (device): scripts/gpu-session6.sh BIN_DIR OUT_DIR MODE
#   prio: the side streams at high priority, kept inside graphs (per-node priorities): the
#         graph / LoRA GPU tests, bench moe fp8 (hooks, overlap; normal vs high), bench decode
#         fp8 fast path (normal vs high, alternating). Results in $OUT/prio.tgz.
set -uo pipefail
B=$1; OUT=$2; MODE=$3; mkdir -p "$OUT"
export MOELORA_FIXTURES=$PWD/tests/fixtures
if [ "$MODE" = prio ]; then
  R=$OUT/prio; mkdir -p "$R"
  timeout 200 "$B/moelora_gpu_tests" \
    --gtest_filter='CudaCore.*:*DecodeGraph*:CudaFp8Block.*:*MoeLora*:CudaMoeLayer.*' \
    > "$R/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$R/gpu_tests.log" | head -20
  PATHS="hooks hookshi overlap overlaphi" LORAS=none,r16x1 BATCHES=1,16,64,128,256 \
    bash scripts/bench-moe-paths.sh "$B/moelora" "$R" fp8
  for rep in 1 2; do
    for pr in normal high; do
      timeout 150 "$B/moelora" bench decode --batches 16,64,128 --lora none,r16x1 --path fast \
        --side-priority $pr --steps 10 --json "$R/decode_${pr}_$rep.json" > "$R/decode_${pr}_$rep.log" 2>&1
      echo "== decode side priority $pr (run $rep) rc=$?"
      grep -E "batch +[0-9]+ +fast +lora r" "$R/decode_${pr}_$rep.log"
    done
  done
  tar -czf "$OUT/prio.tgz" -C "$OUT" prio
fi
