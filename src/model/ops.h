// The one place the model code calls dense ops through (internal). Every op picks its backend
// from where its output (or in-place) tensor lives: CPU -> cpu::, CUDA -> cuda:: (the ops then
// check that every other tensor sits on the same device). The decoders never name cpu:: or
// cuda:: themselves. In a build without CUDA a CUDA tensor is a clear error.
#pragma once

#include "kernels/cpu/dense_ops.h"
#include "kernels/cpu/model_ops.h"
#include "moelora/core/error.h"

#ifdef MOELORA_WITH_CUDA
#include "kernels/cuda/dense_ops.h"
#include "kernels/cuda/model_ops.h"
#endif

namespace moelora::ops {

// True when `t` is on a CUDA device (and the build has the CUDA backend); false on the CPU.
inline bool on_cuda(const Tensor& t, const char* op) {
  MOELORA_CHECK(t.defined(), "model op {}: output tensor is undefined", op);
  if (t.device().is_cpu()) return false;
#ifndef MOELORA_WITH_CUDA
  MOELORA_THROW("model op {}: tensor on {}, but moelora was built without CUDA", op,
                t.device().str());
#endif
  return true;
}

}  // namespace moelora::ops

// ops::name(args) runs cuda::name(args) when `where` is a CUDA tensor, else cpu::name(args).
#ifdef MOELORA_WITH_CUDA
#define MOELORA_MODEL_OP(name, where, ...) \
  (on_cuda(where, #name) ? cuda::name(__VA_ARGS__) : cpu::name(__VA_ARGS__))
#else
#define MOELORA_MODEL_OP(name, where, ...) ((void)on_cuda(where, #name), cpu::name(__VA_ARGS__))
#endif

namespace moelora::ops {

// ---- dense layers (kernels/dense_ops.inc) ----
inline void embedding(const Tensor& ids, const Tensor& table, Tensor& out, const Stream& s) {
  MOELORA_MODEL_OP(embedding, out, ids, table, out, s);
}
inline void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out, const Stream& s) {
  MOELORA_MODEL_OP(rms_norm, out, x, w, eps, out, s);
}
inline void linear(const Tensor& x, const Tensor& w, Tensor& y, const Stream& s) {
  MOELORA_MODEL_OP(linear, y, x, w, y, s);
}
inline void rope(Tensor& x, int head_dim, const Tensor& pos, double theta, const Stream& s) {
  MOELORA_MODEL_OP(rope, x, x, head_dim, pos, theta, s);
}
inline void kv_cache_write(const Tensor& k, const Tensor& v, const Tensor& slots, Tensor& kc,
                           Tensor& vc, const Stream& s) {
  MOELORA_MODEL_OP(kv_cache_write, kc, k, v, slots, kc, vc, s);
}
inline void attention_prologue(Tensor& q, Tensor& k, const Tensor& v, const Tensor& q_norm,
                               const Tensor& k_norm, float eps, int head_dim, const Tensor& pos,
                               double theta, const Tensor& slots, Tensor& kc, Tensor& vc,
                               const Stream& s, const Tensor& inv_freq = Tensor(),
                               float cos_sin_scale = 1.0f) {
  MOELORA_MODEL_OP(attention_prologue, q, q, k, v, q_norm, k_norm, eps, head_dim, pos, theta, slots,
                   kc, vc, s, inv_freq, cos_sin_scale);
}
inline void paged_attention(const Tensor& q, const Tensor& kc, const Tensor& vc,
                            const Tensor& block_table, const Tensor& token_seq,
                            const Tensor& token_pos, float scale, Tensor& out, const Stream& s) {
  MOELORA_MODEL_OP(paged_attention, out, q, kc, vc, block_table, token_seq, token_pos, scale, out,
                   s);
}
inline void silu_mul(const Tensor& gate_up, Tensor& out, const Stream& s) {
  MOELORA_MODEL_OP(silu_mul, out, gate_up, out, s);
}
inline void residual_add(Tensor& x, const Tensor& y, const Stream& s) {
  MOELORA_MODEL_OP(residual_add, x, x, y, s);
}

// ---- step ops (kernels/model_ops.inc) ----
inline void cast(const Tensor& x, Tensor& out, const Stream& s) {
  MOELORA_MODEL_OP(cast, out, x, out, s);
}
inline void copy_columns(const Tensor& src, int64_t col, Tensor& dst, const Stream& s) {
  MOELORA_MODEL_OP(copy_columns, dst, src, col, dst, s);
}
inline void gather_rows(const Tensor& src, const Tensor& rows, Tensor& dst, const Stream& s) {
  MOELORA_MODEL_OP(gather_rows, dst, src, rows, dst, s);
}
inline void router_margin(const Tensor& logits, int k, Tensor& margin, int64_t col,
                          const Stream& s) {
  MOELORA_MODEL_OP(router_margin, margin, logits, k, margin, col, s);
}

}  // namespace moelora::ops

#undef MOELORA_MODEL_OP
