// Expert GEMMs on CUDA: the launcher (tile instantiation, grid). Device code is in
// sm90_moe_gemm.cuh, the Tensor ops in moe_gemm_op.cpp (fmt's compile-time format checks
// need a host compiler, so nothing here throws).
#include <atomic>
#include <cstdint>

#include "kernels/cuda/moe_gemm_launch.h"
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
  auto* kernel = &sm90::moe_gemm_kernel<kNt, kMt, kRows, kKt, kStages>;
  // Opt in to more than 48 KB of shared memory once per device (not on every call, so that
  // graph capture sees only the launch).
  static std::atomic<uint64_t> opted_in{0};
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (!(opted_in.load(std::memory_order_acquire) & bit)) {
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             Tile::kSmemBytes);
        e != cudaSuccess)
      return e;
    opted_in.fetch_or(bit, std::memory_order_acq_rel);
  }
  // Programmatic dependent launch: the kernel waits (griddepcontrol.wait) before reading
  // anything, so it may be scheduled while its predecessor drains.
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  // x: row tiles (of the intermediate columns when the activation is fused: kRows / 2 gate
  // plus kRows / 2 up rows each); y: blocks, so the worst case's empty blocks come last.
  const int row_tiles =
      p.act_out ? (p.n / 2 + kRows / 2 - 1) / (kRows / 2) : (p.n + kRows - 1) / kRows;
  config.gridDim = p.row_tiles_fastest ? dim3(row_tiles, max_blocks) : dim3(max_blocks, row_tiles);
  config.blockDim = dim3(Tile::kThreads);
  config.dynamicSmemBytes = Tile::kSmemBytes;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = p.pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, p);
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
