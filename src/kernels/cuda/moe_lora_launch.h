// Launchers of the hook-path-only MoE-LoRA kernels (layer 2 of 3; the contract ops' launchers
// are in moe_ops_launch.h). Raw pointers in, cudaError_t out; no fmt, no Tensor.
#pragma once

#include "kernels/cuda/moe_ops_launch.h"

namespace moelora::cuda::detail {

// out[s] = w[s] * (B . u)[s] for every aligned slot s (zeros for adapters without the seam);
// other rows untouched. Needs N % 4 == 0 (and I % 4 == 0 for gate_up), r_max % 8 == 0.
cudaError_t launch_moe_lora_expand_delta(const LoraPlanView& plan, const ExpandArgs& a,
                                         int blocks, cudaStream_t stream);
// out[s] += d[s] for slots with token_slot[s / top_k] in [0, num_lora_slots) and an expert in
// [0, num_experts); out and d [n, N] f32, N % 4 == 0, 16-byte aligned.
cudaError_t launch_moe_lora_add_delta(const float* d, const int32_t* ids,
                                      const int32_t* token_slot, int top_k, int num_experts,
                                      int num_lora_slots, int64_t n, int N, float* out,
                                      cudaStream_t stream);
// The fast path's shrink: moe_lora_shrink's contract and grid (plan blocks x rank tiles x
// splits), with rank tiles sized to a.R and fewer threads per CTA (more CTAs per SM).
cudaError_t launch_moe_lora_shrink_stream(const LoraPlanView& plan, const ShrinkArgs& a,
                                          int blocks, cudaStream_t stream);
// Whether the vectorized expand applies to these sizes and pointers.
inline bool lora_expand4_ok(const ExpandArgs& a) {
  const int half = a.gate_up ? a.N / 2 : a.N;
  return a.N % 4 == 0 && half % 4 == 0 && a.r_max % 8 == 0 &&
         reinterpret_cast<uintptr_t>(a.out) % 16 == 0 && a.ldu + 8 <= 1032;
}

}  // namespace moelora::cuda::detail
