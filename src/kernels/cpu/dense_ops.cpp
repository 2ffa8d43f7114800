// CPU reference dense ops. Activations are read into f32 rows, computed in f32 and stored in
// the output's dtype (f32 or bf16, rounded to nearest even).
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_op_util.h"
#include "kernels/cpu/dense_ops.h"

namespace moelora::cpu {
namespace {

// A contiguous host tensor of f32 or bf16.
void check_act(const Tensor& t, const char* what) {
  MOELORA_CHECK(t.defined(), "{}: expected a tensor, found an undefined one", what);
  check_device(t, Device::cpu(), what);
  MOELORA_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::bf16,
                "{}: expected f32 or bf16, found {}", what, t.describe());
  check_contiguous(t, what);
}

void check_2d(const Tensor& t, const char* what) {
  MOELORA_CHECK(t.dim() == 2, "{}: expected a 2-d tensor, found {}", what, t.describe());
}

// Row `r` (length n) of a f32/bf16 tensor into dst.
void load_row(const Tensor& t, int64_t r, int64_t n, float* dst) {
  if (t.dtype() == DType::f32) {
    const float* s = t.data<float>() + r * n;
    std::copy(s, s + n, dst);
  } else {
    bf16_row_to_f32(t.data<bf16_t>() + r * n, n, dst);
  }
}

void store_row(Tensor& t, int64_t r, int64_t n, const float* src) {
  if (t.dtype() == DType::f32) {
    std::copy(src, src + n, t.data<float>() + r * n);
  } else {
    bf16_t* d = t.data<bf16_t>() + r * n;
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
  }
}

}  // namespace

void embedding(const Tensor& ids, const Tensor& table, Tensor& out, const Stream& stream) {
  (void)stream;
  check_host(ids, DType::i32, "embedding ids");
  check_host(table, DType::bf16, "embedding table");
  check_2d(table, "embedding table");
  check_act(out, "embedding output");
  const int64_t m = ids.numel(), v = table.size(0), h = table.size(1);
  check_shape(out, {m, h}, "embedding output");
  const int32_t* id = ids.data<int32_t>();
  std::vector<float> row(static_cast<size_t>(h));
  for (int64_t i = 0; i < m; ++i) {
    MOELORA_CHECK(id[i] >= 0 && id[i] < v,
                  "embedding: token id {} at position {} is outside the "
                  "vocabulary [0, {})",
                  id[i], i, v);
    bf16_row_to_f32(table.data<bf16_t>() + int64_t(id[i]) * h, h, row.data());
    store_row(out, i, h, row.data());
  }
}

void rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor& out, const Stream& stream) {
  (void)stream;
  check_act(x, "rms_norm input");
  check_act(out, "rms_norm output");
  check_host(weight, DType::bf16, "rms_norm weight");
  MOELORA_CHECK(weight.dim() == 1 && weight.size(0) > 0, "rms_norm weight: expected [D], found {}",
                weight.describe());
  const int64_t d = weight.size(0);
  MOELORA_CHECK(x.numel() % d == 0, "rms_norm input: {} is not a whole number of rows of {}",
                x.describe(), d);
  check_shape(out, x.shape(), "rms_norm output");
  std::vector<float> w(static_cast<size_t>(d)), row(static_cast<size_t>(d));
  bf16_row_to_f32(weight.data<bf16_t>(), d, w.data());
  const int64_t rows = x.numel() / d;
  for (int64_t r = 0; r < rows; ++r) {
    load_row(x, r, d, row.data());
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(row[i]) * row[i];
    const float inv = 1.0f / std::sqrt(float(ss / double(d)) + eps);
    for (int64_t i = 0; i < d; ++i) row[i] = row[i] * inv * w[i];
    store_row(out, r, d, row.data());
  }
}

