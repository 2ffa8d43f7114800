// CPU reference MLA ops (src/kernels/mla_ops.inc): plain loops, f32 accumulation.
#include "kernels/cpu/mla_ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_op_util.h"
#include "kernels/mla_checks.h"

namespace moelora::cpu {

using namespace detail;

namespace {

const Device kCpu = Device::cpu();

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

// The token slots index the pool: -1 or a slot.
void check_token_slots(const Tensor& token_slot, int64_t slots, const char* op) {
  const int32_t* ts = token_slot.data<int32_t>();
  for (int64_t t = 0; t < token_slot.numel(); ++t)
    MOELORA_CHECK(ts[t] >= -1 && ts[t] < slots,
                  "{}: token_slot[{}] = {}: expected -1 or 0..{}", op, t, ts[t], slots - 1);
}

}  // namespace

void mla_rope(Tensor& x, int head_stride, int rope_offset, int rope_dim, const Tensor& positions,
              double theta, bool interleaved, const Stream& /*stream*/, const Tensor& table,
              float cos_sin_scale) {
  check_mla_rope(x, head_stride, rope_offset, rope_dim, positions, theta, kCpu, table,
                 cos_sin_scale);
  const int64_t m = x.size(0), cols = x.size(1), half = rope_dim / 2;
  // inv_freq in f32 as transformers computes it (or the caller's table).
  std::vector<float> inv_freq(static_cast<size_t>(half)), cs(static_cast<size_t>(half)),
      sn(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[size_t(i)] = table.defined()
                              ? table.data<float>()[i]
                              : 1.0f / std::pow(float(theta), float(2 * i) / float(rope_dim));
  std::vector<float> row(static_cast<size_t>(cols));
  const int32_t* pos = positions.data<int32_t>();
  for (int64_t t = 0; t < m; ++t) {
    MOELORA_CHECK(pos[t] >= 0, "mla_rope: position {} of token {} is negative", pos[t], t);
    for (int64_t i = 0; i < half; ++i) {
      const float f = float(pos[t]) * inv_freq[size_t(i)];
      cs[size_t(i)] = std::cos(f) * cos_sin_scale;  // exact at the default scale 1
      sn[size_t(i)] = std::sin(f) * cos_sin_scale;
    }
    load_row(x, t, cols, row.data());
    for (int64_t h0 = 0; h0 < cols; h0 += head_stride) {
      float* p = row.data() + h0 + rope_offset;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
        const float a = p[ia], b = p[ib];
        p[ia] = a * cs[size_t(i)] - b * sn[size_t(i)];
        p[ib] = b * cs[size_t(i)] + a * sn[size_t(i)];
      }
    }
    store_row(x, t, cols, row.data());
  }
}

void mla_cache_write(const Tensor& kv, const Tensor& slot_mapping, Tensor& cache,
                     const Stream& /*stream*/) {
  const MlaCacheDims cd = check_mla_cache_write(kv, slot_mapping, cache, kCpu);
  const int64_t m = kv.size(0), row = kv.size(1), slots = cd.pages * cd.page;
  const int32_t* sm = slot_mapping.data<int32_t>();
  Tensor c = cache.view({slots, row});
  std::vector<float> buf(static_cast<size_t>(row));
  for (int64_t t = 0; t < m; ++t) {
    if (sm[t] == -1) continue;  // a padding row
    MOELORA_CHECK(sm[t] >= 0 && sm[t] < slots,
                  "mla_cache_write: slot_mapping[{}]={} outside the cache's {} slots", t, sm[t],
                  slots);
    load_row(kv, t, row, buf.data());
    store_row(c, sm[t], row, buf.data());
  }
}

void mla_absorb_q(const Tensor& q, const Tensor& w_kv_b, int heads, int nope, int rope, int vd,
                  Tensor& q_latent, const Stream& /*stream*/) {
  const int64_t L = check_mla_absorb_q(q, w_kv_b, heads, nope, rope, vd, q_latent, kCpu);
  const int64_t m = q.size(0), qk = nope + rope;
  const bf16_t* w = w_kv_b.data<bf16_t>();
  std::vector<float> qr(size_t(heads * qk)), acc(static_cast<size_t>(L));
  for (int64_t t = 0; t < m; ++t) {
    load_row(q, t, heads * qk, qr.data());
    float* out = q_latent.data<float>() + t * heads * (L + rope);
    for (int64_t h = 0; h < heads; ++h) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      // q_lat[c] = sum_i q_nope[i] * W_UK[h][i, c]
      for (int64_t i = 0; i < nope; ++i) {
        const float qi = qr[size_t(h * qk + i)];
        const bf16_t* wr = w + (h * (nope + vd) + i) * L;
        for (int64_t c = 0; c < L; ++c) acc[size_t(c)] += qi * bf16_to_float(wr[c]);
      }
      float* o = out + h * (L + rope);
      std::copy(acc.begin(), acc.end(), o);
      std::copy_n(qr.data() + h * qk + nope, rope, o + L);
    }
  }
}

