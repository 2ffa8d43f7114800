// CUDA dense ops: argument checks (same rules as the CPU reference, tensors on a CUDA device),
// then the launchers in dense_ops.cu. Data-dependent checks the CPU makes on the host (token ids
// in range, cache slots, block-table entries) cannot be made here without a sync: callers own
// those invariants (the model builds these tensors itself).
#include <cmath>

#include "core/cuda_check.h"
#include "kernels/cuda/cublas_linear.h"
#include "kernels/cuda/dense_ops.h"
#include "kernels/cuda/dense_ops_launch.h"
#include "kernels/cuda/model_ops.h"

namespace moelora::cuda {
namespace {

cudaStream_t raw(const Stream& s) {
  return static_cast<cudaStream_t>(s.handle());
}

void check_gpu(const Tensor& t, const char* what) {
  MOELORA_CHECK(t.defined(), "{}: expected a tensor, found an undefined one", what);
  MOELORA_CHECK(t.device().is_cuda(), "{}: expected a CUDA tensor, found {}", what, t.describe());
  check_contiguous(t, what);
}

// f32 or bf16 on the GPU; returns whether it is bf16.
bool act(const Tensor& t, const char* what) {
  check_gpu(t, what);
  MOELORA_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::bf16,
                "{}: expected f32 or bf16, found {}", what, t.describe());
  return t.dtype() == DType::bf16;
}

void typed(const Tensor& t, DType dt, const char* what) {
  check_gpu(t, what);
  check_dtype(t, dt, what);
}

void two_d(const Tensor& t, const char* what) {
  MOELORA_CHECK(t.dim() == 2, "{}: expected a 2-d tensor, found {}", what, t.describe());
}

}  // namespace

void embedding(const Tensor& ids, const Tensor& table, Tensor& out, const Stream& stream) {
  typed(ids, DType::i32, "embedding ids");
  typed(table, DType::bf16, "embedding table");
  two_d(table, "embedding table");
  const bool ob = act(out, "embedding output");
  check_shape(out, {ids.numel(), table.size(1)}, "embedding output");
  MOELORA_CUDA_CHECK(launch_embedding(ids.data<int32_t>(), table.data(), out.data(), ob,
                                      ids.numel(), table.size(1), raw(stream)));
}

void rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor& out, const Stream& stream) {
  const bool xb = act(x, "rms_norm input");
  const bool ob = act(out, "rms_norm output");
  typed(weight, DType::bf16, "rms_norm weight");
  MOELORA_CHECK(weight.dim() == 1 && weight.size(0) > 0, "rms_norm weight: expected [D], found {}",
                weight.describe());
  const int64_t d = weight.size(0);
  MOELORA_CHECK(x.numel() % d == 0, "rms_norm input: {} is not a whole number of rows of {}",
                x.describe(), d);
  check_shape(out, x.shape(), "rms_norm output");
  MOELORA_CUDA_CHECK(launch_rms_norm(x.data(), xb, weight.data(), eps, out.data(), ob,
                                     x.numel() / d, d, raw(stream)));
}

void linear(const Tensor& x, const Tensor& w, Tensor& y, const Stream& stream) {
  const bool xb = act(x, "linear input x");
  two_d(x, "linear input x");
  typed(w, DType::bf16, "linear weight");
  two_d(w, "linear weight");
  const bool yb = act(y, "linear output y");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  MOELORA_CHECK(w.size(1) == k, "linear: weight {} does not take inputs of {} features (x is {})",
                w.describe(), k, x.describe());
  MOELORA_CHECK(k % 8 == 0, "cuda linear: in_features {} is not a multiple of 8 (16-byte loads)",
                k);
  check_shape(y, {m, n}, "linear output y");
  // Up to kGemvMaxRows rows the GEMV kernel streams the weights once per 8 rows at copy
  // bandwidth; above, cuBLAS's tensor-core GEMMs (an f32 x as two bf16 halves, so the result
  // stays faithful to f32 inputs). A bf16 y from an f32 x keeps the GEMV kernel.
  constexpr int64_t kGemvMaxRows = 8;
  if (m > kGemvMaxRows && xb) {
    cublas_linear_bf16(x.data(), w.data(), y.data(), yb, m, n, k, raw(stream));
    return;
  }
  if (m > kGemvMaxRows && !yb) {
    cublas_linear_f32(x.data<float>(), w.data(), y.data<float>(), m, n, k, raw(stream));
    return;
  }
  MOELORA_CUDA_CHECK(launch_linear(x.data(), xb, w.data(), y.data(), yb, m, n, k, raw(stream)));
}

