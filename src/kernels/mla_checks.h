// Argument checks of the MLA ops (kernels/mla_ops.inc), shared by the CPU reference and the
// CUDA ops (internal). They check what is known without reading tensor contents (defined,
// dtype, device, contiguous, shapes) and throw moelora::Error naming the tensor, expected vs
// found. Checks that read indices (slot mappings, token slots, positions, block-table entries)
// stay in the CPU ops: the CUDA ops cannot make them without a device sync, so there the
// callers own those invariants (the model builds these tensors itself).
#pragma once

#include <cmath>
#include <cstdint>

#include "moelora/core/error.h"
#include "moelora/core/tensor.h"
#include "moelora/moe/config.h"

namespace moelora::detail {

// A defined, contiguous tensor of dtype dt on dev.
inline void mla_on(const Tensor& t, DType dt, Device dev, const char* what) {
  MOELORA_CHECK(t.defined(), "{}: expected a tensor, found an undefined one", what);
  check_dtype(t, dt, what);
  check_device(t, dev, what);
  check_contiguous(t, what);
}

// A 2-d f32 or bf16 activation on dev; returns whether it is bf16.
inline bool mla_act(const Tensor& t, Device dev, const char* what) {
  MOELORA_CHECK(t.defined(), "{}: expected a tensor, found an undefined one", what);
  check_device(t, dev, what);
  MOELORA_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::bf16,
                "{}: expected f32 or bf16, found {}", what, t.describe());
  check_contiguous(t, what);
  MOELORA_CHECK(t.dim() == 2, "{}: expected a 2-d tensor, found {}", what, t.describe());
  return t.dtype() == DType::bf16;
}

inline void check_mla_dims(int heads, int nope, int rope, int vd, const char* op) {
  MOELORA_CHECK(heads > 0 && nope > 0 && rope >= 0 && vd > 0,
                "{}: expected heads, nope, vd > 0 and rope >= 0, found {}, {}, {}, {}", op, heads,
                nope, vd, rope);
}

// kv_b_proj [heads * (nope + vd), L]; returns L.
inline int64_t check_mla_kv_b(const Tensor& w, Device dev, int heads, int nope, int vd,
                              const char* op) {
  mla_on(w, DType::bf16, dev, "MLA w_kv_b");
  MOELORA_CHECK(w.dim() == 2 && w.size(0) == int64_t(heads) * (nope + vd) && w.size(1) > 0,
                "{}: w_kv_b: expected bf16 [{} (heads x (nope + v)), L], found {}", op,
                int64_t(heads) * (nope + vd), w.describe());
  return w.size(1);
}

struct MlaCacheDims {
  int64_t pages = 0, page = 0, row = 0;
  bool bf16 = false;
};

// The MLA cache [pages, page_size, 1, row], f32 or bf16, on dev.
inline MlaCacheDims check_mla_cache(const Tensor& cache, Device dev) {
  MOELORA_CHECK(cache.defined() && cache.dim() == 4 && cache.size(2) == 1,
                "MLA cache: expected [pages, page_size, 1, L + rope], found {}",
                cache.defined() ? cache.describe() : std::string("undefined"));
  MOELORA_CHECK(cache.dtype() == DType::f32 || cache.dtype() == DType::bf16,
                "MLA cache: expected f32 or bf16, found {}", cache.describe());
  check_device(cache, dev, "MLA cache");
  check_contiguous(cache, "MLA cache");
  return {cache.size(0), cache.size(1), cache.size(3), cache.dtype() == DType::bf16};
}

struct MlaLoraDims {
  int64_t slots = 0, r = 0;
};

// A DenseLoraPool's kv_b_proj tensors: A [S, 1, r_max, L], B [S, rows, r_max], ranks [S, 1],
// token_slot [m]. The values of token_slot are the CPU op's to check.
inline MlaLoraDims check_mla_lora(const Tensor& token_slot, const Tensor& A, const Tensor& B,
                                  const Tensor& ranks, int64_t m, int64_t L, int64_t rows,
                                  Device dev, const char* op) {
  mla_on(token_slot, DType::i32, dev, "MLA LoRA token_slot");
  check_shape(token_slot, {m}, "MLA LoRA token_slot");
  mla_on(A, DType::bf16, dev, "MLA LoRA A");
  MOELORA_CHECK(A.dim() == 4 && A.size(1) == 1 && A.size(3) == L,
                "{}: A: expected bf16 [slots, 1, r_max, {}], found {}", op, L, A.describe());
  const MlaLoraDims v{A.size(0), A.size(2)};
  mla_on(B, DType::bf16, dev, "MLA LoRA B");
  check_shape(B, {v.slots, rows, v.r}, "MLA LoRA B");
  mla_on(ranks, DType::i32, dev, "MLA LoRA ranks");
  check_shape(ranks, {v.slots, 1}, "MLA LoRA ranks");
  return v;
}

