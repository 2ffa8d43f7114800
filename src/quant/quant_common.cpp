#include "moelora/quant/quant_common.h"

#include <algorithm>
#include <numeric>

#include <fmt/format.h>

#include "quant/quant_util.h"

namespace moelora::quant {

std::string describe(const QuantDims& d) {
  return fmt::format(
      "n={} k={} bits={} pack={} packed=[{}, {}] groups={}x{} ({} along N, {} along K)", d.n, d.k,
      d.bits, d.pack, d.packed_rows, d.packed_cols, d.group_n, d.group_size, d.num_groups_n,
      d.num_groups);
}

ActOrder act_order_from_g_idx(const Tensor& g_idx, int64_t k, int64_t num_groups,
                              int64_t group_size, const std::string& name) {
  detail::check_tensor(g_idx, name, DType::i32, {k}, "one group index per input channel");
  const int32_t* g = g_idx.data<int32_t>();
  ActOrder a;
  std::vector<int64_t> count(size_t(num_groups), 0);
  for (int64_t i = 0; i < k; ++i) {
    MOELORA_CHECK(g[i] >= 0 && g[i] < num_groups,
                  "{}[{}]: expected a group index in [0, {}), found {}", name, i, num_groups, g[i]);
    if (i > 0 && g[i] < g[i - 1]) a.monotonic = false;
    ++count[size_t(g[i])];
  }
  a.group_start.assign(size_t(num_groups) + 1, 0);
  for (int64_t j = 0; j < num_groups; ++j) {
    a.group_start[size_t(j) + 1] = a.group_start[size_t(j)] + int32_t(count[size_t(j)]);
    if (count[size_t(j)] != group_size) a.uniform = false;
  }
  a.perm.resize(size_t(k));
  std::iota(a.perm.begin(), a.perm.end(), 0);
  std::stable_sort(a.perm.begin(), a.perm.end(), [g](int32_t x, int32_t y) { return g[x] < g[y]; });
  return a;
}

std::vector<int32_t> g_idx_from_perm(const std::vector<int32_t>& perm, int64_t group_size) {
  MOELORA_CHECK(group_size > 0, "g_idx_from_perm: group_size must be > 0, found {}", group_size);
  const int64_t k = int64_t(perm.size());
  std::vector<int32_t> g(size_t(k), -1);
  for (int64_t i = 0; i < k; ++i) {
    const int32_t c = perm[size_t(i)];
    MOELORA_CHECK(c >= 0 && c < k && g[size_t(c)] < 0,
                  "act-order permutation: entry {} = {} is out of [0, {}) or repeated", i, c, k);
    g[size_t(c)] = int32_t(i / group_size);
  }
  return g;
}

namespace detail {

void check_host_tensor(const Tensor& t, const std::string& name) {
  MOELORA_CHECK(t.defined(), "{}: tensor is missing", name);
  MOELORA_CHECK(t.device().is_cpu(), "{}: expected a host tensor, found {}", name, t.describe());
  MOELORA_CHECK(t.is_contiguous(), "{}: expected a contiguous tensor, found {}", name,
                t.describe());
}

void check_tensor(const Tensor& t, const std::string& name, DType dtype, const Shape& shape,
                  const std::string& why) {
  check_host_tensor(t, name);
  const std::string because = why.empty() ? "" : " (" + why + ")";
  MOELORA_CHECK(t.dtype() == dtype, "{}: expected dtype {}, found {}{}", name, dtype_name(dtype),
                dtype_name(t.dtype()), because);
  MOELORA_CHECK(t.shape() == shape, "{}: expected shape {}, found {}{}", name, shape_str(shape),
                shape_str(t.shape()), because);
}

void check_float_tensor(const Tensor& t, const std::string& name, const Shape& shape,
                        const std::string& why) {
  check_host_tensor(t, name);
  const std::string because = why.empty() ? "" : " (" + why + ")";
  const DType d = t.dtype();
  MOELORA_CHECK(d == DType::f16 || d == DType::bf16 || d == DType::f32,
                "{}: expected dtype f16, bf16 or f32, found {}{}", name, dtype_name(d), because);
  MOELORA_CHECK(t.shape() == shape, "{}: expected shape {}, found {}{}", name, shape_str(shape),
                shape_str(t.shape()), because);
}

void check_finite(const Tensor& t, const std::string& name, bool positive) {
  const int64_t cols = t.dim() >= 2 ? t.size(-1) : 1;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const float v = float_at(t, i);
    MOELORA_CHECK(std::isfinite(v), "{}[{}, {}]: expected a finite scale, found {}", name, i / cols,
                  i % cols, v);
    MOELORA_CHECK(!positive || v > 0.0f, "{}[{}, {}]: expected a positive scale, found {}", name,
                  i / cols, i % cols, v);
  }
}

std::vector<float> weight_values(const Tensor& w, const char* what, int64_t& n, int64_t& k) {
  check_host_tensor(w, what);
  MOELORA_CHECK(w.dim() == 2, "{}: expected a 2-D weight [N, K], found {}", what, w.describe());
  const DType d = w.dtype();
  MOELORA_CHECK(d == DType::f16 || d == DType::bf16 || d == DType::f32,
                "{}: expected a bf16, f16 or f32 weight, found {}", what, dtype_name(d));
  n = w.size(0);
  k = w.size(1);
  std::vector<float> v(size_t(w.numel()));
  for (int64_t i = 0; i < w.numel(); ++i) {
    v[size_t(i)] = float_at(w, i);
    MOELORA_CHECK(std::isfinite(v[size_t(i)]), "{}[{}, {}]: cannot quantize a non-finite value {}",
                  what, i / k, i % k, v[size_t(i)]);
  }
  return v;
}

}  // namespace detail
}  // namespace moelora::quant
