// Independent double-precision references for the MoE CPU tests: plain per-token loops,
// written from the model definitions (HF transformers), not from the code under test.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <limits>
#include <numeric>
#include <vector>

#include "moelora/core/tensor.h"
#include "moelora/moe/config.h"
#include "test_util.h"

namespace moelora::test {

struct RefRoute {
  std::vector<int> ids;        // [k], by descending selection score, ties lowest id first
  std::vector<double> weights; // [k]
};

// One token's routing. `bias` may be null.
inline RefRoute ref_route(const float* logits, const float* bias, const RouterConfig& cfg) {
  const int E = cfg.num_experts;
  std::vector<double> score(static_cast<size_t>(E)), sel(static_cast<size_t>(E));
  if (cfg.scoring == ScoringFunc::softmax) {
    double mx = -std::numeric_limits<double>::infinity(), z = 0;
    for (int e = 0; e < E; ++e) mx = std::max(mx, double(logits[e]));
    for (int e = 0; e < E; ++e) z += std::exp(double(logits[e]) - mx);
    for (int e = 0; e < E; ++e) score[size_t(e)] = std::exp(double(logits[e]) - mx) / z;
  } else {
    for (int e = 0; e < E; ++e) score[size_t(e)] = 1.0 / (1.0 + std::exp(-double(logits[e])));
  }
  for (int e = 0; e < E; ++e) sel[size_t(e)] = score[size_t(e)] + (bias ? double(bias[e]) : 0.0);
  auto better = [&](int a, int b) { return sel[size_t(a)] > sel[size_t(b)] || (sel[size_t(a)] == sel[size_t(b)] && a < b); };
  std::vector<bool> allowed(size_t(E), true);
  if (cfg.n_group > 1) {
    const int per = E / cfg.n_group;
    std::vector<double> gscore;
    for (int g = 0; g < cfg.n_group; ++g) {
      std::vector<double> v(sel.begin() + g * per, sel.begin() + (g + 1) * per);
      std::sort(v.rbegin(), v.rend());
      gscore.push_back(cfg.group_score == GroupScore::max ? v[0] : v[0] + v[1]);
    }
    std::vector<int> gorder(size_t(cfg.n_group));
    std::iota(gorder.begin(), gorder.end(), 0);
    std::sort(gorder.begin(), gorder.end(), [&](int a, int b) {
      return gscore[size_t(a)] > gscore[size_t(b)] || (gscore[size_t(a)] == gscore[size_t(b)] && a < b);
    });
    for (int r = cfg.topk_group; r < cfg.n_group; ++r)
      for (int e = gorder[size_t(r)] * per; e < (gorder[size_t(r)] + 1) * per; ++e)
        allowed[size_t(e)] = false;
  }
  std::vector<int> order;
  for (int e = 0; e < E; ++e)
    if (allowed[size_t(e)]) order.push_back(e);
  std::sort(order.begin(), order.end(), better);
  RefRoute r;
  double sum = 0;
  for (int j = 0; j < cfg.top_k; ++j) {
    r.ids.push_back(order[size_t(j)]);
    r.weights.push_back(score[size_t(order[size_t(j)])]);
    sum += r.weights.back();
  }
  for (double& w : r.weights) {
    if (cfg.renormalize) w /= cfg.scoring == ScoringFunc::softmax ? sum : sum + 1e-20;
    w *= cfg.routed_scaling_factor;
  }
  return r;
}

// Expert weights in double for the reference forward: w13 [E][2I][H], w2 [E][H][I].
struct RefExperts {
  int E = 0, H = 0, I = 0;
  std::vector<double> w13, w2;

  static RefExperts from(const Tensor& w13_t, const Tensor& w2_t) {
    RefExperts r;
    r.E = int(w13_t.size(0));
    r.I = int(w13_t.size(1) / 2);
    r.H = int(w13_t.size(2));
    for (float v : to_floats(w13_t)) r.w13.push_back(v);
    for (float v : to_floats(w2_t)) r.w2.push_back(v);
    return r;
  }
  double* gate_up(int e) { return w13.data() + size_t(e) * 2 * I * H; }
  double* down(int e) { return w2.data() + size_t(e) * H * I; }
  const double* gate_up(int e) const { return w13.data() + size_t(e) * 2 * I * H; }
  const double* down(int e) const { return w2.data() + size_t(e) * H * I; }
};

// acc[H] += weight * down(silu(gate . x) * (up . x)) for expert e: one SwiGLU MLP, in double.
inline void ref_expert(const RefExperts& w, int e, const std::vector<double>& x, double weight,
                       std::vector<double>& acc) {
  const int H = w.H, I = w.I;
  const double* w13 = w.gate_up(e);
  const double* w2 = w.down(e);
  std::vector<double> act(static_cast<size_t>(I));
  for (int i = 0; i < I; ++i) {
    double g = 0, u = 0;
    for (int c = 0; c < H; ++c) {
      g += w13[size_t(i) * H + c] * x[size_t(c)];
      u += w13[size_t(I + i) * H + c] * x[size_t(c)];
    }
    act[size_t(i)] = g / (1.0 + std::exp(-g)) * u;
  }
  for (int c = 0; c < H; ++c) {
    double o = 0;
    for (int i = 0; i < I; ++i) o += w2[size_t(c) * I + i] * act[size_t(i)];
    acc[size_t(c)] += weight * o;
  }
}

// Expects `f` to throw moelora::Error whose message contains `needle`.
inline void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected moelora::Error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' lacks '" << needle << "'";
  }
}

inline double ref_sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

}  // namespace moelora::test