void linear(const Tensor& x, const Tensor& w, Tensor& y, const Stream& stream) {
  (void)stream;
  check_act(x, "linear input x");
  check_2d(x, "linear input x");
  check_host(w, DType::bf16, "linear weight");
  check_2d(w, "linear weight");
  check_act(y, "linear output y");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  MOELORA_CHECK(w.size(1) == k, "linear: weight {} does not take inputs of {} features (x is {})",
                w.describe(), k, x.describe());
  check_shape(y, {m, n}, "linear output y");
  // Weights converted once per call in row blocks; each row is reused for every token.
  constexpr int64_t kRowBlock = 64;
  std::vector<float> xs(static_cast<size_t>(m * k)), wb(static_cast<size_t>(kRowBlock * k)),
      ys(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i) load_row(x, i, k, xs.data() + i * k);
  const bf16_t* wp = w.data<bf16_t>();
  for (int64_t n0 = 0; n0 < n; n0 += kRowBlock) {
    const int64_t nb = std::min(kRowBlock, n - n0);
    for (int64_t j = 0; j < nb; ++j) bf16_row_to_f32(wp + (n0 + j) * k, k, wb.data() + j * k);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < nb; ++j)
        ys[size_t(i * n + n0 + j)] = dot_f32(xs.data() + i * k, wb.data() + j * k, k);
  }
  for (int64_t i = 0; i < m; ++i) store_row(y, i, n, ys.data() + i * n);
}

void rope(Tensor& x, int head_dim, const Tensor& positions, double theta, const Stream& stream,
          const Tensor& table, float cos_sin_scale) {
  (void)stream;
  check_act(x, "rope input x");
  check_2d(x, "rope input x");
  check_host(positions, DType::i32, "rope positions");
  MOELORA_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim must be even and > 0, found {}",
                head_dim);
  MOELORA_CHECK(x.size(1) % head_dim == 0,
                "rope input x: {} columns is not a multiple of "
                "head_dim {}",
                x.size(1), head_dim);
  MOELORA_CHECK(theta > 0, "rope: theta must be > 0, found {}", theta);
  const int64_t m = x.size(0), cols = x.size(1), half = head_dim / 2;
  check_shape(positions, {m}, "rope positions");
  if (table.defined()) {
    check_host(table, DType::f32, "rope inv_freq");
    check_shape(table, {half}, "rope inv_freq");
  }
  MOELORA_CHECK(std::isfinite(cos_sin_scale) && cos_sin_scale > 0.0f,
                "rope: cos_sin_scale must be finite and > 0, found {}", cos_sin_scale);
  // inv_freq in f32 as transformers computes it (theta ** (2i / d) in f32, then 1 / that), or
  // the caller's table.
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[size_t(i)] = table.defined()
                              ? table.data<float>()[i]
                              : 1.0f / std::pow(float(theta), float(2 * i) / float(head_dim));
  std::vector<float> row(static_cast<size_t>(cols)), cs(static_cast<size_t>(half)),
      sn(static_cast<size_t>(half));
  const int32_t* pos = positions.data<int32_t>();
  for (int64_t t = 0; t < m; ++t) {
    MOELORA_CHECK(pos[t] >= 0, "rope: position {} of token {} is negative", pos[t], t);
    for (int64_t i = 0; i < half; ++i) {
      const float f = float(pos[t]) * inv_freq[size_t(i)];  // f32 product, like transformers
      cs[size_t(i)] = std::cos(f) * cos_sin_scale;          // exact at the default scale 1
      sn[size_t(i)] = std::sin(f) * cos_sin_scale;
    }
    load_row(x, t, cols, row.data());
    for (int64_t h0 = 0; h0 < cols; h0 += head_dim) {
      float* hp = row.data() + h0;
      for (int64_t i = 0; i < half; ++i) {
        const float a = hp[i], b = hp[i + half];
        hp[i] = a * cs[size_t(i)] - b * sn[size_t(i)];
        hp[i + half] = b * cs[size_t(i)] + a * sn[size_t(i)];
      }
    }
    store_row(x, t, cols, row.data());
  }
}