void mla_paged_attention(const Tensor& q_latent, const Tensor& cache, const Tensor& block_table,
                         const Tensor& token_seq, const Tensor& token_pos, int heads, float scale,
                         Tensor& latent, const Stream& /*stream*/) {
  const MlaAttentionDims d = check_mla_paged_attention(q_latent, cache, block_table, token_seq,
                                                       token_pos, heads, latent, kCpu);
  const int64_t pages = d.cache.pages, page = d.cache.page, row = d.cache.row;
  const int64_t m = d.m, L = d.L, num_seqs = d.num_seqs, max_pages = d.max_pages;
  const int32_t* seq = token_seq.data<int32_t>();
  const int32_t* pos = token_pos.data<int32_t>();
  const int32_t* bt = block_table.data<int32_t>();
  Tensor c = cache.view({pages * page, row});
  std::vector<float> kv, p;
  for (int64_t t = 0; t < m; ++t) {
    MOELORA_CHECK(seq[t] >= 0 && seq[t] < num_seqs,
                  "mla_attention: token_seq[{}]={} outside the block table's {} sequences", t,
                  seq[t], num_seqs);
    const int64_t len = int64_t(pos[t]) + 1;
    MOELORA_CHECK(pos[t] >= 0 && len <= max_pages * page,
                  "mla_attention: token_pos[{}]={} outside the block table's capacity of {}", t,
                  pos[t], max_pages * page);
    kv.resize(size_t(len * row));
    for (int64_t j = 0; j < len; ++j) {
      const int32_t pg = bt[seq[t] * max_pages + j / page];
      MOELORA_CHECK(pg >= 0 && pg < pages,
                    "mla_attention: block_table[{}, {}]={} is not a page of the cache (0..{})",
                    seq[t], j / page, pg, pages - 1);
      load_row(c, int64_t(pg) * page + j % page, row, kv.data() + j * row);
    }
    p.resize(static_cast<size_t>(len));
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = q_latent.data<float>() + (t * heads + h) * row;
      float mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        p[size_t(j)] = dot_f32(qh, kv.data() + j * row, row) * scale;
        mx = std::max(mx, p[size_t(j)]);
      }
      double sum = 0;
      for (int64_t j = 0; j < len; ++j) {
        p[size_t(j)] = std::exp(p[size_t(j)] - mx);
        sum += p[size_t(j)];
      }
      float* o = latent.data<float>() + (t * heads + h) * L;
      std::fill(o, o + L, 0.0f);
      for (int64_t j = 0; j < len; ++j) {
        const float w = float(p[size_t(j)] / sum);
        const float* cr = kv.data() + j * row;
        for (int64_t i = 0; i < L; ++i) o[i] += w * cr[i];
      }
    }
  }
}

void mla_absorb_v(const Tensor& latent, const Tensor& w_kv_b, int heads, int nope, int vd,
                  Tensor& out, const Stream& /*stream*/) {
  const int64_t L = check_mla_absorb_v(latent, w_kv_b, heads, nope, vd, out, kCpu);
  const int64_t m = latent.size(0);
  const bf16_t* w = w_kv_b.data<bf16_t>();
  std::vector<float> o(size_t(heads * vd));
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* lt = latent.data<float>() + (t * heads + h) * L;
      for (int64_t i = 0; i < vd; ++i)
        o[size_t(h * vd + i)] = dot_f32_bf16(lt, w + (h * (nope + vd) + nope + i) * L, L);
    }
    store_row(out, t, heads * vd, o.data());
  }
}

void mla_lora_absorb_q(const Tensor& q, const Tensor& token_slot, const Tensor& A,
                       const Tensor& B, const Tensor& ranks, int heads, int nope, int rope,
                       int vd, Tensor& q_latent, const Stream& /*stream*/) {
  const MlaLoraOpDims d = check_mla_lora_absorb_q(q, token_slot, A, B, ranks, heads, nope, rope,
                                                  vd, q_latent, kCpu);
  check_token_slots(token_slot, d.lora.slots, "mla_lora_absorb_q");
  const int64_t m = d.m, qk = nope + rope, L = d.L;
  const MlaLoraDims lv = d.lora;
  const int32_t* ts = token_slot.data<int32_t>();
  std::vector<float> qr(size_t(heads * qk)), u(static_cast<size_t>(lv.r)), ar(static_cast<size_t>(L));
  for (int64_t t = 0; t < m; ++t) {
    const int s = ts[t];
    if (s < 0) continue;
    const int rank = ranks.data<int32_t>()[s];
    if (rank == 0) continue;
    load_row(q, t, heads * qk, qr.data());
    for (int64_t h = 0; h < heads; ++h) {
      // u = q_nope[h] . B_K[h]  ([rank])
      std::fill(u.begin(), u.end(), 0.0f);
      for (int64_t i = 0; i < nope; ++i) {
        const float qi = qr[size_t(h * qk + i)];
        const bf16_t* br = B.data<bf16_t>() + (s * B.size(1) + h * (nope + vd) + i) * lv.r;
        for (int r = 0; r < rank; ++r) u[size_t(r)] += qi * bf16_to_float(br[r]);
      }
      float* o = q_latent.data<float>() + (t * heads + h) * (L + rope);
      for (int r = 0; r < rank; ++r) {
        bf16_row_to_f32(A.data<bf16_t>() + (int64_t(s) * lv.r + r) * L, L, ar.data());
        for (int64_t c = 0; c < L; ++c) o[c] += u[size_t(r)] * ar[size_t(c)];
      }
    }
  }
}

