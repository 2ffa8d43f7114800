// RoPE frequencies from the config (model/rope.h) against values computed independently in
// double precision from transformers 5's formulas (_compute_yarn_parameters, DeepseekV3's
// attention scale): DeepSeek-V2-Lite's and Kimi-K2's YaRN settings, the paper's attention
// factor when mscale is absent, the untruncated correction range, and plain RoPE.
#include <cmath>

#include "model/rope.h"
#include "test_util.h"

namespace moelora {
namespace {

HfModelConfig yarn_config(double theta, double factor, int64_t original, double mscale,
                          double mscale_all_dim, bool truncate = true) {
  HfModelConfig c;
  c.path = "/m/config.json";
  c.rope_theta = theta;
  c.rope_type = "yarn";
  c.max_position_embeddings = 163840;
  c.yarn.factor = factor;
  c.yarn.original_max_position = original;
  c.yarn.mscale = mscale;
  c.yarn.mscale_all_dim = mscale_all_dim;
  c.yarn.truncate = truncate;
  return c;
}

void expect_freqs(const RopeFrequencies& f, const std::vector<std::pair<int, double>>& want) {
  for (const auto& [i, v] : want)
    EXPECT_NEAR(f.inv_freq[size_t(i)], v, 2e-6 * v) << "inv_freq[" << i << "]";
}

TEST(Rope, YarnDeepseekV2Lite) {
  // rope_scaling of DeepSeek-V2-Lite: factor 40, original 4096, beta 32 / 1, mscale = all = 0.707.
  const HfModelConfig c = yarn_config(10000.0, 40.0, 4096, 0.707, 0.707);
  const RopeFrequencies f = rope_frequencies(c, 64);
  ASSERT_EQ(f.inv_freq.size(), 32u);
  EXPECT_FALSE(f.plain);
  // Correction range [10, 23]: below it the original frequencies, above them / 40.
  expect_freqs(f, {{0, 1.0},
                   {1, 0.7498942093324559},
                   {8, 0.1},
                   {16, 0.0055},
                   {30, 4.445698525097307e-06},
                   {31, 3.33380358040831e-06}});
  EXPECT_FLOAT_EQ(f.attention_scaling, 1.0f);  // mscale / mscale_all_dim
  EXPECT_NEAR(deepseek_softmax_mscale2(c), 1.5896261651208736, 1e-12);
}

TEST(Rope, YarnKimiK2) {
  const HfModelConfig c = yarn_config(50000.0, 32.0, 4096, 1.0, 1.0);
  const RopeFrequencies f = rope_frequencies(c, 64);
  expect_freqs(f, {{1, 0.7131110849119321},
                   {8, 0.0668740304976422},
                   {16, 0.0015838814840623515},
                   {31, 8.764412911589875e-07}});
  EXPECT_FLOAT_EQ(f.attention_scaling, 1.0f);
  EXPECT_NEAR(deepseek_softmax_mscale2(c), 1.8132604340394958, 1e-12);
  // Kimi-K2's released config has beta_fast = beta_slow = 1: a one-dim ramp over [19, 20].
  HfModelConfig k = c;
  k.yarn.beta_fast = k.yarn.beta_slow = 1.0;
  expect_freqs(rope_frequencies(k, 64), {{18, 0.0022742037565104418},
                                         {19, 0.0016217599081159522},
                                         {20, 3.6140467735726306e-05},
                                         {21, 2.577216815624846e-05}});
}

TEST(Rope, YarnWithoutMscaleAndUntruncated) {
  // No mscale: cos / sin take the paper's 0.1 ln(factor) + 1 and the softmax scale is unchanged.
  HfModelConfig c = yarn_config(10000.0, 4.0, 64, 0.0, 0.0);
  RopeFrequencies f = rope_frequencies(c, 16);
  expect_freqs(f, {{0, 1.0}, {1, 0.23717082451262847}, {2, 0.05}, {7, 7.905694150420948e-05}});
  EXPECT_NEAR(f.attention_scaling, 1.138629436111989, 1e-6);
  EXPECT_EQ(deepseek_softmax_mscale2(c), 1.0);
  c.yarn.truncate = false;  // the ramp over [0, 2.016] instead of [0, 3]
  f = rope_frequencies(c, 16);
  expect_freqs(f, {{1, 0.19858352015369318}, {2, 0.02559524589192421}, {4, 0.0025}});
  // An explicit attention_factor wins; no factor: max_position_embeddings / original.
  c.yarn.attention_factor = 0.8;
  EXPECT_FLOAT_EQ(rope_frequencies(c, 16).attention_scaling, 0.8f);
  c.yarn.factor = 0.0;
  c.max_position_embeddings = 256;
  expect_freqs(rope_frequencies(c, 16), {{4, 0.0025}, {7, 7.905694150420948e-05}});
}

TEST(Rope, PlainAndRefused) {
  HfModelConfig c;
  c.path = "/m/config.json";
  c.rope_theta = 10000.0;
  const RopeFrequencies f = rope_frequencies(c, 8);
  EXPECT_TRUE(f.plain);
  EXPECT_EQ(f.attention_scaling, 1.0f);
  for (int i = 0; i < 4; ++i)
    EXPECT_EQ(f.inv_freq[size_t(i)], 1.0f / std::pow(10000.0f, float(2 * i) / 8.0f));
  EXPECT_EQ(deepseek_softmax_mscale2(c), 1.0);
  c.rope_type = "linear";
  test::expect_error([&] { rope_frequencies(c, 8); }, "rope type 'linear' is not supported");
  c.rope_type = "yarn";
  c.yarn.factor = 2.0;
  test::expect_error([&] { rope_frequencies(c, 7); }, "must be even");
}

}  // namespace
}  // namespace moelora