void kv_cache_write(const Tensor& k, const Tensor& v, const Tensor& slot_mapping, Tensor& k_cache,
                    Tensor& v_cache, const Stream& stream) {
  (void)stream;
  check_act(k, "kv_cache_write k");
  check_act(v, "kv_cache_write v");
  check_2d(k, "kv_cache_write k");
  check_act(k_cache, "k_cache");
  check_act(v_cache, "v_cache");
  MOELORA_CHECK(k_cache.dim() == 4,
                "k_cache: expected [pages, page_size, kv_heads, head_dim], "
                "found {}",
                k_cache.describe());
  check_shape(v_cache, k_cache.shape(), "v_cache");
  MOELORA_CHECK(k_cache.dtype() == v_cache.dtype(), "v_cache: dtype {} differs from k_cache {}",
                dtype_name(v_cache.dtype()), dtype_name(k_cache.dtype()));
  const int64_t m = k.size(0), row = k_cache.size(2) * k_cache.size(3);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  check_shape(k, {m, row}, "kv_cache_write k");
  check_shape(v, {m, row}, "kv_cache_write v");
  check_host(slot_mapping, DType::i32, "kv_cache_write slot_mapping");
  check_shape(slot_mapping, {m}, "kv_cache_write slot_mapping");
  const int32_t* sm = slot_mapping.data<int32_t>();
  std::vector<float> buf(static_cast<size_t>(row));
  Tensor kc = k_cache.view({num_slots, row}), vc = v_cache.view({num_slots, row});
  for (int64_t t = 0; t < m; ++t) {
    if (sm[t] == -1) continue;  // a padding row
    MOELORA_CHECK(sm[t] >= 0 && sm[t] < num_slots,
                  "kv_cache_write: slot_mapping[{}]={} outside "
                  "the cache's {} slots",
                  t, sm[t], num_slots);
    load_row(k, t, row, buf.data());
    store_row(kc, sm[t], row, buf.data());
    load_row(v, t, row, buf.data());
    store_row(vc, sm[t], row, buf.data());
  }
}

void attention_prologue(Tensor& q, Tensor& k, const Tensor& v, const Tensor& q_norm,
                        const Tensor& k_norm, float eps, int head_dim, const Tensor& positions,
                        double theta, const Tensor& slot_mapping, Tensor& k_cache, Tensor& v_cache,
                        const Stream& stream, const Tensor& inv_freq, float cos_sin_scale) {
  if (q_norm.defined()) rms_norm(q, q_norm, eps, q, stream);
  if (k_norm.defined()) rms_norm(k, k_norm, eps, k, stream);
  rope(q, head_dim, positions, theta, stream, inv_freq, cos_sin_scale);
  rope(k, head_dim, positions, theta, stream, inv_freq, cos_sin_scale);
  kv_cache_write(k, v, slot_mapping, k_cache, v_cache, stream);
}

