// The one place the model code calls dense ops through (internal). Every op picks its backend
// from where its tensors live, so the decoders never name cpu:: or cuda:: themselves: wiring
// the CUDA backend means adding the device branch here, nothing in the architectures.
#pragma once

#include "kernels/cpu/dense_ops.h"
#include "moelora/core/error.h"

namespace moelora::ops {

inline void require_cpu(const Tensor& t, const char* op) {
  MOELORA_CHECK(t.device().is_cpu(),
                "model op {}: tensor on {}; only the CPU backend is wired into the models yet", op,
                t.device().str());
}

inline void embedding(const Tensor& ids, const Tensor& table, Tensor& out, const Stream& s) {
  require_cpu(out, "embedding");
  cpu::embedding(ids, table, out, s);
}
inline void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out, const Stream& s) {
  require_cpu(out, "rms_norm");
  cpu::rms_norm(x, w, eps, out, s);
}
inline void linear(const Tensor& x, const Tensor& w, Tensor& y, const Stream& s) {
  require_cpu(y, "linear");
  cpu::linear(x, w, y, s);
}
inline void rope(Tensor& x, int head_dim, const Tensor& pos, double theta, const Stream& s) {
  require_cpu(x, "rope");
  cpu::rope(x, head_dim, pos, theta, s);
}
inline void kv_cache_write(const Tensor& k, const Tensor& v, const Tensor& slots, Tensor& kc,
                           Tensor& vc, const Stream& s) {
  require_cpu(kc, "kv_cache_write");
  cpu::kv_cache_write(k, v, slots, kc, vc, s);
}
inline void paged_attention(const Tensor& q, const Tensor& kc, const Tensor& vc,
                            const Tensor& block_table, const Tensor& token_seq,
                            const Tensor& token_pos, float scale, Tensor& out, const Stream& s) {
  require_cpu(out, "paged_attention");
  cpu::paged_attention(q, kc, vc, block_table, token_seq, token_pos, scale, out, s);
}
inline void silu_mul(const Tensor& gate_up, Tensor& out, const Stream& s) {
  require_cpu(out, "silu_mul");
  cpu::silu_mul(gate_up, out, s);
}
inline void residual_add(Tensor& x, const Tensor& y, const Stream& s) {
  require_cpu(x, "residual_add");
  cpu::residual_add(x, y, s);
}

}  // namespace moelora::ops