namespace {

// The optional frequency table and cos / sin scale of rope / attention_prologue.
const float* rope_table(const Tensor& table, int head_dim, Device device, float cos_sin_scale,
                        const char* op) {
  MOELORA_CHECK(std::isfinite(cos_sin_scale) && cos_sin_scale > 0.0f,
                "{}: cos_sin_scale must be finite and > 0, found {}", op, cos_sin_scale);
  if (!table.defined()) return nullptr;
  typed(table, DType::f32, "rope inv_freq");
  check_device(table, device, "rope inv_freq");
  check_shape(table, {head_dim / 2}, "rope inv_freq");
  return table.data<float>();
}

}  // namespace

void rope(Tensor& x, int head_dim, const Tensor& positions, double theta, const Stream& stream,
          const Tensor& inv_freq, float cos_sin_scale) {
  const bool xb = act(x, "rope input x");
  two_d(x, "rope input x");
  typed(positions, DType::i32, "rope positions");
  MOELORA_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim must be even and > 0, found {}",
                head_dim);
  MOELORA_CHECK(x.size(1) % head_dim == 0,
                "rope input x: {} columns is not a multiple of head_dim {}", x.size(1), head_dim);
  MOELORA_CHECK(theta > 0, "rope: theta must be > 0, found {}", theta);
  check_shape(positions, {x.size(0)}, "rope positions");
  const float* table = rope_table(inv_freq, head_dim, x.device(), cos_sin_scale, "rope");
  MOELORA_CUDA_CHECK(launch_rope(x.data(), xb, x.size(0), x.size(1), head_dim,
                                 positions.data<int32_t>(), float(theta), table, cos_sin_scale,
                                 raw(stream)));
}

void kv_cache_write(const Tensor& k, const Tensor& v, const Tensor& slot_mapping, Tensor& k_cache,
                    Tensor& v_cache, const Stream& stream) {
  const bool kb = act(k, "kv_cache_write k");
  const bool vb = act(v, "kv_cache_write v");
  MOELORA_CHECK(kb == vb, "kv_cache_write: k is {} but v is {}", k.describe(), v.describe());
  two_d(k, "kv_cache_write k");
  const bool cb = act(k_cache, "k_cache");
  act(v_cache, "v_cache");
  MOELORA_CHECK(k_cache.dim() == 4,
                "k_cache: expected [pages, page_size, kv_heads, head_dim], found {}",
                k_cache.describe());
  check_shape(v_cache, k_cache.shape(), "v_cache");
  check_dtype(v_cache, k_cache.dtype(), "v_cache");
  const int64_t m = k.size(0), row = k_cache.size(2) * k_cache.size(3);
  check_shape(k, {m, row}, "kv_cache_write k");
  check_shape(v, {m, row}, "kv_cache_write v");
  typed(slot_mapping, DType::i32, "kv_cache_write slot_mapping");
  check_shape(slot_mapping, {m}, "kv_cache_write slot_mapping");
  MOELORA_CUDA_CHECK(launch_kv_cache_write(k.data(), kb, v.data(), vb, slot_mapping.data<int32_t>(),
                                           k_cache.data(), v_cache.data(), cb, m, row,
                                           raw(stream)));
}