void paged_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                     const Tensor& block_table, const Tensor& token_seq, const Tensor& token_pos,
                     float scale, Tensor& out, const Stream& stream) {
  (void)stream;
  check_act(q, "attention q");
  check_2d(q, "attention q");
  check_act(out, "attention output");
  check_shape(out, q.shape(), "attention output");
  check_act(k_cache, "k_cache");
  check_act(v_cache, "v_cache");
  MOELORA_CHECK(k_cache.dim() == 4,
                "k_cache: expected [pages, page_size, kv_heads, head_dim], "
                "found {}",
                k_cache.describe());
  check_shape(v_cache, k_cache.shape(), "v_cache");
  check_host(block_table, DType::i32, "attention block_table");
  check_2d(block_table, "attention block_table");
  const int64_t m = q.size(0), pages = k_cache.size(0), page = k_cache.size(1);
  const int64_t kvh = k_cache.size(2), d = k_cache.size(3);
  MOELORA_CHECK(q.size(1) % (kvh * d) == 0,
                "attention q: {} columns is not a multiple of "
                "kv_heads x head_dim = {}",
                q.size(1), kvh * d);
  const int64_t heads = q.size(1) / d, group = heads / kvh;
  const int64_t num_seqs = block_table.size(0), max_pages = block_table.size(1);
  check_host(token_seq, DType::i32, "attention token_seq");
  check_host(token_pos, DType::i32, "attention token_pos");
  check_shape(token_seq, {m}, "attention token_seq");
  check_shape(token_pos, {m}, "attention token_pos");
  const int32_t* seq = token_seq.data<int32_t>();
  const int32_t* pos = token_pos.data<int32_t>();
  const int32_t* bt = block_table.data<int32_t>();

  const int64_t kv_row = kvh * d;
  Tensor kc = k_cache.view({pages * page, kv_row}), vc = v_cache.view({pages * page, kv_row});
  std::vector<float> qrow(static_cast<size_t>(heads * d)), orow(static_cast<size_t>(heads * d)),
      keys, vals, p;
  for (int64_t t = 0; t < m; ++t) {
    MOELORA_CHECK(seq[t] >= 0 && seq[t] < num_seqs,
                  "attention: token_seq[{}]={} outside the "
                  "block table's {} sequences",
                  t, seq[t], num_seqs);
    const int64_t len = int64_t(pos[t]) + 1;
    MOELORA_CHECK(pos[t] >= 0 && len <= max_pages * page,
                  "attention: token_pos[{}]={} outside "
                  "the block table's capacity of {} positions",
                  t, pos[t], max_pages * page);
    // Gather this token's keys and values (all KV heads) into f32 rows.
    keys.resize(static_cast<size_t>(len * kv_row));
    vals.resize(static_cast<size_t>(len * kv_row));
    for (int64_t j = 0; j < len; ++j) {
      const int32_t pg = bt[seq[t] * max_pages + j / page];
      MOELORA_CHECK(pg >= 0 && pg < pages,
                    "attention: block_table[{}, {}]={} is not a page of "
                    "the cache (0..{})",
                    seq[t], j / page, pg, pages - 1);
      const int64_t slot = int64_t(pg) * page + j % page;
      load_row(kc, slot, kv_row, keys.data() + j * kv_row);
      load_row(vc, slot, kv_row, vals.data() + j * kv_row);
    }
    load_row(q, t, heads * d, qrow.data());
    p.resize(static_cast<size_t>(len));
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kh = h / group;
      const float* qh = qrow.data() + h * d;
      float mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        p[size_t(j)] = dot_f32(qh, keys.data() + j * kv_row + kh * d, d) * scale;
        mx = std::max(mx, p[size_t(j)]);
      }
      double sum = 0;
      for (int64_t j = 0; j < len; ++j) {
        p[size_t(j)] = std::exp(p[size_t(j)] - mx);
        sum += p[size_t(j)];
      }
      float* oh = orow.data() + h * d;
      std::fill(oh, oh + d, 0.0f);
      for (int64_t j = 0; j < len; ++j) {
        const float w = float(p[size_t(j)] / sum);
        const float* vh = vals.data() + j * kv_row + kh * d;
        for (int64_t c = 0; c < d; ++c) oh[c] += w * vh[c];
      }
    }
    store_row(out, t, heads * d, orow.data());
  }
}

void silu_mul(const Tensor& gate_up, Tensor& out, const Stream& stream) {
  (void)stream;
  check_host(gate_up, DType::f32, "silu_mul gate_up");
  check_2d(gate_up, "silu_mul gate_up");
  check_act(out, "silu_mul output");
  const int64_t m = gate_up.size(0), inter = gate_up.size(1) / 2;
  MOELORA_CHECK(gate_up.size(1) % 2 == 0, "silu_mul gate_up: expected [M, 2I], found {}",
                gate_up.describe());
  check_shape(out, {m, inter}, "silu_mul output");
  std::vector<float> row(static_cast<size_t>(inter));
  const float* g = gate_up.data<float>();
  for (int64_t t = 0; t < m; ++t) {
    const float* gt = g + t * 2 * inter;
    for (int64_t i = 0; i < inter; ++i) {
      const float a = gt[i];
      row[size_t(i)] = a / (1.0f + std::exp(-a)) * gt[inter + i];
    }
    store_row(out, t, inter, row.data());
  }
}

void residual_add(Tensor& x, const Tensor& y, const Stream& stream) {
  (void)stream;
  check_act(x, "residual_add x");
  check_act(y, "residual_add y");
  check_2d(x, "residual_add x");
  check_shape(y, x.shape(), "residual_add y");
  const int64_t m = x.size(0), h = x.size(1);
  std::vector<float> a(static_cast<size_t>(h)), b(static_cast<size_t>(h));
  for (int64_t t = 0; t < m; ++t) {
    load_row(x, t, h, a.data());
    load_row(y, t, h, b.data());
    for (int64_t i = 0; i < h; ++i) a[size_t(i)] += b[size_t(i)];
    store_row(x, t, h, a.data());
  }
}

}  // namespace moelora::cpu
