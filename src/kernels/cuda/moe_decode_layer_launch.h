// Launcher of the one-kernel bf16 MoE layer for decode batches (layer 2 of 3): raw pointers in,
// cudaError_t out; device code in moe_decode_layer.cu. Included by nvcc and host compilers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/cuda/moe_ops_launch.h"

namespace moelora::cuda::detail {

// Tokens are the n8 side of the MMA, so one column tile holds the whole batch.
inline constexpr int kDecodeMaxTokens = 8;
// Token-slots (M * k) the kernel's routing tables hold, and routed experts a launch can touch.
inline constexpr int kDecodeMaxSlots = 64;
// Experts the in-kernel router handles: one route team (ceil32(E) threads) must fit the CTA.
inline constexpr int kDecodeThreads = 256;
inline constexpr int kDecodeMaxExperts = kDecodeThreads;
// Work positions: the distinct routed experts plus the shared expert.
inline constexpr int kDecodeMaxPositions = kDecodeMaxSlots + 1;
// Counters of one launch (i32): one 128-byte line per position (B units poll them), then one
// per 16-row group of the output, then the CTA exit count. All zero between launches: the last
// CTA to leave resets them, so graph replays need no host reset.
inline constexpr int kDecodeCounterStride = 32;
inline constexpr int kDecodeRowGroup = 16;
inline int64_t decode_counter_count(int64_t hidden) {
  return int64_t(kDecodeMaxPositions) * kDecodeCounterStride +
         (hidden + kDecodeRowGroup - 1) / kDecodeRowGroup + 1;
}
// Ring depth per warp (K stages of 64): 6 stages, 2 CTAs of 8 warps per SM. (4 stages hit an
// illegal-instruction fault on the ring's cp.async in the first H100 run, not diagnosed; 8 was
// never measured; both were dropped.)
inline constexpr int kDecodeStages = 6;

struct DecodeLayerArgs {
  const void* x;              // bf16 [m, hidden]
  const float* logits;        // f32 [m, E]
  const float* bias;          // f32 [E] correction bias, or null
  RouteParams route;
  const void* w13;            // bf16 [E, 2 * inter, hidden]
  const void* w2;             // bf16 [E, hidden, inter]
  const void* shared_w13;     // bf16 [1, 2 * shared_inter, hidden], or null (no shared expert)
  const void* shared_w2;      // bf16 [1, hidden, shared_inter]
  const float* shared_gate;   // f32 [m] shared-expert gate logits, or null (gate 1)
  int32_t* topk_ids;          // i32 [m, k], written by CTA 0 (what moe_route writes)
  float* topk_weights;        // f32 [m, k]
  void* act;                  // bf16 [m * k, inter]: workspace, slot rows (as moe_gemm1_activation)
  float* part;                // f32 [m * k, hidden]: workspace, slot rows (as moe_gemm2's o)
  void* shared_act;           // bf16 [m, shared_inter] workspace
  float* shared_part;         // f32 [m, hidden] workspace
  int32_t* counters;          // i32 [decode_counter_count(hidden)], zero before the launch
  void* y;                    // bf16 [m, hidden]
  int m;
  int hidden;
  int inter;
  int shared_inter;  // 0: no shared expert
};

// Launches over every co-resident CTA (the kernel's cross-CTA waits need them all resident).
// deep_prefetch: token fragments two stages ahead and relaxed polling (else one stage ahead,
// acquire polling: the first version, kept for A/B).
cudaError_t launch_moe_decode_layer(const DecodeLayerArgs& args, bool deep_prefetch,
                                    cudaStream_t stream);

}  // namespace moelora::cuda::detail
