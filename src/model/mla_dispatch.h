// The MLA section of the model ops dispatch (internal): the MLA ops (kernels/mla_ops.inc) and
// DeepSeek's step ops (kernels/mla_step_ops.inc) pick their backend from where their output
// (or in-place) tensor lives, as model/ops.h does for the dense ops, so the DeepSeek model
// never names cpu:: or cuda:: itself.
#pragma once

#include "kernels/cpu/mla_ops.h"
#include "kernels/cpu/mla_step_ops.h"
#include "model/ops.h"

#ifdef MOELORA_WITH_CUDA
#include "kernels/cuda/mla_ops.h"
#include "kernels/cuda/mla_ops_step.h"
#define MOELORA_MLA_OP(name, where, ...) \
  (on_cuda(where, #name) ? cuda::name(__VA_ARGS__) : cpu::name(__VA_ARGS__))
#else
#define MOELORA_MLA_OP(name, where, ...) ((void)on_cuda(where, #name), cpu::name(__VA_ARGS__))
#endif

namespace moelora::ops {

inline void mla_rope(Tensor& x, int head_stride, int rope_offset, int rope_dim,
                     const Tensor& positions, double theta, bool interleaved, const Stream& s,
                     const Tensor& inv_freq = Tensor(), float cos_sin_scale = 1.0f) {
  MOELORA_MLA_OP(mla_rope, x, x, head_stride, rope_offset, rope_dim, positions, theta, interleaved,
                 s, inv_freq, cos_sin_scale);
}
inline void mla_cache_write(const Tensor& kv, const Tensor& slot_mapping, Tensor& cache,
                            const Stream& s) {
  MOELORA_MLA_OP(mla_cache_write, cache, kv, slot_mapping, cache, s);
}
inline void mla_absorb_q(const Tensor& q, const Tensor& w_kv_b, int heads, int nope, int rope,
                         int vd, Tensor& q_latent, const Stream& s) {
  MOELORA_MLA_OP(mla_absorb_q, q_latent, q, w_kv_b, heads, nope, rope, vd, q_latent, s);
}
inline void mla_paged_attention(const Tensor& q_latent, const Tensor& cache,
                                const Tensor& block_table, const Tensor& token_seq,
                                const Tensor& token_pos, int heads, float scale, Tensor& latent,
                                const Stream& s) {
  MOELORA_MLA_OP(mla_paged_attention, latent, q_latent, cache, block_table, token_seq, token_pos,
                 heads, scale, latent, s);
}
inline void mla_absorb_v(const Tensor& latent, const Tensor& w_kv_b, int heads, int nope, int vd,
                         Tensor& out, const Stream& s) {
  MOELORA_MLA_OP(mla_absorb_v, out, latent, w_kv_b, heads, nope, vd, out, s);
}
inline void mla_lora_absorb_q(const Tensor& q, const Tensor& token_slot, const Tensor& A,
                              const Tensor& B, const Tensor& ranks, int heads, int nope, int rope,
                              int vd, Tensor& q_latent, const Stream& s) {
  MOELORA_MLA_OP(mla_lora_absorb_q, q_latent, q, token_slot, A, B, ranks, heads, nope, rope, vd,
                 q_latent, s);
}
inline void mla_lora_absorb_v(const Tensor& latent, const Tensor& token_slot, const Tensor& A,
                              const Tensor& B, const Tensor& ranks, int heads, int nope, int vd,
                              Tensor& out, const Stream& s) {
  MOELORA_MLA_OP(mla_lora_absorb_v, out, latent, token_slot, A, B, ranks, heads, nope, vd, out,
                 s);
}
inline void mla_gather_latent(const Tensor& cache, const Tensor& block_table, int seq,
                              int64_t len, Tensor& out, const Stream& s) {
  MOELORA_MLA_OP(mla_gather_latent, out, cache, block_table, seq, len, out, s);
}
inline void mla_expanded_attention(const Tensor& q, const Tensor& kv_b_out, const Tensor& latent,
                                   const Tensor& token_pos, int heads, int nope, int rope, int vd,
                                   float scale, Tensor& out, const Stream& s) {
  MOELORA_MLA_OP(mla_expanded_attention, out, q, kv_b_out, latent, token_pos, heads, nope, rope,
                 vd, scale, out, s);
}

// ---- DeepSeek step ops ----
inline void mla_kv_norm(Tensor& kv, const Tensor& weight, float eps, const Stream& s) {
  MOELORA_MLA_OP(mla_kv_norm, kv, kv, weight, eps, s);
}
inline void grouped_router_margin(const Tensor& logits, const Tensor& correction_bias,
                                  const RouterConfig& router, Tensor& margin, int64_t col,
                                  const Stream& s) {
  MOELORA_MLA_OP(grouped_router_margin, margin, logits, correction_bias, router, margin, col, s);
}

}  // namespace moelora::ops

#undef MOELORA_MLA_OP
