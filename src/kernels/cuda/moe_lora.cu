// Launchers of the MoE-LoRA kernels (device code in moe_lora.cuh).
#include "kernels/cuda/moe_lora.cuh"
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
                  unsigned((plan.block_m + 7) / 8 * a.splits));
  return launch_pdl(moe_lora_shrink_kernel, grid, dim3(kShrinkWarps * 32), 0, stream, plan, a);
}

cudaError_t launch_moe_lora_expand(const LoraPlanView& plan, const ExpandArgs& a, int blocks,
                                   cudaStream_t stream) {
  const dim3 grid(unsigned(blocks), unsigned((a.N + kExpandCols - 1) / kExpandCols));
  const size_t smem = size_t(kExpandSlots) * (a.ldu + kExpandRankChunk) * sizeof(float);
  return launch_pdl(a.r_max % 8 == 0 ? moe_lora_expand_kernel<true> : moe_lora_expand_kernel<false>,
                    grid, dim3(kExpandThreads), smem, stream, plan, a);
}

}  // namespace moelora::cuda::detail
