// Launchers of the MoE-LoRA kernels (device code in moe_lora.cuh).
#include "kernels/cuda/moe_lora.cuh"
#include "kernels/cuda/moe_lora_launch.h"
#include "kernels/cuda/moe_ops_launch.h"

namespace moelora::cuda::detail {

cudaError_t launch_moe_lora_group_ids(const int32_t* ids, const int32_t* token_slot, int top_k,
                                      int num_experts, int64_t n, int32_t* vids,
                                      cudaStream_t stream) {
  const int threads = 256;
  return launch_pdl(moe_lora_group_ids_kernel, dim3(unsigned((n + threads - 1) / threads)),
                    dim3(threads), 0, stream, ids, token_slot, top_k, num_experts, n, vids);
}

cudaError_t launch_moe_lora_shrink(const LoraPlanView& plan, const ShrinkArgs& a, int blocks,
                                   cudaStream_t stream) {
  const dim3 grid(unsigned(blocks), unsigned((a.R + kShrinkRanks - 1) / kShrinkRanks),
                  unsigned(a.splits));
  return launch_pdl(moe_lora_shrink_kernel<kShrinkWarps, 4, kShrinkTiles, 2>, grid,
                    dim3(kShrinkWarps * 32), 0, stream, plan, a);
}

namespace {

template <int kRt, int kTiles, int kUnroll>
cudaError_t launch_shrink_stream(const LoraPlanView& plan, const ShrinkArgs& a, int blocks,
                                 cudaStream_t stream) {
  constexpr int kWarps = kShrinkStreamWarps;
  const dim3 grid(unsigned(blocks), unsigned((a.R + 16 * kRt - 1) / (16 * kRt)),
                  unsigned(a.splits));
  return launch_pdl(moe_lora_shrink_kernel<kWarps, kRt, kTiles, kUnroll>, grid,
                    dim3(kWarps * 32), 0, stream, plan, a);
}

}  // namespace

cudaError_t launch_moe_lora_shrink_stream(const LoraPlanView& plan, const ShrinkArgs& a,
                                          int blocks, cudaStream_t stream) {
  // Rank tiles sized to the pool's A rows (a rank-16 pool's down shrink needs one MMA row
  // tile, not four), so the registers go to more slot tiles per pass and more K in flight.
  if (a.R <= 16) return launch_shrink_stream<1, 8, 4>(plan, a, blocks, stream);
  if (a.R <= 32) return launch_shrink_stream<2, 4, 2>(plan, a, blocks, stream);
  return launch_shrink_stream<4, 2, 2>(plan, a, blocks, stream);
}

namespace {

bool stage_b(const ExpandArgs& a) { return a.r_max <= kExpandStageRanks; }

size_t expand4_smem(const ExpandArgs& a) {
  size_t bytes = size_t(a.ldu + kExpand4Pad) * kExpandSlots * sizeof(float);
  if (stage_b(a)) bytes += size_t(a.r_max / 8) * 4 * kExpand4Threads * 16;
  return bytes;
}

// Launches expand4 for `a`, allowing the kernel more than 48 KB of shared memory once.
template <bool kDelta>
cudaError_t launch_expand4(const LoraPlanView& plan, const ExpandArgs& a, int blocks,
                           cudaStream_t stream) {
  const dim3 grid(unsigned(blocks), unsigned((a.N + kExpand4Cols - 1) / kExpand4Cols));
  const size_t smem = expand4_smem(a);
  if (stage_b(a)) {
    static const cudaError_t attr = cudaFuncSetAttribute(
        moe_lora_expand4_kernel<kDelta, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
        int((size_t(1024 + kExpand4Pad) * kExpandSlots * sizeof(float)) +
            size_t(kExpandStageRanks / 8) * 4 * kExpand4Threads * 16));
    if (attr != cudaSuccess) return attr;
    return launch_pdl(moe_lora_expand4_kernel<kDelta, true>, grid, dim3(kExpand4Threads), smem,
                      stream, plan, a);
  }
  return launch_pdl(moe_lora_expand4_kernel<kDelta, false>, grid, dim3(kExpand4Threads), smem,
                    stream, plan, a);
}

}  // namespace

cudaError_t launch_moe_lora_expand_delta(const LoraPlanView& plan, const ExpandArgs& a,
                                         int blocks, cudaStream_t stream) {
  if (!lora_expand4_ok(a)) return cudaErrorInvalidValue;
  return launch_expand4<true>(plan, a, blocks, stream);
}

cudaError_t launch_moe_lora_add_delta(const float* d, const int32_t* ids,
                                      const int32_t* token_slot, int top_k, int num_experts,
                                      int num_lora_slots, int64_t n, int N, float* out,
                                      cudaStream_t stream) {
  if (N % 4 != 0) return cudaErrorInvalidValue;
  const int threads = 256, n4 = N / 4;
  const int64_t total = n * n4;
  return launch_pdl(moe_lora_add_delta_kernel, dim3(unsigned((total + threads - 1) / threads)),
                    dim3(threads), 0, stream, reinterpret_cast<const float4*>(d), ids,
                    token_slot, top_k, num_experts, num_lora_slots, n, n4,
                    reinterpret_cast<float4*>(out));
}

cudaError_t launch_moe_lora_expand(const LoraPlanView& plan, const ExpandArgs& a, int blocks,
                                   cudaStream_t stream) {
  if (lora_expand4_ok(a)) return launch_expand4<false>(plan, a, blocks, stream);
  const dim3 grid(unsigned(blocks), unsigned((a.N + kExpandCols - 1) / kExpandCols));
  const size_t smem = size_t(kExpandSlots) * (a.ldu + kExpandRankChunk) * sizeof(float);
  return launch_pdl(a.r_max % 8 == 0 ? moe_lora_expand_kernel<true> : moe_lora_expand_kernel<false>,
                    grid, dim3(kExpandThreads), smem, stream, plan, a);
}

}  // namespace moelora::cuda::detail
