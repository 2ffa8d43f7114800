// Independent double-precision references for the MoE CPU tests: plain per-token loops,
// written from the model definitions (HF transformers), not from the code under test.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moelora/core/tensor.h"
#include "moelora/moe/config.h"
#include "moelora/moe/runner.h"
#include "moelora/moe/types.h"
#include "test_util.h"

namespace moelora::test {

struct RefRoute {
  std::vector<int> ids;         // [k], by descending selection score, ties lowest id first
  std::vector<double> weights;  // [k]
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
  auto better = [&](int a, int b) {
    return sel[size_t(a)] > sel[size_t(b)] || (sel[size_t(a)] == sel[size_t(b)] && a < b);
  };
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
      return gscore[size_t(a)] > gscore[size_t(b)] ||
             (gscore[size_t(a)] == gscore[size_t(b)] && a < b);
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

// Random bf16 layer weights scaled so activations stay O(1): x in [-1, 1), w13 in
// ±3/sqrt(H), w2 in ±3/sqrt(I). A correction bias (f32 [E]) when `bias`.
inline MoeWeights random_moe_weights(const MoeShape& s, std::mt19937_64& rng, bool bias) {
  MoeWeights w;
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  const float a13 = 3.0f / std::sqrt(float(H)), a2 = 3.0f / std::sqrt(float(I));
  w.w13 = random_tensor({E, 2 * I, H}, DType::bf16, rng, -a13, a13);
  w.w2 = random_tensor({E, H, I}, DType::bf16, rng, -a2, a2);
  if (bias) w.correction_bias = random_tensor({E}, DType::f32, rng, -0.2f, 0.2f);
  if (s.shared_inter > 0) {
    const int64_t Is = s.shared_inter;
    const float as = 3.0f / std::sqrt(float(Is));
    w.shared_w13 = random_tensor({1, 2 * Is, H}, DType::bf16, rng, -a13, a13);
    w.shared_w2 = random_tensor({1, H, Is}, DType::bf16, rng, -as, as);
  }
  return w;
}

// The layer output of one token: sum_j w_j * expert_{id_j}(x) + gate * shared(x), in double.
inline std::vector<double> ref_moe_token(const std::vector<double>& x, const float* logits,
                                         const float* bias, const RouterConfig& cfg,
                                         const RefExperts& experts, const RefExperts* shared,
                                         double shared_gate) {
  const RefRoute r = ref_route(logits, bias, cfg);
  std::vector<double> acc(size_t(experts.H), 0.0);
  for (int j = 0; j < cfg.top_k; ++j)
    ref_expert(experts, r.ids[size_t(j)], x, r.weights[size_t(j)], acc);
  if (shared) ref_expert(*shared, 0, x, shared_gate, acc);
  return acc;
}


inline double ref_sigmoid(double v) {
  return 1.0 / (1.0 + std::exp(-v));
}

// A small MoE shape for tests.
inline MoeShape make_test_shape(int H, int I, int E, int k, int shared_inter = 0,
                                bool shared_gate = false) {
  MoeShape s;
  s.name = "test";
  s.hidden = H;
  s.inter = I;
  s.num_experts = E;
  s.top_k = k;
  s.shared_inter = shared_inter;
  s.shared_gate = shared_gate;
  return s;
}

// A MoeRunner config on the CPU reference backend.
inline MoeRunnerConfig reference_config(const MoeShape& s, const RouterConfig& r,
                                        int64_t max_tokens) {
  MoeRunnerConfig c;
  c.shape = s;
  c.router = r;
  c.device = Device::cpu();
  c.max_tokens = max_tokens;
  c.backend = "reference";
  return c;
}

}  // namespace moelora::test
