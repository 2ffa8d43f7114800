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
// Shared memory a block may opt into on sm_90 (227 KB).
constexpr int kMaxSmemBytes = 227 * 1024;

// Wide token tiles: two 16-row MMA tiles per warp (halves the shared-memory reads of the
// token fragments) and a shorter K step so the ring still leaves room for 2+ CTAs per SM.
template <int kNt, int kRows>
using TileOf = sm90::MoeGemmTile<kNt, kNt >= 8 ? 2 : 1, kRows, kNt >= 4 ? 64 : 128, kStages>;

template <int kNt, int kRows>
int smem_bytes(const MoeGemmArgs& p) {
  using Tile = TileOf<kNt, kRows>;
  return p.lora.token_slot ? Tile::lora_smem_bytes(p.lora.ldu, p.lora.r_max) : Tile::kSmemBytes;
}

template <int kNt, int kRows, bool kLora>
cudaError_t launch_tile(const MoeGemmArgs& p, int max_blocks, cudaStream_t stream) {
  constexpr int kMt = kNt >= 8 ? 2 : 1;
  constexpr int kKt = kNt >= 4 ? 64 : 128;
  using Tile = TileOf<kNt, kRows>;
  constexpr auto kernel = &sm90::moe_gemm_kernel<kNt, kMt, kRows, kKt, kStages, kLora>;
  const int smem = smem_bytes<kNt, kRows>(p);
  if constexpr (kLora) {
    // Its shared memory depends on ldu: opt into the most once (allow_smem raises the limit
    // only on its first call per device, so the shared launch's own call is then a no-op).
    if (smem > kMaxSmemBytes) return cudaErrorInvalidValue;
    if (cudaError_t e = detail::allow_smem<kernel>(kMaxSmemBytes); e != cudaSuccess) return e;
  }
  return detail::launch_expert_gemm<kernel, kRows>(p, max_blocks, Tile::kThreads, smem, stream);
}

template <int kNt, bool kLora>
cudaError_t launch_rows(const sm90::MoeGemmParams& p, int max_blocks, int rows,
                        cudaStream_t stream) {
  switch (rows) {
    case 32: return launch_tile<kNt, 32, kLora>(p, max_blocks, stream);
    case 64: return launch_tile<kNt, 64, kLora>(p, max_blocks, stream);
    case 128: return launch_tile<kNt, 128, kLora>(p, max_blocks, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <bool kLora>
cudaError_t launch_nt(const MoeGemmArgs& p, int max_blocks, int rows, cudaStream_t stream) {
  const int nt = (p.block_m + 7) / 8;
  if (nt <= 1) return launch_rows<1, kLora>(p, max_blocks, rows, stream);
  if (nt <= 2) return launch_rows<2, kLora>(p, max_blocks, rows, stream);
  if (nt <= 4) return launch_rows<4, kLora>(p, max_blocks, rows, stream);
  if (nt <= 8) return launch_rows<8, kLora>(p, max_blocks, rows, stream);
  if (nt <= 16) return launch_rows<16, kLora>(p, max_blocks, rows, stream);
  return cudaErrorInvalidValue;
}

template <int kNt>
int smem_rows(const MoeGemmArgs& p, int rows) {
  switch (rows) {
    case 32: return smem_bytes<kNt, 32>(p);
    case 64: return smem_bytes<kNt, 64>(p);
    case 128: return smem_bytes<kNt, 128>(p);
    default: return -1;
  }
}

}  // namespace

int moe_gemm_smem_bytes(const MoeGemmArgs& p, int rows) {
  const int nt = (p.block_m + 7) / 8;
  if (nt <= 1) return smem_rows<1>(p, rows);
  if (nt <= 2) return smem_rows<2>(p, rows);
  if (nt <= 4) return smem_rows<4>(p, rows);
  if (nt <= 8) return smem_rows<8>(p, rows);
  if (nt <= 16) return smem_rows<16>(p, rows);
  return -1;
}

// Launches the instantiation whose token tile covers args.block_m.
cudaError_t launch_moe_gemm(const MoeGemmArgs& p, int max_blocks, int rows,
                            cudaStream_t stream) {
  if (max_blocks <= 0) return cudaSuccess;
  if ((p.row_tiles_fastest && max_blocks > 65535) || (p.act_out && (p.n % 2 != 0 || p.slot_scale)))
    return cudaErrorInvalidValue;
  if (!p.lora.token_slot) return launch_nt<false>(p, max_blocks, rows, stream);
  const MoeGemmLoraArgs& l = p.lora;
  if (l.r_max <= 0 || l.r_max % 8 != 0 || l.splits < 1 || l.splits > kMaxLoraEpilogueSplits ||
      l.ldu <= 0 || l.ldu % 4 != 0 || l.split_stride % 4 != 0 ||
      reinterpret_cast<uintptr_t>(l.u) % 16 != 0 || reinterpret_cast<uintptr_t>(l.b) % 16 != 0 ||
      l.top_k < 1 || !l.u || !l.b || !l.meta || l.num_experts <= 0 ||
      (l.gate_up && p.n % 2 != 0))
    return cudaErrorInvalidValue;
  return launch_nt<true>(p, max_blocks, rows, stream);
}

}  // namespace moelora::cuda
