// CPU router: softmax top-k, DeepSeek grouped routing, ties, bad configs.
#include <cmath>
#include <functional>
#include <random>
#include <string>

#include <gtest/gtest.h>

#include "kernels/cpu/moe_ops.h"
#include "moe_reference.h"
#include "test_util.h"

namespace moelora {
namespace {

using test::expect_error;
using test::ref_route;

TopK make_topk(int64_t M, int k) {
  TopK t;
  t.ids = Tensor::empty({M, k}, DType::i32);
  t.weights = Tensor::empty({M, k}, DType::f32);
  t.ids.fill_bytes(0x7f);
  t.weights.fill_bytes(0xff);  // NaN: unwritten weights show up
  return t;
}

TopK route(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg) {
  TopK t = make_topk(logits.size(0), cfg.top_k);
  cpu::moe_route(logits, bias, cfg, t, Stream());
  return t;
}

// Every token against the double-precision reference: ids exactly, weights to 1e-6.
void expect_matches_reference(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg) {
  const TopK t = route(logits, bias, cfg);
  const auto ids = test::to_ints(t.ids);
  const auto w = test::to_floats(t.weights);
  const float* lg = logits.data<float>();
  const float* b = bias.defined() ? bias.data<float>() : nullptr;
  const int E = cfg.num_experts, k = cfg.top_k;
  for (int64_t m = 0; m < logits.size(0); ++m) {
    const auto ref = ref_route(lg + m * E, b, cfg);
    for (int j = 0; j < k; ++j) {
      ASSERT_EQ(ids[size_t(m * k + j)], ref.ids[size_t(j)]) << "token " << m << " choice " << j;
      EXPECT_NEAR(w[size_t(m * k + j)], ref.weights[size_t(j)],
                  1e-6 * std::max(1.0, ref.weights[size_t(j)]))
          << "token " << m << " choice " << j;
    }
  }
}

TEST(MoeRouter, SoftmaxTopKWithAndWithoutRenormalize) {
  std::mt19937_64 rng(test::fresh_seed());
  for (bool renorm : {false, true}) {
    const auto cfg = RouterConfig::softmax_topk(16, 4, renorm);
    const Tensor logits = test::random_tensor({37, 16}, DType::f32, rng, -4.0f, 4.0f);
    expect_matches_reference(logits, Tensor(), cfg);
    const auto w = test::to_floats(route(logits, Tensor(), cfg).weights);
    double sum0 = 0;
    for (int j = 0; j < 4; ++j) sum0 += w[size_t(j)];
    if (renorm)
      EXPECT_NEAR(sum0, 1.0, 1e-6);
    else
      EXPECT_LT(sum0, 1.0);
  }
}

TEST(MoeRouter, SoftmaxKnownValues) {
  // logits {0, ln 2, ln 3, ln 4}: p = {1, 2, 3, 4} / 10. Top-2 = experts 3, 2.
  const Tensor logits =
      test::from_floats({0.0f, std::log(2.0f), std::log(3.0f), std::log(4.0f)}, {1, 4}, DType::f32);
  TopK t = route(logits, Tensor(), RouterConfig::softmax_topk(4, 2, false));
  EXPECT_EQ(test::to_ints(t.ids), (std::vector<int32_t>{3, 2}));
  EXPECT_NEAR(test::to_floats(t.weights)[0], 0.4, 1e-6);
  EXPECT_NEAR(test::to_floats(t.weights)[1], 0.3, 1e-6);
  t = route(logits, Tensor(), RouterConfig::softmax_topk(4, 2, true));
  EXPECT_NEAR(test::to_floats(t.weights)[0], 4.0 / 7.0, 1e-6);
  EXPECT_NEAR(test::to_floats(t.weights)[1], 3.0 / 7.0, 1e-6);
}

TEST(MoeRouter, TiesGoToLowestExpertId) {
  // Token 0: experts 1, 2, 4 tie at the top; token 1: all equal; token 2: tie for second place.
  const Tensor logits = test::from_floats({1, 3, 3, 0, 3, -1,  //
                                           2, 2, 2, 2, 2, 2,   //
                                           0, 1, 5, 1, 1, 0},
                                          {3, 6}, DType::f32);
  const TopK t = route(logits, Tensor(), RouterConfig::softmax_topk(6, 2, false));
  EXPECT_EQ(test::to_ints(t.ids), (std::vector<int32_t>{1, 2, 0, 1, 2, 1}));
  const auto w = test::to_floats(t.weights);
  EXPECT_EQ(w[0], w[1]);
  EXPECT_NEAR(w[2], 1.0 / 6.0, 1e-7);

  // Sigmoid with a bias that creates an exact tie in the selection score.
  RouterConfig cfg = RouterConfig::deepseek_v3(4, 1, 1, 1, 1.0f);
  const Tensor lg2 = test::from_floats({0, 0, 0, 0}, {1, 4}, DType::f32);
  const Tensor bias = test::from_floats({0.0f, 0.25f, 0.25f, 0.0f}, {4}, DType::f32);
  EXPECT_EQ(test::to_ints(route(lg2, bias, cfg).ids), (std::vector<int32_t>{1}));
}

TEST(MoeRouter, DeepSeekV3GroupedSigmoidWithBias) {
  std::mt19937_64 rng(test::fresh_seed());
  const auto cfg = RouterConfig::deepseek_v3(32, 4, 8, 3, 2.5f);
  const Tensor logits = test::random_tensor({61, 32}, DType::f32, rng, -3.0f, 3.0f);
  const Tensor bias = test::random_tensor({32}, DType::f32, rng, -0.3f, 0.3f);
  expect_matches_reference(logits, bias, cfg);
  // Without renormalization too.
  auto cfg2 = cfg;
  cfg2.renormalize = false;
  expect_matches_reference(logits, bias, cfg2);
}

TEST(MoeRouter, CorrectionBiasChangesSelectionNotWeights) {
  // 4 experts, one group, top-2. Unbiased: expert 0 wins; the bias lifts expert 2 above it.
  auto cfg = RouterConfig::deepseek_v3(4, 2, 1, 1, 1.0f, /*renormalize=*/false);
  const Tensor logits = test::from_floats({2.0f, 1.0f, 0.5f, -1.0f}, {1, 4}, DType::f32);
  const Tensor no_bias = test::from_floats({0, 0, 0, 0}, {4}, DType::f32);
  const Tensor bias = test::from_floats({0.0f, 0.0f, 0.5f, 0.0f}, {4}, DType::f32);
  TopK t = route(logits, no_bias, cfg);
  EXPECT_EQ(test::to_ints(t.ids), (std::vector<int32_t>{0, 1}));
  t = route(logits, bias, cfg);
  EXPECT_EQ(test::to_ints(t.ids), (std::vector<int32_t>{2, 0}));
  const auto w = test::to_floats(t.weights);
  EXPECT_NEAR(w[0], test::ref_sigmoid(0.5), 1e-6);  // the unbiased score, not 0.5 + bias
  EXPECT_NEAR(w[1], test::ref_sigmoid(2.0), 1e-6);
  // Renormalized and scaled: w_j = s_j / sum(s) * factor.
  cfg.renormalize = true;
  cfg.routed_scaling_factor = 2.5f;
  const auto w2 = test::to_floats(route(logits, bias, cfg).weights);
  const double s0 = test::ref_sigmoid(0.5), s1 = test::ref_sigmoid(2.0);
  EXPECT_NEAR(w2[0], s0 / (s0 + s1) * 2.5, 1e-6);
  EXPECT_NEAR(w2[1], s1 / (s0 + s1) * 2.5, 1e-6);
}

TEST(MoeRouter, GroupLimitingExcludesGroups) {
  // 8 experts in 4 groups of 2, keep 2 groups, top-2, top2_sum group scores.
  // Expert 0 has the single best score, but group 0's sum (its partner is very low) loses to
  // groups 2 and 3, so expert 0 must not be chosen.
  auto cfg = RouterConfig::deepseek_v3(8, 2, 4, 2, 1.0f);
  const Tensor logits =
      test::from_floats({4.0f, -6.0f, 0.0f, 0.0f, 1.5f, 1.5f, 1.0f, 2.0f}, {1, 8}, DType::f32);
  const Tensor bias = test::from_floats(std::vector<float>(8, 0.0f), {8}, DType::f32);
  TopK t = route(logits, bias, cfg);
  EXPECT_EQ(test::to_ints(t.ids), (std::vector<int32_t>{7, 4}));
  // GroupScore::max (DeepSeek-V2): group 0's max (expert 0) wins a kept group.
  cfg.group_score = GroupScore::max;
  t = route(logits, bias, cfg);
  EXPECT_EQ(test::to_ints(t.ids), (std::vector<int32_t>{0, 7}));
}

TEST(MoeRouter, DeepSeekV2GroupMaxSoftmax) {
  std::mt19937_64 rng(test::fresh_seed());
  RouterConfig cfg = RouterConfig::softmax_topk(64, 6, false);
  cfg.n_group = 8;
  cfg.topk_group = 3;
  cfg.group_score = GroupScore::max;
  cfg.routed_scaling_factor = 16.0f;
  const Tensor logits = test::random_tensor({50, 64}, DType::f32, rng, -5.0f, 5.0f);
  expect_matches_reference(logits, Tensor(), cfg);
}

TEST(MoeRouter, RoutedScalingFactorSoftmax) {
  std::mt19937_64 rng(test::fresh_seed());
  RouterConfig cfg = RouterConfig::softmax_topk(8, 2, true);
  const Tensor logits = test::random_tensor({9, 8}, DType::f32, rng, -2.0f, 2.0f);
  const auto w1 = test::to_floats(route(logits, Tensor(), cfg).weights);
  cfg.routed_scaling_factor = 2.5f;
  const auto w25 = test::to_floats(route(logits, Tensor(), cfg).weights);
  for (size_t i = 0; i < w1.size(); ++i) EXPECT_NEAR(w25[i], 2.5 * w1[i], 1e-6);
  expect_matches_reference(logits, Tensor(), cfg);
}

TEST(MoeRouter, BadConfigsAndInputsThrow) {
  const Tensor logits = test::from_floats(std::vector<float>(16, 0.5f), {2, 8}, DType::f32);
  RouterConfig cfg = RouterConfig::softmax_topk(8, 9, false);  // top_k > E
  TopK t9 = make_topk(2, 9);
  expect_error([&] { cpu::moe_route(logits, Tensor(), cfg, t9, Stream()); }, "top_k");
  cfg = RouterConfig::deepseek_v3(8, 2, 3, 1, 1.0f);  // n_group does not divide E
  expect_error(
      [&] { route(logits, test::from_floats(std::vector<float>(8, 0), {8}, DType::f32), cfg); },
      "n_group");
  cfg = RouterConfig::deepseek_v3(8, 2, 4, 5, 1.0f);  // topk_group > n_group
  expect_error(
      [&] { route(logits, test::from_floats(std::vector<float>(8, 0), {8}, DType::f32), cfg); },
      "topk_group");
  // Bias required but missing; bias of the wrong length.
  cfg = RouterConfig::deepseek_v3(8, 2, 4, 2, 1.0f);
  expect_error([&] { route(logits, Tensor(), cfg); }, "correction_bias");
  expect_error(
      [&] {
        route(logits, test::from_floats({0, 0, 0}, {3}, DType::f32), cfg);
      },
      "expected shape [8]");
  // Logits with the wrong expert count or dtype; outputs of the wrong shape.
  expect_error([&] { route(logits, Tensor(), RouterConfig::softmax_topk(16, 2, false)); },
               "[M, 16]");
  expect_error(
      [&] {
        route(test::from_floats(std::vector<float>(16, 0.5f), {2, 8}, DType::bf16), Tensor(),
              RouterConfig::softmax_topk(8, 2, false));
      },
      "expected dtype f32");
  TopK bad = make_topk(3, 2);
  expect_error(
      [&] {
        cpu::moe_route(logits, Tensor(), RouterConfig::softmax_topk(8, 2, false), bad, Stream());
      },
      "topk.ids");
  // NaN logits name the token.
  std::vector<float> v(16, 0.5f);
  v[11] = std::nanf("");
  expect_error(
      [&] {
        route(test::from_floats(v, {2, 8}, DType::f32), Tensor(),
              RouterConfig::softmax_topk(8, 2, false));
      },
      "token 1 expert 3");
}

}  // namespace
}  // namespace moelora