void attention_prologue(Tensor& q, Tensor& k, const Tensor& v, const Tensor& q_norm,
                        const Tensor& k_norm, float eps, int head_dim, const Tensor& positions,
                        double theta, const Tensor& slot_mapping, Tensor& k_cache, Tensor& v_cache,
                        const Stream& stream, const Tensor& inv_freq, float cos_sin_scale) {
  auto norm_ok = [&](const Tensor& w) {
    return !w.defined() || (w.dtype() == DType::bf16 && w.dim() == 1 && w.size(0) == head_dim);
  };
  const bool fused = q.defined() && k.defined() && v.defined() && q.dtype() == DType::f32 &&
                     k.dtype() == DType::f32 && v.dtype() == DType::f32 && head_dim > 0 &&
                     head_dim % 2 == 0 && head_dim <= kPrologueMaxHeadDim && norm_ok(q_norm) &&
                     norm_ok(k_norm);
  if (!fused) {  // the ops one after another (they check everything and name what is wrong)
    if (q_norm.defined()) rms_norm(q, q_norm, eps, q, stream);
    if (k_norm.defined()) rms_norm(k, k_norm, eps, k, stream);
    rope(q, head_dim, positions, theta, stream, inv_freq, cos_sin_scale);
    rope(k, head_dim, positions, theta, stream, inv_freq, cos_sin_scale);
    kv_cache_write(k, v, slot_mapping, k_cache, v_cache, stream);
    return;
  }
  act(q, "attention_prologue q");
  two_d(q, "attention_prologue q");
  MOELORA_CHECK(q.size(1) % head_dim == 0,
                "attention_prologue q: {} columns is not a multiple of head_dim {}", q.size(1),
                head_dim);
  MOELORA_CHECK(theta > 0, "attention_prologue: theta must be > 0, found {}", theta);
  const bool cb = act(k_cache, "k_cache");
  act(v_cache, "v_cache");
  MOELORA_CHECK(k_cache.dim() == 4 && k_cache.size(3) == head_dim,
                "k_cache: expected [pages, page_size, kv_heads, {}], found {}", head_dim,
                k_cache.describe());
  check_shape(v_cache, k_cache.shape(), "v_cache");
  check_dtype(v_cache, k_cache.dtype(), "v_cache");
  const int64_t m = q.size(0), kv_heads = k_cache.size(2);
  check_shape(k, {m, kv_heads * head_dim}, "attention_prologue k");
  check_shape(v, {m, kv_heads * head_dim}, "attention_prologue v");
  act(k, "attention_prologue k");
  act(v, "attention_prologue v");
  for (const Tensor* t :
       std::initializer_list<const Tensor*>{&q, &k, &v, &q_norm, &k_norm, &k_cache, &v_cache})
    if (t->defined()) check_device(*t, q.device(), "attention_prologue tensors");
  typed(positions, DType::i32, "attention_prologue positions");
  check_shape(positions, {m}, "attention_prologue positions");
  typed(slot_mapping, DType::i32, "attention_prologue slot_mapping");
  check_shape(slot_mapping, {m}, "attention_prologue slot_mapping");
  AttentionPrologueArgs a{};
  a.q = q.data<float>();
  a.k = k.data<float>();
  a.v = v.data<float>();
  a.q_norm = q_norm.defined() ? q_norm.data() : nullptr;
  a.k_norm = k_norm.defined() ? k_norm.data() : nullptr;
  a.eps = eps;
  a.positions = positions.data<int32_t>();
  a.theta = float(theta);
  a.inv_freq = rope_table(inv_freq, head_dim, q.device(), cos_sin_scale, "attention_prologue");
  a.cos_sin_scale = cos_sin_scale;
  a.slot_mapping = slot_mapping.data<int32_t>();
  a.k_cache = k_cache.data();
  a.v_cache = v_cache.data();
  a.m = m;
  a.heads = int(q.size(1) / head_dim);
  a.kv_heads = int(kv_heads);
  a.head_dim = head_dim;
  MOELORA_CUDA_CHECK(launch_attention_prologue(a, cb, raw(stream)));
}

void paged_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                     const Tensor& block_table, const Tensor& token_seq, const Tensor& token_pos,
                     float scale, Tensor& out, const Stream& stream) {
  PagedAttentionArgs a{};
  a.q_bf16 = act(q, "attention q");
  two_d(q, "attention q");
  a.out_bf16 = act(out, "attention output");
  check_shape(out, q.shape(), "attention output");
  a.cache_bf16 = act(k_cache, "k_cache");
  act(v_cache, "v_cache");
  MOELORA_CHECK(k_cache.dim() == 4,
                "k_cache: expected [pages, page_size, kv_heads, head_dim], found {}",
                k_cache.describe());
  check_shape(v_cache, k_cache.shape(), "v_cache");
  check_dtype(v_cache, k_cache.dtype(), "v_cache");
  typed(block_table, DType::i32, "attention block_table");
  two_d(block_table, "attention block_table");
  a.m = q.size(0);
  a.page_size = int(k_cache.size(1));
  a.kv_heads = int(k_cache.size(2));
  a.head_dim = int(k_cache.size(3));
  MOELORA_CHECK(q.size(1) % (int64_t(a.kv_heads) * a.head_dim) == 0,
                "attention q: {} columns is not a multiple of kv_heads x head_dim = {}", q.size(1),
                int64_t(a.kv_heads) * a.head_dim);
  MOELORA_CHECK(a.head_dim <= 256, "cuda paged_attention: head_dim {} > 256 is not supported",
                a.head_dim);
  a.heads = int(q.size(1) / a.head_dim);
  a.max_pages = int(block_table.size(1));
  typed(token_seq, DType::i32, "attention token_seq");
  typed(token_pos, DType::i32, "attention token_pos");
  check_shape(token_seq, {a.m}, "attention token_seq");
  check_shape(token_pos, {a.m}, "attention token_pos");
  a.q = q.data();
  a.k_cache = k_cache.data();
  a.v_cache = v_cache.data();
  a.block_table = block_table.data<int32_t>();
  a.token_seq = token_seq.data<int32_t>();
  a.token_pos = token_pos.data<int32_t>();
  a.out = out.data();
  a.scale = scale;
  MOELORA_CUDA_CHECK(launch_paged_attention(a, raw(stream)));
}

