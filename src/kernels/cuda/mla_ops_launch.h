// Launchers of the CUDA MLA ops (layer 2 of 3): raw pointers, sizes, a bf16/f32 flag per
// activation or cache tensor (true = bf16), cudaError_t out. Sizes as in kernels/mla_ops.inc.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace moelora::cuda {

// inv_freq: [rope_dim / 2] frequencies, or null for theta^(-2i / rope_dim); cos and sin are
// multiplied by cos_sin_scale.
cudaError_t launch_mla_rope(void* x, bool x_bf16, int64_t m, int64_t cols, int head_stride,
                            int rope_offset, int rope_dim, const int32_t* positions, float theta,
                            const float* inv_freq, float cos_sin_scale, bool interleaved,
                            cudaStream_t s);
cudaError_t launch_mla_cache_write(const void* kv, bool kv_bf16, const int32_t* slot_mapping,
                                   void* cache, bool cache_bf16, int64_t m, int64_t row,
                                   cudaStream_t s);
// q_latent f32 [m, heads * (L + rope)]; w_kv_b bf16 [heads * (nope + vd), L].
cudaError_t launch_mla_absorb_q(const void* q, bool q_bf16, const void* w_kv_b, float* q_latent,
                                int64_t m, int heads, int nope, int rope, int vd, int64_t L,
                                cudaStream_t s);

struct MlaAttentionArgs {
  const float* q_latent;  // [m, heads * row]
  const void* cache;      // [pages, page_size, 1, row]
  bool cache_bf16;
  const int32_t* block_table;  // [S, max_pages]
  const int32_t* token_seq;
  const int32_t* token_pos;
  float* latent;  // [m, heads * L]
  int64_t m;
  int heads, L, row, page_size, max_pages;
  float scale;
};
// row <= kMlaMaxRow.
constexpr int kMlaMaxRow = 1024;
cudaError_t launch_mla_paged_attention(const MlaAttentionArgs& a, cudaStream_t s);

cudaError_t launch_mla_absorb_v(const float* latent, const void* w_kv_b, void* out,
                                bool out_bf16, int64_t m, int heads, int nope, int vd, int64_t L,
                                cudaStream_t s);

// A DenseLoraPool's kv_b_proj tensors: A bf16 [S, 1, r_max, L], B bf16
// [S, heads * (nope + vd), r_max], ranks i32 [S, 1]; token_slot i32 [m] (-1 = none).
struct MlaLoraArgs {
  const int32_t* token_slot;
  const void* A;
  const void* B;
  const int32_t* ranks;
  int64_t m, L, r_max;
  int heads, nope, rope, vd;
};
constexpr int64_t kMlaMaxLoraRank = 4096;
cudaError_t launch_mla_lora_absorb_q(const MlaLoraArgs& a, const void* q, bool q_bf16,
                                     float* q_latent, cudaStream_t s);
cudaError_t launch_mla_lora_absorb_v(const MlaLoraArgs& a, const float* latent, float* out,
                                     cudaStream_t s);

// out f32 [len, row] = the cache rows of positions 0..len-1 of the sequence whose block-table
// row is block_row (max_pages entries).
cudaError_t launch_mla_gather_latent(const void* cache, bool cache_bf16, const int32_t* block_row,
                                     int page_size, int64_t len, int64_t row, float* out,
                                     cudaStream_t s);

struct MlaExpandedArgs {
  const float* q;         // [n, heads * (nope + rope)]
  const float* kv_b_out;  // [len, heads * (nope + vd)]
  const float* latent;    // [len, row]
  const int32_t* token_pos;
  float* out;  // [n, heads * vd]
  int64_t n, row, L;
  int heads, nope, rope, vd;
  float scale;
};
// nope + rope <= kMlaMaxHeadDim, vd <= kMlaMaxHeadDim.
constexpr int kMlaMaxHeadDim = 256;
cudaError_t launch_mla_expanded_attention(const MlaExpandedArgs& a, cudaStream_t s);

}  // namespace moelora::cuda

namespace moelora::cuda {

// ---- DeepSeek step ops (kernels/mla_step_ops.inc; kernels in mla_ops_step.cu) ----
// In place on kv [m, cols]: RMSNorm of the first L columns with weight bf16 [L].
cudaError_t launch_mla_kv_norm(void* kv, bool kv_bf16, const void* weight, float eps, int64_t m,
                               int64_t cols, int64_t L, cudaStream_t s);

struct GroupedMarginArgs {
  const float* logits;           // [m, E]
  const float* correction_bias;  // [E] or null
  float* margin;                 // [m, cols], column col
  int64_t m, cols, col;
  int E, top_k, n_group, topk_group;
  bool sigmoid, top2_sum;
};
constexpr int kGroupedMarginMaxE = 512, kGroupedMarginMaxGroups = 64;
cudaError_t launch_grouped_router_margin(const GroupedMarginArgs& a, cudaStream_t s);

}  // namespace moelora::cuda