// ---- per op ------------------------------------------------------------------------------

// Returns whether x is bf16.
inline bool check_mla_rope(const Tensor& x, int head_stride, int rope_offset, int rope_dim,
                           const Tensor& positions, double theta, Device dev,
                           const Tensor& inv_freq, float cos_sin_scale) {
  const bool xb = mla_act(x, dev, "mla_rope x");
  mla_on(positions, DType::i32, dev, "mla_rope positions");
  MOELORA_CHECK(rope_dim > 0 && rope_dim % 2 == 0 && rope_offset >= 0 &&
                    rope_offset + rope_dim <= head_stride,
                "mla_rope: rope_dim {} (even, > 0) at offset {} must fit the head stride {}",
                rope_dim, rope_offset, head_stride);
  MOELORA_CHECK(x.size(1) % head_stride == 0,
                "mla_rope x: {} columns is not a multiple of the head stride {}", x.size(1),
                head_stride);
  MOELORA_CHECK(theta > 0, "mla_rope: theta must be > 0, found {}", theta);
  check_shape(positions, {x.size(0)}, "mla_rope positions");
  if (inv_freq.defined()) {
    mla_on(inv_freq, DType::f32, dev, "mla_rope inv_freq");
    check_shape(inv_freq, {rope_dim / 2}, "mla_rope inv_freq");
  }
  MOELORA_CHECK(std::isfinite(cos_sin_scale) && cos_sin_scale > 0.0f,
                "mla_rope: cos_sin_scale must be finite and > 0, found {}", cos_sin_scale);
  return xb;
}

// Returns the cache's dims; kv is [m, row].
inline MlaCacheDims check_mla_cache_write(const Tensor& kv, const Tensor& slot_mapping,
                                          const Tensor& cache, Device dev) {
  mla_act(kv, dev, "mla_cache_write kv");
  MOELORA_CHECK(cache.defined() && cache.dim() == 4 && cache.size(2) == 1 &&
                    cache.size(3) == kv.size(1),
                "MLA cache: expected [pages, page_size, 1, {}], found {}", kv.size(1),
                cache.defined() ? cache.describe() : std::string("undefined"));
  const MlaCacheDims c = check_mla_cache(cache, dev);
  mla_on(slot_mapping, DType::i32, dev, "mla_cache_write slot_mapping");
  check_shape(slot_mapping, {kv.size(0)}, "mla_cache_write slot_mapping");
  return c;
}

// Returns L.
inline int64_t check_mla_absorb_q(const Tensor& q, const Tensor& w_kv_b, int heads, int nope,
                                  int rope, int vd, const Tensor& q_latent, Device dev) {
  check_mla_dims(heads, nope, rope, vd, "mla_absorb_q");
  const int64_t L = check_mla_kv_b(w_kv_b, dev, heads, nope, vd, "mla_absorb_q");
  mla_act(q, dev, "mla_absorb_q q");
  const int64_t m = q.size(0);
  check_shape(q, {m, int64_t(heads) * (nope + rope)}, "mla_absorb_q q");
  mla_on(q_latent, DType::f32, dev, "mla_absorb_q q_latent");
  check_shape(q_latent, {m, heads * (L + rope)}, "mla_absorb_q q_latent");
  return L;
}

struct MlaAttentionDims {
  MlaCacheDims cache;
  int64_t m = 0, L = 0, num_seqs = 0, max_pages = 0;
};

inline MlaAttentionDims check_mla_paged_attention(const Tensor& q_latent, const Tensor& cache,
                                                  const Tensor& block_table,
                                                  const Tensor& token_seq,
                                                  const Tensor& token_pos, int heads,
                                                  const Tensor& latent, Device dev) {
  mla_on(q_latent, DType::f32, dev, "mla_attention q_latent");
  MlaAttentionDims d;
  d.cache = check_mla_cache(cache, dev);
  const int64_t row = d.cache.row;
  MOELORA_CHECK(heads > 0 && q_latent.dim() == 2 && q_latent.size(1) == heads * row,
                "mla_attention q_latent: expected f32 [M, {} (heads x (L + rope))], found {}",
                int64_t(heads) * row, q_latent.describe());
  d.m = q_latent.size(0);
  mla_on(latent, DType::f32, dev, "mla_attention latent");
  MOELORA_CHECK(latent.dim() == 2 && latent.size(0) == d.m && latent.size(1) % heads == 0 &&
                    latent.size(1) / heads < row,
                "mla_attention latent: expected f32 [{}, heads x L], found {}", d.m,
                latent.describe());
  d.L = latent.size(1) / heads;
  mla_on(block_table, DType::i32, dev, "mla_attention block_table");
  MOELORA_CHECK(block_table.dim() == 2, "mla_attention block_table: expected [S, pages], found {}",
                block_table.describe());
  mla_on(token_seq, DType::i32, dev, "mla_attention token_seq");
  mla_on(token_pos, DType::i32, dev, "mla_attention token_pos");
  check_shape(token_seq, {d.m}, "mla_attention token_seq");
  check_shape(token_pos, {d.m}, "mla_attention token_pos");
  d.num_seqs = block_table.size(0);
  d.max_pages = block_table.size(1);
  return d;
}

