// fp8 block-scale expert GEMMs on CUDA: the launcher (tile instantiation, grid). Device code
// is in sm90_moe_gemm_fp8.cuh, the Tensor ops in moe_gemm_fp8_op.cpp.
#include <cstdint>

#include "kernels/cuda/expert_gemm_launch.cuh"
#include "kernels/cuda/moe_gemm_fp8_launch.h"
#include "kernels/cuda/sm90_moe_gemm_fp8.cuh"

namespace moelora::cuda {
namespace {

template <int kNt, int kRows>
cudaError_t launch_tile(const MoeGemmFp8Args& p, int max_blocks, cudaStream_t stream) {
  // Wide token tiles: two 16-row MMA tiles per warp, so each token fragment read from shared
  // memory feeds two MMAs (as in the bf16 kernel).
  constexpr int kMt = kNt == 8 ? 2 : 1;  // 16 token columns x 2 tiles spill registers
  // A stage holds 128 bytes per weight row, half the bf16 kernel's at narrow token tiles
  // (kKt 128 there): a deeper ring keeps as many weight bytes in flight per CTA.
  constexpr int kStages = kNt <= 2 ? 6 : 4;
  using Tile = sm90::MoeGemmFp8Tile<kNt, kMt, kRows, kStages>;
  if (p.inline_lora.parts > 0) {
    constexpr auto kernel = &sm90::moe_gemm_fp8_kernel<kNt, kMt, kRows, kStages, true>;
    return detail::launch_expert_gemm<kernel, kRows>(p, max_blocks, Tile::kThreads,
                                                     Tile::kSmemBytes, stream);
  }
  constexpr auto kernel = &sm90::moe_gemm_fp8_kernel<kNt, kMt, kRows, kStages>;
  return detail::launch_expert_gemm<kernel, kRows>(p, max_blocks, Tile::kThreads, Tile::kSmemBytes,
                                                   stream);
}

template <int kNt>
cudaError_t launch_rows(const MoeGemmFp8Args& p, int max_blocks, int rows, cudaStream_t stream) {
  switch (rows) {
    case 32:
      return launch_tile<kNt, 32>(p, max_blocks, stream);
    case 64:
      return launch_tile<kNt, 64>(p, max_blocks, stream);
    case 128:
      return launch_tile<kNt, 128>(p, max_blocks, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_moe_gemm_fp8(const MoeGemmFp8Args& p, int max_blocks, int rows,
                                cudaStream_t stream) {
  if (max_blocks <= 0) return cudaSuccess;
  if ((p.row_tiles_fastest && max_blocks > 65535) ||
      (p.act_out && (p.n % 2 != 0 || p.slot_scale)) || p.block_n < 1 || p.part_rows < 1 ||
      p.n % p.part_rows != 0 || p.k % 16 != 0)
    return cudaErrorInvalidValue;
  const int nt = (p.block_m + 7) / 8;
  if (nt <= 1) return launch_rows<1>(p, max_blocks, rows, stream);
  if (nt <= 2) return launch_rows<2>(p, max_blocks, rows, stream);
  if (nt <= 4) return launch_rows<4>(p, max_blocks, rows, stream);
  if (nt <= 8) return launch_rows<8>(p, max_blocks, rows, stream);
  if (nt <= 16) return launch_rows<16>(p, max_blocks, rows, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_fp8_quantize_act(const void* x, int rows, int k, uint8_t* q, float* scale,
                                    bool pdl, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (k <= 0 || k % 16 != 0) return cudaErrorInvalidValue;
  constexpr int kThreads = 256;  // 16 (row, K block) groups of 16 lanes
  const int64_t groups = int64_t(rows) * ((k + 127) / 128);
  const int64_t ctas = (groups * 16 + kThreads - 1) / kThreads;
  if (ctas > 0x7fffffff) return cudaErrorInvalidValue;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(ctas));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, &sm90::fp8_quantize_act_kernel,
                            static_cast<const __nv_bfloat16*>(x), rows, k, q, scale);
}

}  // namespace moelora::cuda
