#!/usr/bin/env bash
# Session 6's device calls. Usage (device): scripts/gpu-session6.sh BIN_DIR OUT_DIR MODE
#   prio: the side streams at high priority, kept inside graphs (per-node priorities): the
#         graph / LoRA GPU tests, bench moe fp8 (hooks, overlap; normal vs high), bench decode
#         fp8 fast path (normal vs high, alternating). Results in $OUT/prio.tgz.
#   shrink: the MoE LoRA shrink's reordered reads: LoRA GPU tests, memcheck, bench moe bf16 and
#           fp8 with the binary before (OLD_BIN) and after.
#   linear | prologue | attention: a dense-path change (stacked f32 linears, fused attention
#           prologue, tensor-core decode attention): the dense / model / decode GPU tests,
#           memcheck (SAN_FILTER), bench decode before (OLD_BIN) / after, alternating.
#   final: every GPU test, memcheck (SAN_FILTER, optional), bench decode hooks / fast at
#          context 512 and the fast path at 2048.
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
if [ "$MODE" = shrink ]; then
  # The MoE LoRA shrink with its plan / rank / slot reads issued together: LoRA GPU tests,
  # memcheck on the op test, bench moe old vs new binary (OLD_BIN) for bf16 and fp8.
  R=$OUT/shrink; mkdir -p "$R"
  timeout 240 "$B/moelora_gpu_tests" \
    --gtest_filter='*MoeLora*:CudaMoeLayer.*:CudaFp8Block.*:*DecodeGraph*:*Wna16*:*Nvfp4*' \
    > "$R/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$R/gpu_tests.log" | head -20
  timeout 120 compute-sanitizer --tool memcheck "$B/moelora_gpu_tests" \
    --gtest_filter='CudaMoeLora.OpsMatchReference:CudaMoeLora.HooksInGraphMatchReference' > "$R/san_memcheck.log" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY" "$R/san_memcheck.log" | tail -1
  for dt in ${SHRINK_DTYPES:-bf16 fp8}; do
    for bin in old new; do
      b=$B/moelora; [ $bin = old ] && b=$OLD_BIN/moelora
      timeout 200 "$b" bench moe --dtype $dt --lora none,r16x1,r16x4,r64x1 \
        --json "$R/moe_${dt}_$bin.json" > "$R/moe_${dt}_$bin.log" 2>&1
      echo "== $dt $bin rc=$?"
    done
    python3 - "$R/moe_${dt}_old.json" "$R/moe_${dt}_new.json" <<'PY'
import json, sys
o, n = (json.load(open(f))["results"] for f in sys.argv[1:])
key = lambda r: (r["batch"], r["lora"])
old = {key(r): r["us_per_layer"] for r in o}
print(f"{'batch':>5} {'lora':>6} {'old':>8} {'new':>8}")
for r in n:
    print(f"{r['batch']:5d} {r['lora']:>6} {old.get(key(r), float('nan')):8.1f} {r['us_per_layer']:8.1f}")
PY
  done
  tar -czf "$OUT/shrink.tgz" -C "$OUT" shrink
fi
if [ "$MODE" = linear ] || [ "$MODE" = prologue ] || [ "$MODE" = attention ]; then
  # linear: the stacked hi/lo f32 linears; prologue: the fused attention prologue (per-head norms, rope, cache write in one kernel);
  # attention: the GQA decode attention with several positions in flight per warp. The ops'
  # tests and every model / decode test, memcheck (SAN_FILTER), bench decode before (OLD_BIN)
  # and after, alternating.
  R=$OUT/$MODE; mkdir -p "$R"
  timeout 300 "$B/moelora_gpu_tests" \
    --gtest_filter='*DenseOps*:*DenseLora*:*ModelGpu*:*DecodeGraph*:*Golden*:*Fp8Checkpoint*:*Deepseek*:*ModelOps*:*Engine*' \
    > "$R/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$R/gpu_tests.log" | head -20
  timeout 120 compute-sanitizer --tool memcheck "$B/moelora_gpu_tests" \
    --gtest_filter="${SAN_FILTER:-DenseOpsGpu.AttentionPrologueMatchesTheOps}" > "$R/san_memcheck.log" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY" "$R/san_memcheck.log" | tail -1
  for rep in 1 2; do
    for bin in old new; do
      b=$B/moelora; [ $bin = old ] && b=$OLD_BIN/moelora
      timeout 150 "$b" bench decode --batches 1,16,64,128 --lora none,r16x1 --path fast \
        --steps 10 --json "$R/decode_${bin}_$rep.json" > "$R/decode_${bin}_$rep.log" 2>&1
      echo "== decode $bin (run $rep) rc=$?"
      grep -E "batch +[0-9]+ +fast +lora (r16x1|none +[0-9])" "$R/decode_${bin}_$rep.log"
    done
  done
  tar -czf "$OUT/$MODE.tgz" -C "$OUT" "$MODE"
fi
if [ "$MODE" = final ]; then
  # Every GPU test, then bench decode (hooks and fast paths) for BENCHMARKS.md; all results in
  # $OUT/final.tgz (the device returns few files).
  R=$OUT/final; mkdir -p "$R"
  timeout 360 "$B/moelora_gpu_tests" > "$R/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$R/gpu_tests.log" | head -20
  if [ -n "${SAN_FILTER:-}" ]; then
    timeout 150 compute-sanitizer --tool memcheck "$B/moelora_gpu_tests" --gtest_filter="$SAN_FILTER" \
      > "$R/san_memcheck.log" 2>&1
    echo "memcheck rc=$?"; grep -E "ERROR SUMMARY" "$R/san_memcheck.log" | tail -1
  fi
  timeout 200 "$B/moelora" bench decode --batches 1,16,64,128 --lora none,r16x1,r16x4 \
    --path hooks,fast --steps 10 --json "$R/decode_paths.json" > "$R/decode_paths.log" 2>&1
  echo "bench decode rc=$?"
  grep -E "batch +[0-9]+ +(fast|hooks) +lora" "$R/decode_paths.log"
  timeout 150 "$B/moelora" bench decode --batches 1,16,64,128 --lora none,r16x1 --path fast \
    --context 2048 --steps 5 --json "$R/decode_ctx2048.json" > "$R/decode_ctx2048.log" 2>&1
  echo "bench decode context 2048 rc=$?"
  grep -E "batch +[0-9]+ +fast +lora" "$R/decode_ctx2048.log"
  tar -czf "$OUT/final.tgz" -C "$OUT" final
fi
