// Expert GEMMs on CUDA: the launcher (tile instantiation, grid). Device code is in
// sm90_moe_gemm.cuh, the Tensor ops in moe_gemm_op.cpp (fmt's compile-time format checks
// need a host compiler, so nothing here throws).
#include <cstdint>

#include "kernels/cuda/moe_gemm_launch.h"
#include "kernels/cuda/expert_gemm_launch.cuh"
#include "kernels/cuda/sm90_moe_gemm.cuh"

namespace moelora::cuda {
namespace {

constexpr int kStages = 4;

template <int kNt, int kRows>
cudaError_t launch_tile(const MoeGemmArgs& p, int max_blocks, cudaStream_t stream) {
  // Wide token tiles: two 16-row MMA tiles per warp (halves the shared-memory reads of the
  // token fragments) and a shorter K step so the ring still leaves room for 2+ CTAs per SM.
  constexpr int kMt = kNt >= 8 ? 2 : 1;
  constexpr int kKt = kNt >= 4 ? 64 : 128;
  using Tile = sm90::MoeGemmTile<kNt, kMt, kRows, kKt, kStages>;
  constexpr auto kernel = &sm90::moe_gemm_kernel<kNt, kMt, kRows, kKt, kStages>;
  return detail::launch_expert_gemm<kernel, kRows>(p, max_blocks, Tile::kThreads, Tile::kSmemBytes,
                                                 stream);
}

template <int kNt>
cudaError_t launch_rows(const sm90::MoeGemmParams& p, int max_blocks, int rows,
                        cudaStream_t stream) {
  switch (rows) {
    case 32: return launch_tile<kNt, 32>(p, max_blocks, stream);
    case 64: return launch_tile<kNt, 64>(p, max_blocks, stream);
    case 128: return launch_tile<kNt, 128>(p, max_blocks, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// Launches the instantiation whose token tile covers args.block_m.
cudaError_t launch_moe_gemm(const MoeGemmArgs& p, int max_blocks, int rows,
                            cudaStream_t stream) {
  if (max_blocks <= 0) return cudaSuccess;
  if ((p.row_tiles_fastest && max_blocks > 65535) || (p.act_out && (p.n % 2 != 0 || p.slot_scale)))
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