// Returns L.
inline int64_t check_mla_absorb_v(const Tensor& latent, const Tensor& w_kv_b, int heads,
                                  int nope, int vd, const Tensor& out, Device dev) {
  check_mla_dims(heads, nope, 0, vd, "mla_absorb_v");
  const int64_t L = check_mla_kv_b(w_kv_b, dev, heads, nope, vd, "mla_absorb_v");
  mla_on(latent, DType::f32, dev, "mla_absorb_v latent");
  MOELORA_CHECK(latent.dim() == 2 && latent.size(1) == heads * L,
                "mla_absorb_v latent: expected f32 [M, {}], found {}", heads * L,
                latent.describe());
  mla_act(out, dev, "mla_absorb_v out");
  check_shape(out, {latent.size(0), int64_t(heads) * vd}, "mla_absorb_v out");
  return L;
}

struct MlaLoraOpDims {
  int64_t m = 0, L = 0;
  MlaLoraDims lora;
};

inline MlaLoraOpDims check_mla_lora_absorb_q(const Tensor& q, const Tensor& token_slot,
                                             const Tensor& A, const Tensor& B,
                                             const Tensor& ranks, int heads, int nope, int rope,
                                             int vd, const Tensor& q_latent, Device dev) {
  check_mla_dims(heads, nope, rope, vd, "mla_lora_absorb_q");
  mla_act(q, dev, "mla_lora_absorb_q q");
  MlaLoraOpDims d;
  d.m = q.size(0);
  check_shape(q, {d.m, int64_t(heads) * (nope + rope)}, "mla_lora_absorb_q q");
  mla_on(q_latent, DType::f32, dev, "mla_lora_absorb_q q_latent");
  MOELORA_CHECK(q_latent.dim() == 2 && q_latent.size(0) == d.m &&
                    q_latent.size(1) % heads == 0 && q_latent.size(1) / heads > rope,
                "mla_lora_absorb_q q_latent: expected f32 [{}, heads x (L + rope)], found {}", d.m,
                q_latent.describe());
  d.L = q_latent.size(1) / heads - rope;
  d.lora = check_mla_lora(token_slot, A, B, ranks, d.m, d.L, int64_t(heads) * (nope + vd), dev,
                          "mla_lora_absorb_q");
  return d;
}

inline MlaLoraOpDims check_mla_lora_absorb_v(const Tensor& latent, const Tensor& token_slot,
                                             const Tensor& A, const Tensor& B,
                                             const Tensor& ranks, int heads, int nope, int vd,
                                             const Tensor& out, Device dev) {
  check_mla_dims(heads, nope, 0, vd, "mla_lora_absorb_v");
  mla_on(latent, DType::f32, dev, "mla_lora_absorb_v latent");
  MOELORA_CHECK(latent.dim() == 2 && latent.size(1) % heads == 0,
                "mla_lora_absorb_v latent: expected f32 [M, heads x L], found {}",
                latent.describe());
  MlaLoraOpDims d;
  d.m = latent.size(0);
  d.L = latent.size(1) / heads;
  mla_on(out, DType::f32, dev, "mla_lora_absorb_v out");
  check_shape(out, {d.m, int64_t(heads) * vd}, "mla_lora_absorb_v out");
  d.lora = check_mla_lora(token_slot, A, B, ranks, d.m, d.L, int64_t(heads) * (nope + vd), dev,
                          "mla_lora_absorb_v");
  return d;
}

// Returns the cache's dims; the block table's width is block_table.size(1).
inline MlaCacheDims check_mla_gather_latent(const Tensor& cache, const Tensor& block_table,
                                            int seq, int64_t len, const Tensor& out,
                                            Device dev) {
  const MlaCacheDims c = check_mla_cache(cache, dev);
  mla_on(block_table, DType::i32, dev, "mla_gather_latent block_table");
  MOELORA_CHECK(block_table.dim() == 2 && seq >= 0 && seq < block_table.size(0),
                "mla_gather_latent: sequence row {} outside block_table {}", seq,
                block_table.describe());
  MOELORA_CHECK(len > 0 && len <= block_table.size(1) * c.page,
                "mla_gather_latent: {} positions exceed the block table's capacity of {}", len,
                block_table.size(1) * c.page);
  mla_on(out, DType::f32, dev, "mla_gather_latent out");
  check_shape(out, {len, c.row}, "mla_gather_latent out");
  return c;
}

