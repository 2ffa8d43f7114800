// NVFP4 expert GEMMs on CUDA: the launcher (tile instantiation, grid). Device code is in
// sm90_moe_gemm_nvfp4.cuh, the Tensor ops in moe_gemm_nvfp4_op.cpp.
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/moe_gemm_nvfp4_launch.h"
#include "kernels/cuda/expert_gemm_launch.cuh"
#include "kernels/cuda/sm90_moe_gemm_nvfp4.cuh"

namespace moelora::cuda {
namespace {

constexpr int kStages = 4;

template <int kNt, int kRows, int kSplit>
cudaError_t launch_tile(const MoeGemmNvfp4Args& p, int max_blocks, cudaStream_t stream) {
  // A stage holds 256 K of codes for narrow token tiles (more bytes in flight per CTA: a
  // row of codes is a quarter of a bf16 row), 128 for wide ones (the activation tile grows).
  constexpr int kKt = kNt <= 2 ? 256 : 128;
  using Tile = sm90::MoeGemmNvfp4Tile<kNt, kRows, kKt, kStages, kSplit>;
  constexpr auto kernel = &sm90::moe_gemm_nvfp4_kernel<kNt, kRows, kKt, kStages, kSplit>;
  return detail::launch_expert_gemm<kernel, kRows>(p, max_blocks, Tile::kThreads, Tile::kSmemBytes,
                                                 stream);
}

template <int kNt>
cudaError_t launch_rows(const MoeGemmNvfp4Args& p, int max_blocks, int rows,
                        cudaStream_t stream) {
  // Split-K warps: 4 for narrow token tiles (few MMAs per dequantized fragment, so the
  // dequantization's latency dominates), 2 at 32 tokens, none past; at most 512 threads.
  constexpr int kSplitWant = kNt <= 2 ? 4 : kNt == 4 ? 2 : 1;
  auto pick = [&](auto rows_c) {
    constexpr int kR = decltype(rows_c)::value;
    constexpr int kMax = 512 / (kR / 16 * 32);
    constexpr int kS = kSplitWant < kMax ? kSplitWant : kMax;
    return p.split_k ? launch_tile<kNt, kR, kS>(p, max_blocks, stream)
                     : launch_tile<kNt, kR, 1>(p, max_blocks, stream);
  };
  switch (rows) {
    case 32: return pick(std::integral_constant<int, 32>{});
    case 64: return pick(std::integral_constant<int, 64>{});
    case 128: return pick(std::integral_constant<int, 128>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_moe_gemm_nvfp4(const MoeGemmNvfp4Args& p, int max_blocks, int rows,
                                  cudaStream_t stream) {
  if (max_blocks <= 0) return cudaSuccess;
  if ((p.row_tiles_fastest && max_blocks > 65535) ||
      (p.act_out && ((p.n / 2) % 16 != 0 || p.n % 2 != 0 || p.slot_scale)))
    return cudaErrorInvalidValue;
  const int nt = (p.block_m + 7) / 8;
  if (nt <= 1) return launch_rows<1>(p, max_blocks, rows, stream);
  if (nt <= 2) return launch_rows<2>(p, max_blocks, rows, stream);
  if (nt <= 4) return launch_rows<4>(p, max_blocks, rows, stream);
  if (nt <= 8) return launch_rows<8>(p, max_blocks, rows, stream);
  if (nt <= 16) return launch_rows<16>(p, max_blocks, rows, stream);
  return cudaErrorInvalidValue;
}

}  // namespace moelora::cuda
