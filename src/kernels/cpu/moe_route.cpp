// CPU reference router: softmax or sigmoid scores, optional group-limited selection,
// top-k with ties to the lowest expert id, renormalization and scaling. Scores in double.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "kernels/cpu/cpu_op_util.h"
#include "kernels/cpu/moe_ops.h"

namespace moelora::cpu {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// True when expert a ranks before expert b by `score` (descending, ties: lower id first).
struct ByScore {
  const double* score;
  bool operator()(int a, int b) const { return score[a] != score[b] ? score[a] > score[b] : a < b; }
};

// Group-limited routing: masks (to -inf) the experts of every group outside the topk_group
// best ones. Excluded experts get -inf rather than HF's masked_fill(0.0): the two differ only
// when every allowed biased score is negative, where 0.0 would let excluded experts win.
void mask_groups(const RouterConfig& cfg, std::vector<double>& choice) {
  const int per_group = cfg.num_experts / cfg.n_group;
  std::vector<double> group_score(static_cast<size_t>(cfg.n_group));
  for (int g = 0; g < cfg.n_group; ++g) {
    const double* c = choice.data() + size_t(g) * per_group;
    double best = kNegInf, second = kNegInf;
    for (int i = 0; i < per_group; ++i) {
      if (c[i] > best) {
        second = best;
        best = c[i];
      } else if (c[i] > second) {
        second = c[i];
      }
    }
    group_score[size_t(g)] = cfg.group_score == GroupScore::max ? best : best + second;
  }
  std::vector<int> order(static_cast<size_t>(cfg.n_group));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), ByScore{group_score.data()});
  for (size_t r = size_t(cfg.topk_group); r < order.size(); ++r) {
    double* c = choice.data() + size_t(order[r]) * per_group;
    std::fill(c, c + per_group, kNegInf);
  }
}

}  // namespace

void moe_route(const Tensor& logits, const Tensor& correction_bias, const RouterConfig& cfg,
               TopK& topk, const Stream& stream) {
  (void)stream;
  cfg.validate();
  check_host(logits, DType::f32, "router logits");
  MOELORA_CHECK(logits.dim() == 2 && logits.size(1) == cfg.num_experts,
                "router logits: expected [M, {}] (num_experts), found {}", cfg.num_experts,
                logits.describe());
  const int64_t M = logits.size(0);
  const int E = cfg.num_experts, k = cfg.top_k;
  check_host(topk.ids, DType::i32, "router topk.ids");
  check_shape(topk.ids, {M, k}, "router topk.ids");
  check_host(topk.weights, DType::f32, "router topk.weights");
  check_shape(topk.weights, {M, k}, "router topk.weights");
  const float* bias = nullptr;
  if (cfg.use_correction_bias) {
    MOELORA_CHECK(correction_bias.defined(),
                  "router: use_correction_bias is set but no correction_bias (f32 [{}]) was given",
                  E);
    check_host(correction_bias, DType::f32, "router correction_bias");
    check_shape(correction_bias, {E}, "router correction_bias");
    bias = correction_bias.data<float>();
    for (int e = 0; e < E; ++e)
      MOELORA_CHECK(std::isfinite(bias[e]), "router correction_bias[{}] is {} (expected finite)", e,
                    bias[e]);
  }

  const float* lg = logits.data<float>();
  int32_t* ids = topk.ids.data<int32_t>();
  float* wts = topk.weights.data<float>();
  std::vector<double> score(static_cast<size_t>(E)), choice(static_cast<size_t>(E));
  std::vector<int> order(static_cast<size_t>(E));
  for (int64_t t = 0; t < M; ++t) {
    const float* row = lg + t * E;
    // NaN (and +-inf, which turn softmax into NaN) would pick arbitrary experts silently.
    for (int e = 0; e < E; ++e)
      MOELORA_CHECK(std::isfinite(row[e]),
                    "router logits: token {} expert {} is {} (expected finite)", t, e, row[e]);
    if (cfg.scoring == ScoringFunc::softmax) {
      const double mx = *std::max_element(row, row + E);
      double sum = 0;
      for (int e = 0; e < E; ++e) sum += score[size_t(e)] = std::exp(double(row[e]) - mx);
      for (int e = 0; e < E; ++e) score[size_t(e)] /= sum;
    } else {
      for (int e = 0; e < E; ++e) score[size_t(e)] = 1.0 / (1.0 + std::exp(-double(row[e])));
    }
    for (int e = 0; e < E; ++e) choice[size_t(e)] = score[size_t(e)] + (bias ? bias[e] : 0.0);
    if (cfg.n_group > 1) mask_groups(cfg, choice);

    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), ByScore{choice.data()});
    double sum = 0;
    for (int j = 0; j < k; ++j) sum += score[size_t(order[size_t(j)])];
    double denom = 1.0;
    if (cfg.renormalize) denom = cfg.scoring == ScoringFunc::softmax ? sum : sum + 1e-20;
    for (int j = 0; j < k; ++j) {
      const int e = order[size_t(j)];
      ids[t * k + j] = e;
      wts[t * k + j] = float(score[size_t(e)] / denom * double(cfg.routed_scaling_factor));
    }
  }
}

}  // namespace moelora::cpu
