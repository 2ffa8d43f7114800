// CPU reference DeepSeek step ops (kernels/mla_step_ops.inc).
#include "kernels/cpu/mla_step_ops.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "kernels/cpu/cpu_op_util.h"
#include "kernels/mla_checks.h"

namespace moelora::cpu {
namespace {

// The gap between the n-th and (n+1)-th largest of v (INFINITY when v has <= n values).
float gap_at(std::vector<double> v, int n) {
  if (int(v.size()) <= n) return INFINITY;
  std::sort(v.begin(), v.end(), std::greater<double>());
  return float(v[size_t(n) - 1] - v[size_t(n)]);
}

}  // namespace

void mla_kv_norm(Tensor& kv, const Tensor& weight, float eps, const Stream& /*stream*/) {
  const int64_t L = detail::check_mla_kv_norm(kv, weight, Device::cpu());
  const int64_t m = kv.size(0), cols = kv.size(1);
  std::vector<float> w(static_cast<size_t>(L)), row(static_cast<size_t>(L));
  bf16_row_to_f32(weight.data<bf16_t>(), L, w.data());
  const bool bf = kv.dtype() == DType::bf16;
  for (int64_t r = 0; r < m; ++r) {
    if (bf)
      bf16_row_to_f32(kv.data<bf16_t>() + r * cols, L, row.data());
    else
      std::copy_n(kv.data<float>() + r * cols, L, row.data());
    double ss = 0;  // as cpu::rms_norm
    for (int64_t i = 0; i < L; ++i) ss += double(row[size_t(i)]) * row[size_t(i)];
    const float inv = 1.0f / std::sqrt(float(ss / double(L)) + eps);
    for (int64_t i = 0; i < L; ++i) {
      const float v = row[size_t(i)] * inv * w[size_t(i)];
      if (bf)
        kv.data<bf16_t>()[r * cols + i] = float_to_bf16(v);
      else
        kv.data<float>()[r * cols + i] = v;
    }
  }
}

void grouped_router_margin(const Tensor& logits, const Tensor& correction_bias,
                           const RouterConfig& rc, Tensor& margin, int64_t col,
                           const Stream& /*stream*/) {
  detail::check_grouped_router_margin(logits, correction_bias, rc, margin, col, Device::cpu());
  const int64_t M = logits.size(0), E = rc.num_experts, cols = margin.size(1);
  const int per_group = int(E / rc.n_group);
  std::vector<double> s(static_cast<size_t>(E), 0.0);
  for (int64_t t = 0; t < M; ++t) {
    const float* l = logits.data<float>() + t * E;
    if (rc.scoring == ScoringFunc::softmax) {
      // Softmax keeps the order of the logits (and of each group's max): gaps in logits.
      for (int64_t e = 0; e < E; ++e) s[size_t(e)] = l[e];
    } else {
      for (int64_t e = 0; e < E; ++e) s[size_t(e)] = 1.0 / (1.0 + std::exp(-double(l[e])));
    }
    if (rc.use_correction_bias)
      for (int64_t e = 0; e < E; ++e) s[size_t(e)] += correction_bias.data<float>()[e];
    float m = INFINITY;
    std::vector<double> eligible = s;
    if (rc.n_group > 1) {
      std::vector<double> gs(static_cast<size_t>(rc.n_group));
      for (int g = 0; g < rc.n_group; ++g) {
        std::vector<double> in(s.begin() + g * per_group, s.begin() + (g + 1) * per_group);
        std::sort(in.begin(), in.end(), std::greater<double>());
        gs[size_t(g)] = rc.group_score == GroupScore::max ? in[0] : in[0] + in[1];
      }
      m = std::min(m, gap_at(gs, rc.topk_group));
      std::vector<int> order(static_cast<size_t>(rc.n_group));
      for (int g = 0; g < rc.n_group; ++g) order[size_t(g)] = g;
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return gs[size_t(a)] > gs[size_t(b)]; });
      eligible.clear();
      for (int r = 0; r < rc.topk_group; ++r)
        for (int i = 0; i < per_group; ++i)
          eligible.push_back(s[size_t(order[size_t(r)] * per_group + i)]);
    }
    m = std::min(m, gap_at(eligible, rc.top_k));
    margin.data<float>()[t * cols + col] = m;
  }
}

}  // namespace moelora::cpu
