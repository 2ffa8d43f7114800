// Sampler: greedy at temperature 0, determinism per (seed, step), top-k / top-p support,
// the empirical distribution at temperature 1, bad parameters.
#include <cmath>
#include <map>
#include <vector>

#include "moelora/engine/engine.h"
#include "test_util.h"

namespace moelora {
namespace {

TEST(Sampler, TemperatureZeroIsGreedy) {
  const std::vector<float> l = {0.1f, 2.0f, -1.0f, 2.0f};
  SamplingParams p;
  EXPECT_EQ(sample_token(l.data(), 4, p, 0), 1);  // lowest id on ties
  EXPECT_EQ(sample_greedy(l.data(), 4), 1);
}

TEST(Sampler, DeterministicPerSeedAndStep) {
  std::vector<float> l(50);
  for (size_t i = 0; i < l.size(); ++i) l[i] = float(std::sin(double(i)));
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 42;
  std::vector<int32_t> a, b;
  for (int s = 0; s < 64; ++s) a.push_back(sample_token(l.data(), 50, p, s));
  for (int s = 0; s < 64; ++s) b.push_back(sample_token(l.data(), 50, p, s));
  EXPECT_EQ(a, b);
  p.seed = 43;
  std::vector<int32_t> c;
  for (int s = 0; s < 64; ++s) c.push_back(sample_token(l.data(), 50, p, s));
  EXPECT_NE(a, c);
}

TEST(Sampler, TopKAndTopPRestrictTheSupport) {
  const std::vector<float> l = {3.0f, 2.9f, 2.8f, 0.0f, -1.0f, 2.7f};
  SamplingParams p;
  p.temperature = 5.0f;  // nearly flat
  p.top_k = 2;
  for (int s = 0; s < 200; ++s) {
    const int32_t t = sample_token(l.data(), 6, p, s);
    EXPECT_TRUE(t == 0 || t == 1) << t;
  }
  p.top_k = 0;
  p.temperature = 1.0f;
  p.top_p = 0.3f;  // the first token alone has ~0.3; with the second the set reaches it
  std::map<int32_t, int> seen;
  for (int s = 0; s < 400; ++s) ++seen[sample_token(l.data(), 6, p, s)];
  for (const auto& [t, n] : seen) EXPECT_TRUE(t == 0 || t == 1) << t;
  p.top_p = 1e-6f;  // always at least the top token
  for (int s = 0; s < 50; ++s) EXPECT_EQ(sample_token(l.data(), 6, p, s), 0);
}

TEST(Sampler, FollowsTheSoftmax) {
  const std::vector<float> l = {0.0f, 1.0f, 2.0f};
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 7;
  const int n = 20000;
  std::vector<int> count(3);
  for (int s = 0; s < n; ++s) ++count[size_t(sample_token(l.data(), 3, p, s))];
  const double z = 1 + std::exp(1.0) + std::exp(2.0);
  for (int i = 0; i < 3; ++i)
    EXPECT_NEAR(double(count[size_t(i)]) / n, std::exp(double(i)) / z, 0.015) << i;
}

TEST(Sampler, BadParameters) {
  const std::vector<float> l = {0.0f, 1.0f};
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.0f;
  test::expect_error([&] { sample_token(l.data(), 2, p, 0); }, "top_p must be in (0, 1]");
  p.top_p = 1.0f;
  p.top_k = -1;
  test::expect_error([&] { sample_token(l.data(), 2, p, 0); }, "top_k must be >= 0");
  p.top_k = 0;
  p.temperature = -1.0f;
  test::expect_error([&] { sample_token(l.data(), 2, p, 0); }, "temperature");
}

}  // namespace
}  // namespace moelora
