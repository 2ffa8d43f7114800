// int4 / int8 expert GEMMs on CUDA (cuda_wna16): the launcher (tile instantiation, grid).
// Device code in sm90_moe_gemm_wna16.cuh, the Tensor ops in moe_gemm_wna16_op.cpp.
#include <cstdint>

#include "kernels/cuda/moe_gemm_wna16_launch.h"
#include "kernels/cuda/expert_gemm_launch.cuh"
#include "kernels/cuda/sm90_moe_gemm_wna16.cuh"

namespace moelora::cuda {
namespace {

// Channels per stage: ~128 bytes of codes per weight row for narrow token tiles (the weight
// stream dominates), fewer for wide ones so the activation tiles leave room for 2+ CTAs/SM.
template <int kBits, int kNt>
constexpr int stage_k() {
  if constexpr (kBits == 4) return kNt <= 2 ? 256 : kNt == 4 ? 128 : 64;
  return kNt <= 2 ? 128 : 64;
}

template <int kBits, int kNt, int kRows, int kKt, int kStages, int kSplit, int kMt,
          bool kRaw = false>
cudaError_t launch_tile(const MoeGemmWna16Args& p, int max_blocks, cudaStream_t stream) {
  using Tile = sm90::Wna16Tile<kBits, kNt, kMt, kRows, kKt, kStages, kSplit>;
  constexpr auto kernel =
      &sm90::moe_gemm_wna16_kernel<kBits, kNt, kMt, kRows, kKt, kStages, kSplit, kRaw>;
  return detail::launch_expert_gemm<kernel, kRows>(p, max_blocks, Tile::kThreads, Tile::kSmemBytes,
                                                 stream);
}

// Up to 16 tokens per block: each stage's 4 weight tiles split over 4 warps (a warp's
// dequant -> MMA chain is serial: decode needs many short ones), several 16-row MMA tiles per
// warp (one token fragment feeds them all, and their MMA chains are independent), 4 stages.
// Measured on H100 (bench/NOTES.md, "int4/int8 (cuda_wna16)"): 32 rows x 2 MMA tiles is best
// for a handful of slots, 64 rows x 4 MMA tiles from 32 slots on; 6 or 10 stages, 512-thread
// CTAs and 512-channel stages over 8 warps were no better.
//
// Second pass (bench/NOTES.md, "Second pass"; H100, one session, all tested): int4 runs 3
// stages with raw codes (kRaw, neutral alone): 48 KB of shared memory lets 4 64-row CTAs
// share an SM instead of 3 (the 32-row ones stay at 5, by registers), 1.1x faster at batch
// 4-128 than 4 stages; int8 stays at 4 stages (3 measured 1-2 % slower); 128 rows instead of
// 64 measured slower for both at these sizes.
template <int kBits, int kNt>
cudaError_t launch_narrow(const MoeGemmWna16Args& p, int max_blocks, cudaStream_t stream) {
  constexpr int kK = stage_k<kBits, kNt>();
  constexpr int kStages = kBits == 4 ? 3 : 4;
  constexpr bool kRaw = kBits == 4;
  if (p.num_slots >= 32)
    return launch_tile<kBits, kNt, 64, kK, kStages, 4, 4, kRaw>(p, max_blocks, stream);
  return launch_tile<kBits, kNt, 32, kK, kStages, 4, 2, kRaw>(p, max_blocks, stream);
}

template <int kBits>
cudaError_t launch_bits(const MoeGemmWna16Args& p, int max_blocks, int rows, cudaStream_t stream) {
  const int nt = (p.block_m + 7) / 8;
  if (nt > 4) {
    if (rows != 128) return cudaErrorInvalidValue;
    // Two 16-row MMA tiles per warp at 64 tokens (each B fragment feeds two MMAs); one at
    // 128, where two would need 256 accumulator registers (acc + group part) and spill.
    return nt <= 8
               ? launch_tile<kBits, 8, 128, stage_k<kBits, 8>(), 4, 1, 2>(p, max_blocks, stream)
               : launch_tile<kBits, 16, 64, stage_k<kBits, 16>(), 4, 1, 1>(p, max_blocks, stream);
  }
  if (nt <= 1) return launch_narrow<kBits, 1>(p, max_blocks, stream);
  if (nt <= 2) return launch_narrow<kBits, 2>(p, max_blocks, stream);
  // 32 tokens: 128 rows as 2 MMA tiles per warp over 4 row warps, K split over 2 warps
  // (batch 256 on qwen3-30b-a3b; measured 1.02-1.08x faster than 64 rows: the token tile is
  // read once per 128 weight rows).
  (void)rows;
  return launch_tile<kBits, 4, 128, stage_k<kBits, 4>(), 4, 2, 2>(p, max_blocks, stream);
}

}  // namespace

cudaError_t launch_moe_gemm_wna16(const MoeGemmWna16Args& p, int max_blocks, int rows,
                                  cudaStream_t stream) {
  if (max_blocks <= 0) return cudaSuccess;
  if (p.block_m < 1 || p.block_m > 128 || (p.row_tiles_fastest && max_blocks > 65535) ||
      (p.act_out && (p.n % 32 != 0 || p.slot_scale)))
    return cudaErrorInvalidValue;
  if (p.bits == 4) return launch_bits<4>(p, max_blocks, rows, stream);
  if (p.bits == 8) return launch_bits<8>(p, max_blocks, rows, stream);
  return cudaErrorInvalidValue;
}

}  // namespace moelora::cuda