void silu_mul(const Tensor& gate_up, Tensor& out, const Stream& stream) {
  typed(gate_up, DType::f32, "silu_mul gate_up");
  two_d(gate_up, "silu_mul gate_up");
  MOELORA_CHECK(gate_up.size(1) % 2 == 0, "silu_mul gate_up: expected [M, 2I], found {}",
                gate_up.describe());
  const bool ob = act(out, "silu_mul output");
  const int64_t m = gate_up.size(0), inter = gate_up.size(1) / 2;
  check_shape(out, {m, inter}, "silu_mul output");
  MOELORA_CUDA_CHECK(launch_silu_mul(gate_up.data<float>(), out.data(), ob, m, inter, raw(stream)));
}

void residual_add(Tensor& x, const Tensor& y, const Stream& stream) {
  const bool xb = act(x, "residual_add x");
  const bool yb = act(y, "residual_add y");
  two_d(x, "residual_add x");
  check_shape(y, x.shape(), "residual_add y");
  MOELORA_CUDA_CHECK(launch_residual_add(x.data(), xb, y.data(), yb, x.numel(), raw(stream)));
}

// ---- model step ops (kernels/model_ops.inc) ----------------------------------------------

void cast(const Tensor& x, Tensor& out, const Stream& stream) {
  const bool xb = act(x, "cast input");
  const bool ob = act(out, "cast output");
  check_shape(out, x.shape(), "cast output");
  MOELORA_CUDA_CHECK(launch_copy_rows(x.data(), xb, x.numel(), 0, nullptr, out.data(), ob, 1,
                                      x.numel(), raw(stream)));
}

void copy_columns(const Tensor& src, int64_t col, Tensor& dst, const Stream& stream) {
  const bool sb = act(src, "copy_columns src");
  const bool db = act(dst, "copy_columns dst");
  two_d(src, "copy_columns src");
  two_d(dst, "copy_columns dst");
  const int64_t m = src.size(0), n = src.size(1), w = dst.size(1);
  MOELORA_CHECK(dst.size(0) == m, "copy_columns: dst {} has {} rows, src {} has {}", dst.describe(),
                dst.size(0), src.describe(), m);
  MOELORA_CHECK(col >= 0 && col + w <= n,
                "copy_columns: columns [{}, {}) are outside src {} ({} columns)", col, col + w,
                src.describe(), n);
  MOELORA_CUDA_CHECK(
      launch_copy_rows(src.data(), sb, n, col, nullptr, dst.data(), db, m, w, raw(stream)));
}

void gather_rows(const Tensor& src, const Tensor& rows, Tensor& dst, const Stream& stream) {
  const bool sb = act(src, "gather_rows src");
  const bool db = act(dst, "gather_rows dst");
  two_d(src, "gather_rows src");
  typed(rows, DType::i32, "gather_rows rows");
  MOELORA_CHECK(rows.dim() == 1, "gather_rows rows: expected [S], found {}", rows.describe());
  const int64_t c = src.size(1), s = rows.size(0);
  check_shape(dst, {s, c}, "gather_rows dst");
  MOELORA_CUDA_CHECK(launch_copy_rows(src.data(), sb, c, 0, rows.data<int32_t>(), dst.data(), db, s,
                                      c, raw(stream)));
}

void router_margin(const Tensor& logits, int k, Tensor& margin, int64_t col, const Stream& stream) {
  typed(logits, DType::f32, "router_margin logits");
  two_d(logits, "router_margin logits");
  typed(margin, DType::f32, "router_margin margin");
  two_d(margin, "router_margin margin");
  const int64_t m = logits.size(0), e = logits.size(1), cols = margin.size(1);
  MOELORA_CHECK(margin.size(0) == m, "router_margin: margin {} has {} rows, logits {} has {}",
                margin.describe(), margin.size(0), logits.describe(), m);
  MOELORA_CHECK(col >= 0 && col < cols, "router_margin: column {} is outside margin {}", col,
                margin.describe());
  MOELORA_CHECK(k >= 1, "router_margin: k must be >= 1, found {}", k);
  MOELORA_CHECK(e >= 1 && e <= 1024,
                "cuda router_margin: {} experts; the kernel handles 1..1024 (32 per lane)", e);
  MOELORA_CUDA_CHECK(launch_router_margin(logits.data<float>(), m, int(e), k, margin.data<float>(),
                                          cols, col, raw(stream)));
}

}  // namespace moelora::cuda
