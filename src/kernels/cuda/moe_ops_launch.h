// Launchers of the CUDA routing, alignment, elementwise and MoE-LoRA kernels (layer 2 of 3):
// raw pointers and sizes in, cudaError_t out. Included by nvcc and host compilers alike, so
// it pulls in no fmt and no Tensor. bf16 data travels as void*.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#ifdef __CUDACC__
#define MOELORA_HOST_DEVICE __host__ __device__
#else
#define MOELORA_HOST_DEVICE
#endif

namespace moelora::cuda::detail {

// --- routing ---
struct RouteParams {
  int num_experts;
  int top_k;
  int n_group;  // 1: no group limit
  int topk_group;
  bool sigmoid;   // else softmax
  bool top2_sum;  // group score: sum of the two best (else the max)
  bool renormalize;
  bool use_bias;
  float scale;  // routed_scaling_factor
};

// A team of ceil32(E) threads routes one token; its shared memory (bytes, 16-aligned).
MOELORA_HOST_DEVICE inline int route_team(int num_experts) {
  return (num_experts + 31) / 32 * 32;
}
MOELORA_HOST_DEVICE inline size_t route_team_smem(int num_experts, int n_group) {
  return (size_t(num_experts) * 8 + size_t(n_group) * 12 + 32 * 4 * 3 + 15) / 16 * 16;
}

cudaError_t launch_moe_route(const float* logits, const float* bias, const RouteParams& p, int m,
                             int32_t* ids, float* weights, cudaStream_t stream);

// --- alignment ---
struct AlignOut {
  int32_t* sorted_slots;
  int32_t* block_group;
  int32_t* num_padded;
  int32_t* group_offsets;
  int num_slots;   // n = M * k; also the padding value
  int num_groups;  // G
  int block_m;
  int fill_blocks;  // block_group entries to write (-1 past the last used block)
  int row_warps;    // set by the launcher
};

// Dynamic shared memory the single-CTA aligner may use (H100: 227 KB per block).
inline constexpr size_t kAlignSmemLimit = 200 * 1024;
// Tokens up to which routing runs inside the alignment kernel.
inline constexpr int kFusedRouteMaxTokens = 16;

// Shared memory the aligner needs: offsets[G+1], counts[G], rows u16[W][G].
inline size_t align_smem_bytes(int num_groups, int row_warps) {
  return size_t(2 * num_groups + 1) * 4 + ((size_t(row_warps) * num_groups * 2 + 3) & ~size_t(3));
}

// Shared memory of the fused route+align kernel (1024 threads): routing scratch of all teams,
// reused by the aligner, then the ids. At most kAlignSmemLimit + kSmemSlack.
inline constexpr size_t kSmemSlack = 16 * 1024;
inline size_t route_align_scratch_bytes(int num_experts, int n_group, int num_groups,
                                        int row_warps) {
  const size_t route =
      size_t(1024 / route_team(num_experts)) * route_team_smem(num_experts, n_group);
  const size_t align = align_smem_bytes(num_groups, row_warps);
  return ((route > align ? route : align) + 15) / 16 * 16;
}

cudaError_t launch_moe_align(const int32_t* group_ids, AlignOut o, cudaStream_t stream);
// Virtual ids token_slot[s / top_k] * E + ids[s] aligned without materializing them.
cudaError_t launch_moe_lora_align(const int32_t* ids, const int32_t* token_slot, int top_k,
                                  int num_experts, AlignOut o, cudaStream_t stream);
// Routing of m <= kFusedRouteMaxTokens tokens and their alignment, one CTA.
cudaError_t launch_moe_route_align(const float* logits, const float* bias, const RouteParams& p,
                                   int m, int32_t* ids, float* weights, AlignOut o,
                                   cudaStream_t stream);

// --- activation and top-k reduction ---
// LoRA deltas added inside the activation / reduction (the hooks' overlap variant): row s of d
// is added for slots whose token has an adapter (token_slot[s / top_k] in [0, num_lora_slots))
// and whose expert is valid; other rows of d are never read. d == nullptr: no LoRA.
// d may hold `splits` partial deltas split_stride elements apart, added in order.
struct LoraDeltaView {
  const float* d = nullptr;
  int splits = 1;
  int64_t split_stride = 0;
  const int32_t* token_slot = nullptr;
  int top_k = 1, num_lora_slots = 0, num_experts = 0;
};
cudaError_t launch_moe_activation(const float* h, const int32_t* ids, int64_t slots, int inter,
                                  void* a, cudaStream_t stream, LoraDeltaView delta = {});
cudaError_t launch_moe_reduce(const float* o, const int32_t* ids, int64_t m, int top_k, int hidden,
                              const float* shared_o, const float* gate_logits, void* y,
                              cudaStream_t stream, LoraDeltaView delta = {});

// --- LoRA on experts ---
struct LoraPlanView {
  const int32_t* sorted_slots;
  const int32_t* block_group;
  const int32_t* num_padded;
  int block_m;
  int num_slots;  // n = M*k, the padding value
  int num_experts;
};

struct ShrinkArgs {
  const void* in;  // bf16 [rows, K]
  int rows_div;
  const void* A;  // bf16 [S, E, R, K]
  int R, K;
  const int32_t* meta;  // [S, 6]
  int rank_field;       // 0 (shrink_rank) or 5 (down_rank)
  float* u;             // [splits][n, ldu]: K-split partial sums (splits == 1: u itself)
  int ldu;
  int splits;            // CTAs along K per (block, rank tile, slot tile)
  int64_t split_stride;  // elements between partial buffers
};

struct ExpandArgs {
  const float* u;  // [splits][n, ldu]: summed over the splits when staged
  int ldu;
  int splits;
  int64_t split_stride;
  const void* B;  // bf16 [S, E, N, r_max]
  int N, r_max;
  const int32_t* meta;
  bool gate_up;
  const float* slot_weights;  // [n] or null
  float* out;                 // [n, N]
};

cudaError_t launch_moe_lora_group_ids(const int32_t* ids, const int32_t* token_slot, int top_k,
                                      int num_experts, int64_t n, int32_t* vids,
                                      cudaStream_t stream);
// `blocks`: every block the plan can hold (blocks past *num_padded exit).
cudaError_t launch_moe_lora_shrink(const LoraPlanView& plan, const ShrinkArgs& a, int blocks,
                                   cudaStream_t stream);
cudaError_t launch_moe_lora_expand(const LoraPlanView& plan, const ExpandArgs& a, int blocks,
                                   cudaStream_t stream);

}  // namespace moelora::cuda::detail