void mla_lora_absorb_v(const Tensor& latent, const Tensor& token_slot, const Tensor& A,
                       const Tensor& B, const Tensor& ranks, int heads, int nope, int vd,
                       Tensor& out, const Stream& /*stream*/) {
  const MlaLoraOpDims d = check_mla_lora_absorb_v(latent, token_slot, A, B, ranks, heads, nope,
                                                  vd, out, kCpu);
  check_token_slots(token_slot, d.lora.slots, "mla_lora_absorb_v");
  const int64_t m = d.m, L = d.L;
  const MlaLoraDims lv = d.lora;
  const int32_t* ts = token_slot.data<int32_t>();
  std::vector<float> u(static_cast<size_t>(lv.r));
  for (int64_t t = 0; t < m; ++t) {
    const int s = ts[t];
    if (s < 0) continue;
    const int rank = ranks.data<int32_t>()[s];
    for (int64_t h = 0; h < heads; ++h) {
      const float* lt = latent.data<float>() + (t * heads + h) * L;
      // u = A . latent[h]  ([rank])
      for (int r = 0; r < rank; ++r)
        u[size_t(r)] = dot_f32_bf16(lt, A.data<bf16_t>() + (int64_t(s) * lv.r + r) * L, L);
      float* o = out.data<float>() + (t * heads + h) * vd;
      for (int64_t i = 0; i < vd; ++i) {
        const bf16_t* br = B.data<bf16_t>() + (s * B.size(1) + h * (nope + vd) + nope + i) * lv.r;
        float acc = 0.0f;
        for (int r = 0; r < rank; ++r) acc += u[size_t(r)] * bf16_to_float(br[r]);
        o[i] += acc;
      }
    }
  }
}


void mla_gather_latent(const Tensor& cache, const Tensor& block_table, int seq, int64_t len,
                       Tensor& out, const Stream& /*stream*/) {
  const MlaCacheDims cd = check_mla_gather_latent(cache, block_table, seq, len, out, kCpu);
  const int64_t pages = cd.pages, page = cd.page, row = cd.row, max_pages = block_table.size(1);
  const int32_t* bt = block_table.data<int32_t>() + int64_t(seq) * max_pages;
  Tensor c = cache.view({pages * page, row});
  for (int64_t j = 0; j < len; ++j) {
    const int32_t pg = bt[j / page];
    MOELORA_CHECK(pg >= 0 && pg < pages,
                  "mla_gather_latent: block_table[{}, {}]={} is not a page of the cache (0..{})",
                  seq, j / page, pg, pages - 1);
    load_row(c, int64_t(pg) * page + j % page, row, out.data<float>() + j * row);
  }
}

void mla_expanded_attention(const Tensor& q, const Tensor& kv_b_out, const Tensor& latent,
                            const Tensor& token_pos, int heads, int nope, int rope, int vd,
                            float scale, Tensor& out, const Stream& /*stream*/) {
  const MlaExpandedDims d = check_mla_expanded_attention(q, kv_b_out, latent, token_pos, heads,
                                                         nope, rope, vd, out, kCpu);
  const int64_t qk = nope + rope, wr = nope + vd, n = d.n, len = d.len, row = d.row, L = d.L;
  const int32_t* pos = token_pos.data<int32_t>();
  const float* kvb = kv_b_out.data<float>();
  std::vector<float> p;
  for (int64_t t = 0; t < n; ++t) {
    MOELORA_CHECK(pos[t] >= 0 && pos[t] < len,
                  "mla_expanded_attention: token_pos[{}]={} outside the {} expanded positions", t,
                  pos[t], len);
    const int64_t cnt = int64_t(pos[t]) + 1;
    p.resize(static_cast<size_t>(cnt));
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = q.data<float>() + t * heads * qk + h * qk;
      float mx = -INFINITY;
      for (int64_t j = 0; j < cnt; ++j) {
        const float s = dot_f32(qh, kvb + j * heads * wr + h * wr, nope) +
                        dot_f32(qh + nope, latent.data<float>() + j * row + L, rope);
        p[size_t(j)] = s * scale;
        mx = std::max(mx, p[size_t(j)]);
      }
      double sum = 0;
      for (int64_t j = 0; j < cnt; ++j) {
        p[size_t(j)] = std::exp(p[size_t(j)] - mx);
        sum += p[size_t(j)];
      }
      float* o = out.data<float>() + (t * heads + h) * vd;
      std::fill(o, o + vd, 0.0f);
      for (int64_t j = 0; j < cnt; ++j) {
        const float w = float(p[size_t(j)] / sum);
        const float* v = kvb + j * heads * wr + h * wr + nope;
        for (int64_t i = 0; i < vd; ++i) o[i] += w * v[i];
      }
    }
  }
}

}  // namespace moelora::cpu
