// Launchers of the hook-path-only MoE-LoRA kernels (layer 2 of 3; the contract ops' launchers
// are in moe_ops_launch.h). Raw pointers in, cudaError_t out; no fmt, no Tensor.
#pragma once

#include <cstddef>
#include <cstdint>

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
// The direct variant's arguments (moe_lora_direct.cu): the whole seam from the routing.
struct DirectLoraArgs {
  const void* in;  // bf16 [rows, K]; slot s reads row s / rows_div
  int rows_div;
  const int32_t* ids;         // [n] expert per token-slot
  const int32_t* token_slot;  // [n / top_k] adapter slot per token (out of range: base)
  int top_k, n;
  int num_experts, num_lora_slots;
  const void* A;  // bf16 [S, E, R, K]
  int R, K;
  const void* B;  // bf16 [S, E, N, r_max]
  int N, r_max;
  const int32_t* meta;        // [S, 6]
  bool gate_up;               // B rows [0, N/2) use the gate ranks, the rest the up ranks
  const float* slot_weights;  // [n] or null
  float* out;                 // [n, N] f32
};
// Dynamic shared memory the direct kernel takes, and its bound.
inline constexpr size_t kDirectMaxSmem = 160 * 1024;
size_t moe_lora_direct_smem(int n, int keys, int R, int num_lora_slots);
// out[s] = w[s] * B . (A . in[s]) for every token-slot s whose token has an adapter slot in
// [0, num_lora_slots) and whose expert is in [0, num_experts) (zeros where the adapter lacks
// the seam); other rows untouched. cluster_size 1 (plain CTAs), 2, 4 or 8 CTAs per (adapter,
// expert) pair, at most max_clusters clusters. Needs K % 8 == 0, r_max % 8 == 0, N (and the
// gate_up halves) % 4 == 0, a 16-byte aligned out and the smem bound.
cudaError_t launch_moe_lora_direct(const DirectLoraArgs& a, int cluster_size, int max_clusters,
                                   cudaStream_t stream);

// Whether the vectorized expand applies to these sizes and pointers.
inline bool lora_expand4_ok(const ExpandArgs& a) {
  const int half = a.gate_up ? a.N / 2 : a.N;
  return a.N % 4 == 0 && half % 4 == 0 && a.r_max % 8 == 0 &&
         reinterpret_cast<uintptr_t>(a.out) % 16 == 0 && a.ldu + 8 <= 1032;
}

}  // namespace moelora::cuda::detail
