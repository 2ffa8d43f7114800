// Launchers of the CUDA dense ops (layer 2 of 3): raw pointers, sizes, a bf16/f32 flag per
// activation tensor (true = bf16), cudaError_t out.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace moelora::cuda {

cudaError_t launch_embedding(const int32_t* ids, const void* table, void* out, bool out_bf16,
                             int64_t m, int64_t h, cudaStream_t s);
cudaError_t launch_rms_norm(const void* x, bool x_bf16, const void* weight, float eps, void* out,
                            bool out_bf16, int64_t rows, int64_t d, cudaStream_t s);
// y [m, n] = x [m, k] . w [n, k]^T; k % 8 == 0.
cudaError_t launch_linear(const void* x, bool x_bf16, const void* w, void* y, bool y_bf16,
                          int64_t m, int64_t n, int64_t k, cudaStream_t s);
// hi [n] = bf16(x), lo [n] = bf16(x - hi): x = hi + lo to ~2^-16 relative, so an f32-input
// linear can run as two bf16 GEMMs (cublas_linear.h).
cudaError_t launch_split_bf16(const float* x, void* hi, void* lo, int64_t n, cudaStream_t s);
// out [n] = a + b (f32; out may alias a or b).
cudaError_t launch_add_f32(const float* a, const float* b, float* out, int64_t n, cudaStream_t s);
// rms_norm (q_norm / k_norm per head, each optional), rope on q and k (in place, f32), then
// k and v into the cache (slot -1: none), bit for bit launch_rms_norm, launch_rope and
// launch_kv_cache_write one after another. head_dim even, <= kPrologueMaxHeadDim.
inline constexpr int kPrologueMaxHeadDim = 512;
struct AttentionPrologueArgs {
  float* q;  // [m, heads * head_dim]
  float* k;  // [m, kv_heads * head_dim]
  const float* v;
  const void* q_norm;  // bf16 [head_dim] or null
  const void* k_norm;
  float eps;
  const int32_t* positions;  // [m]
  float theta;
  const float* inv_freq;  // [head_dim / 2] or null (theta's frequencies)
  float cos_sin_scale;
  const int32_t* slot_mapping;  // [m]
  void* k_cache;                // [slots, kv_heads * head_dim], f32 or bf16
  void* v_cache;
  int64_t m;
  int heads, kv_heads, head_dim;
};
cudaError_t launch_attention_prologue(const AttentionPrologueArgs& a, bool cache_bf16,
                                      cudaStream_t s);
// inv_freq: [head_dim / 2] frequencies or null (theta^(-2i / head_dim)); cos and sin are
// multiplied by cos_sin_scale.
cudaError_t launch_rope(void* x, bool x_bf16, int64_t m, int64_t cols, int head_dim,
                        const int32_t* positions, float theta, const float* inv_freq,
                        float cos_sin_scale, cudaStream_t s);
cudaError_t launch_kv_cache_write(const void* k, bool k_bf16, const void* v, bool v_bf16,
                                  const int32_t* slot_mapping, void* k_cache, void* v_cache,
                                  bool cache_bf16, int64_t m, int64_t row, cudaStream_t s);
struct PagedAttentionArgs {
  const void* q;
  bool q_bf16;
  const void* k_cache;
  const void* v_cache;
  bool cache_bf16;
  const int32_t* block_table;
  const int32_t* token_seq;
  const int32_t* token_pos;
  void* out;
  bool out_bf16;
  int64_t m;
  int heads, kv_heads, head_dim, page_size, max_pages;
  float scale;
};
cudaError_t launch_paged_attention(const PagedAttentionArgs& a, cudaStream_t s);
// The grouped-query fast path launch_paged_attention takes when it can (gqa_attention.cu): a
// cluster of CTAs per (token, KV head) reading K/V once for the head group. Supported: heads a
// multiple of kv_heads with at most 8 per group, head_dim a multiple of 32 up to 128.
bool gqa_paged_attention_supported(const PagedAttentionArgs& a);
cudaError_t launch_gqa_paged_attention(const PagedAttentionArgs& a, cudaStream_t s);
cudaError_t launch_silu_mul(const float* gate_up, void* out, bool out_bf16, int64_t m,
                            int64_t inter, cudaStream_t s);
cudaError_t launch_residual_add(void* x, bool x_bf16, const void* y, bool y_bf16, int64_t n,
                                cudaStream_t s);

// Model step ops (kernels/model_ops.inc). One strided copy serves cast, copy_columns and
// gather_rows: dst [m, width] row r = src row (rows ? rows[r] : r), columns [col, col + width)
// of src rows of src_cols elements.
cudaError_t launch_copy_rows(const void* src, bool src_bf16, int64_t src_cols, int64_t col,
                             const int32_t* rows, void* dst, bool dst_bf16, int64_t m,
                             int64_t width, cudaStream_t s);
// margin[t * cols + col] = k-th minus (k+1)-th largest of logits row t (f32 [m, e]); e <= 1024.
cudaError_t launch_router_margin(const float* logits, int64_t m, int e, int k, float* margin,
                                 int64_t cols, int64_t col, cudaStream_t s);

}  // namespace moelora::cuda