struct MlaExpandedDims {
  int64_t n = 0, len = 0, row = 0, L = 0;
};

inline MlaExpandedDims check_mla_expanded_attention(const Tensor& q, const Tensor& kv_b_out,
                                                    const Tensor& latent,
                                                    const Tensor& token_pos, int heads, int nope,
                                                    int rope, int vd, const Tensor& out,
                                                    Device dev) {
  check_mla_dims(heads, nope, rope, vd, "mla_expanded_attention");
  const int64_t qk = nope + rope, wr = nope + vd;
  mla_on(q, DType::f32, dev, "mla_expanded_attention q");
  MOELORA_CHECK(q.dim() == 2 && q.size(1) == heads * qk,
                "mla_expanded_attention q: expected f32 [n, {}], found {}", heads * qk,
                q.describe());
  MlaExpandedDims d;
  d.n = q.size(0);
  mla_on(kv_b_out, DType::f32, dev, "mla_expanded_attention kv_b_out");
  MOELORA_CHECK(kv_b_out.dim() == 2 && kv_b_out.size(1) == heads * wr,
                "mla_expanded_attention kv_b_out: expected f32 [len, {}], found {}", heads * wr,
                kv_b_out.describe());
  d.len = kv_b_out.size(0);
  mla_on(latent, DType::f32, dev, "mla_expanded_attention latent");
  MOELORA_CHECK(latent.dim() == 2 && latent.size(0) == d.len && latent.size(1) > rope,
                "mla_expanded_attention latent: expected f32 [{}, L + {}], found {}", d.len, rope,
                latent.describe());
  d.row = latent.size(1);
  d.L = d.row - rope;
  mla_on(token_pos, DType::i32, dev, "mla_expanded_attention token_pos");
  check_shape(token_pos, {d.n}, "mla_expanded_attention token_pos");
  mla_on(out, DType::f32, dev, "mla_expanded_attention out");
  check_shape(out, {d.n, int64_t(heads) * vd}, "mla_expanded_attention out");
  return d;
}

// ---- DeepSeek step ops (kernels/mla_step_ops.inc) -------------------------------------------

// Returns L (the normed columns).
inline int64_t check_mla_kv_norm(const Tensor& kv, const Tensor& weight, Device dev) {
  mla_act(kv, dev, "mla_kv_norm kv");
  mla_on(weight, DType::bf16, dev, "mla_kv_norm weight");
  MOELORA_CHECK(weight.dim() == 1 && weight.size(0) > 0 && weight.size(0) <= kv.size(1),
                "mla_kv_norm weight: expected bf16 [L] with L <= {} (the columns of kv {}), "
                "found {}",
                kv.size(1), kv.describe(), weight.describe());
  return weight.size(0);
}

inline void check_grouped_router_margin(const Tensor& logits, const Tensor& correction_bias,
                                        const RouterConfig& r, const Tensor& margin,
                                        int64_t col, Device dev) {
  mla_on(logits, DType::f32, dev, "grouped_router_margin logits");
  MOELORA_CHECK(logits.dim() == 2 && logits.size(1) == r.num_experts && r.num_experts > 0,
                "grouped_router_margin logits: expected f32 [M, {} (experts)], found {}",
                r.num_experts, logits.describe());
  MOELORA_CHECK(r.top_k >= 1 && r.n_group >= 1 && r.num_experts % r.n_group == 0 &&
                    r.topk_group >= 1 && r.topk_group <= r.n_group,
                "grouped_router_margin: top_k {} >= 1, n_group {} dividing {} experts and "
                "topk_group {} in 1..n_group expected",
                r.top_k, r.n_group, r.num_experts, r.topk_group);
  MOELORA_CHECK(r.n_group == 1 || r.group_score == GroupScore::max ||
                    r.num_experts / r.n_group >= 2,
                "grouped_router_margin: a top-2-sum group score needs >= 2 experts per group, "
                "found {}",
                r.num_experts / r.n_group);
  if (r.use_correction_bias) {
    mla_on(correction_bias, DType::f32, dev, "grouped_router_margin correction_bias");
    check_shape(correction_bias, {int64_t(r.num_experts)},
                "grouped_router_margin correction_bias");
  }
  mla_on(margin, DType::f32, dev, "grouped_router_margin margin");
  MOELORA_CHECK(margin.dim() == 2 && margin.size(0) == logits.size(0) && col >= 0 &&
                    col < margin.size(1),
                "grouped_router_margin margin: expected f32 [{}, C] with column {} < C, found {}",
                logits.size(0), col, margin.describe());
}

}  // namespace moelora::detail
