#!/usr/bin/env bash
# Session 5's device calls. Usage (device): scripts/gpu-session5.sh BIN_DIR OUT_DIR MODE
#   inline: the inline MoE LoRA's GPU tests (+ the layer / decode-graph suites it touches),
#           memcheck and racecheck on it, bench moe fp8 overlap vs inline, bench decode fp8
#           fast path with the overlap vs the inline MoE LoRA.
set -uo pipefail
B=$1; OUT=$2; MODE=$3; mkdir -p "$OUT"
export MOELORA_FIXTURES=$PWD/tests/fixtures
if [ "$MODE" = inline ]; then
  timeout 240 "$B/moelora_gpu_tests" \
    --gtest_filter='CudaFp8Block.*:DecodeGraphInline.*:CudaMoeLayer.*:*DecodeGraphTest*fp8*:CudaWna16*Layer*' \
    > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  grep -E "^\[  FAILED|^\[  PASSED|tests ran|Failure|error" "$OUT/gpu_tests.log" | head -20
  timeout 150 compute-sanitizer --tool memcheck "$B/moelora_gpu_tests" \
    --gtest_filter='CudaFp8Block.InlineLoraRejectsBadSeams:CudaFp8Block.InlineLoraInGraphMatchesReference' \
    > "$OUT/san_memcheck.log" 2>&1
  echo "memcheck rc=$?"; tail -1 "$OUT/san_memcheck.log"
  PATHS="${INLINE_PATHS:-overlap inline1 inline2}" LORAS=none,r16x1,r16x4,r64x1 \
    bash scripts/bench-moe-paths.sh "$B/moelora" "$OUT" fp8
  for v in overlap inline; do
    timeout 150 "$B/moelora" bench decode --batches 1,16,64,128 --lora none,r16x1 --path fast \
      --moe-lora $v --steps 10 --json "$OUT/bench_decode_fp8_$v.json" > "$OUT/bench_decode_fp8_$v.log" 2>&1
    echo "bench decode fp8 $v rc=$?"
    grep -E "batch +[0-9]+ +fast" "$OUT/bench_decode_fp8_$v.log" | head -12
  done
  timeout 100 compute-sanitizer --tool racecheck "$B/moelora_gpu_tests" \
    --gtest_filter='CudaFp8Block.InlineLoraRejectsBadSeams' > "$OUT/san_racecheck.log" 2>&1
  echo "racecheck rc=$?"; tail -1 "$OUT/san_racecheck.log"
fi
if [ "$MODE" = split ]; then
  # Where the whole-model LoRA overhead goes: adapters on the attention projections only, on the
  # routed experts only, and on both (fast path, fp8 experts).
  for spec in ${SPLIT_SPECS:-all:overlap attention:overlap experts:overlap experts:inline}; do
    t=${spec%%:*}; v=${spec##*:}
    timeout 150 "$B/moelora" bench decode --batches ${SPLIT_BATCHES:-16,64,128} --lora none,r16x1 --path fast \
      --moe-lora $v --lora-targets $t --steps 10 --json "$OUT/decode_${t}_$v.json" > "$OUT/decode_${t}_$v.log" 2>&1
    echo "== targets $t, MoE LoRA $v rc=$?"
    grep -E "batch +[0-9]+ +fast +lora r" "$OUT/decode_${t}_$v.log"
  done
fi
if [ "$MODE" = fold ]; then
  # The dense LoRA expands folded into the q/k/v split and the residual add (fast path).
  timeout 300 "$B/moelora_gpu_tests" \
    --gtest_filter='*DenseLora*:*DecodeGraph*:ModelGpuGolden.*:Fp8CheckpointModelGpu.*:Rows/ModelOpsGpu.*:GoldenMoeBlockGpu.*' \
    > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$OUT/gpu_tests.log" | head -20
  timeout 100 compute-sanitizer --tool memcheck "$B/moelora_gpu_tests" \
    --gtest_filter='Tokens/DenseLoraGpu.FoldedExpands*:Formats/DecodeGraphTest.PaddedBucketMatchesEager/bf16' \
    > "$OUT/san_memcheck.log" 2>&1
  echo "memcheck rc=$?"; tail -1 "$OUT/san_memcheck.log"
  timeout 240 "$B/moelora" bench decode --batches 1,16,64,128 --lora none,r16x1,r16x4 --path hooks,fast \
    --steps 10 --json "$OUT/bench_decode_qwen3.json" > "$OUT/bench_decode_qwen3.log" 2>&1
  echo "bench decode qwen3 rc=$?"
  grep -E "batch +[0-9]+ +(fast|hooks) +lora" "$OUT/bench_decode_qwen3.log"
fi
if [ "$MODE" = final ]; then
  # Every GPU test, memcheck on the new kernels, bench moe fp8 (overlap vs inline), bench decode
  # split by LoRA targets; everything under $OUT/final.tgz (the device returns few files).
  R=$OUT/final; mkdir -p "$R"
  timeout 330 "$B/moelora_gpu_tests" > "$R/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"
  grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$R/gpu_tests.log" | head -20
  timeout 120 compute-sanitizer --tool memcheck "$B/moelora_gpu_tests" \
    --gtest_filter='Tokens/DenseLoraGpu.FoldedExpands*:CudaFp8Block.InlineLora*' > "$R/san_memcheck.log" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$R/san_memcheck.log" | tail -3
  PATHS="overlap inline1k0 inline2k0" bash scripts/bench-moe-paths.sh "$B/moelora" "$R" fp8
  for spec in all:best attention:best experts:best experts:inline all:inline; do
    t=${spec%%:*}; v=${spec##*:}
    timeout 150 "$B/moelora" bench decode --batches 16,64,128 --lora none,r16x1 --path fast \
      --moe-lora $v --lora-targets $t --steps 10 --json "$R/decode_${t}_$v.json" > "$R/decode_${t}_$v.log" 2>&1
    echo "== decode targets $t, MoE LoRA $v rc=$?"
    grep -E "batch +[0-9]+ +fast +lora r" "$R/decode_${t}_$v.log"
  done
  tar -czf "$OUT/final.tgz" -C "$OUT" final
fi
