// CPU reference of the model step ops: element by element in f32, stored in the output's dtype.
#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "kernels/cpu/cpu_op_util.h"
#include "kernels/cpu/model_ops.h"

namespace moelora::cpu {
namespace {

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

float get(const Tensor& t, int64_t i) {
  return t.dtype() == DType::f32 ? t.data<float>()[i] : bf16_to_float(t.data<bf16_t>()[i]);
}

void put(Tensor& t, int64_t i, float v) {
  if (t.dtype() == DType::f32)
    t.data<float>()[i] = v;
  else
    t.data<bf16_t>()[i] = float_to_bf16(v);
}

}  // namespace

void cast(const Tensor& x, Tensor& out, const Stream& stream) {
  (void)stream;
  check_act(x, "cast input");
  check_act(out, "cast output");
  check_shape(out, x.shape(), "cast output");
  for (int64_t i = 0; i < x.numel(); ++i) put(out, i, get(x, i));
}

void copy_columns(const Tensor& src, int64_t col, Tensor& dst, const Stream& stream) {
  (void)stream;
  check_act(src, "copy_columns src");
  check_act(dst, "copy_columns dst");
  check_2d(src, "copy_columns src");
  check_2d(dst, "copy_columns dst");
  const int64_t m = src.size(0), n = src.size(1), w = dst.size(1);
  MOELORA_CHECK(dst.size(0) == m, "copy_columns: dst {} has {} rows, src {} has {}",
                dst.describe(), dst.size(0), src.describe(), m);
  MOELORA_CHECK(col >= 0 && col + w <= n,
                "copy_columns: columns [{}, {}) are outside src {} ({} columns)", col, col + w,
                src.describe(), n);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < w; ++c) put(dst, r * w + c, get(src, r * n + col + c));
}

void gather_rows(const Tensor& src, const Tensor& rows, Tensor& dst, const Stream& stream) {
  (void)stream;
  check_act(src, "gather_rows src");
  check_act(dst, "gather_rows dst");
  check_2d(src, "gather_rows src");
  check_host(rows, DType::i32, "gather_rows rows");
  MOELORA_CHECK(rows.dim() == 1, "gather_rows rows: expected [S], found {}", rows.describe());
  const int64_t m = src.size(0), c = src.size(1), s = rows.size(0);
  check_shape(dst, {s, c}, "gather_rows dst");
  const int32_t* r = rows.data<int32_t>();
  for (int64_t i = 0; i < s; ++i) {
    MOELORA_CHECK(r[i] >= 0 && r[i] < m, "gather_rows: rows[{}] = {} is outside [0, {})", i, r[i],
                  m);
    for (int64_t j = 0; j < c; ++j) put(dst, i * c + j, get(src, int64_t(r[i]) * c + j));
  }
}

void router_margin(const Tensor& logits, int k, Tensor& margin, int64_t col,
                   const Stream& stream) {
  (void)stream;
  check_host(logits, DType::f32, "router_margin logits");
  check_2d(logits, "router_margin logits");
  check_host(margin, DType::f32, "router_margin margin");
  check_2d(margin, "router_margin margin");
  const int64_t m = logits.size(0), e = logits.size(1), cols = margin.size(1);
  MOELORA_CHECK(margin.size(0) == m, "router_margin: margin {} has {} rows, logits {} has {}",
                margin.describe(), margin.size(0), logits.describe(), m);
  MOELORA_CHECK(col >= 0 && col < cols, "router_margin: column {} is outside margin {}", col,
                margin.describe());
  MOELORA_CHECK(k >= 1, "router_margin: k must be >= 1, found {}", k);
  float* out = margin.data<float>();
  if (k >= e) {
    for (int64_t t = 0; t < m; ++t) out[t * cols + col] = INFINITY;
    return;
  }
  std::vector<float> r(static_cast<size_t>(e));
  for (int64_t t = 0; t < m; ++t) {
    std::copy_n(logits.data<float>() + t * e, e, r.begin());
    std::nth_element(r.begin(), r.begin() + k, r.end(), std::greater<float>());
    const float kth = *std::min_element(r.begin(), r.begin() + k);
    out[t * cols + col] = kth - r[size_t(k)];
  }
}

}  // namespace moelora::cpu
