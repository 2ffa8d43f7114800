// fp8 block-scale expert stacks (src/quant/experts_fp8.cpp): the packed layout dequantizes to
// exactly dequantize_fp8_block of each checkpoint part, including partial blocks and gate/up
// parts whose boundary falls inside a 128-row scale block; bad stacks are refused.
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "moelora/core/random.h"
#include "moelora/quant/experts.h"
#include "quant_test_util.h"
#include "test_util.h"

namespace moelora {
namespace {

using quant::Fp8BlockConfig;
using quant::Fp8BlockTensors;

Fp8BlockTensors random_part(int64_t n, int64_t k, const Fp8BlockConfig& cfg,
                            std::mt19937_64& rng) {
  return quant::quantize_fp8_block(test::random_tensor({n, k}, DType::f32, rng, -2.0f, 2.0f),
                                   cfg);
}

// Every element of `got` [G, N, K] equals the per-part dequantization stacked along N, bit
// for bit.
void expect_stack_equals_parts(const Tensor& got, const std::vector<std::vector<Fp8BlockTensors>>& parts,
                               const Fp8BlockConfig& cfg) {
  const int64_t G = got.size(0), N = got.size(1), K = got.size(2);
  const float* g = got.data<float>();
  for (int64_t e = 0; e < G; ++e) {
    int64_t row = 0;
    for (const Fp8BlockTensors& t : parts[size_t(e)]) {
      const Tensor want = quant::dequantize_fp8_block(t, cfg);
      const int64_t n = want.size(0);
      ASSERT_EQ(std::memcmp(g + (e * N + row) * K, want.data(), size_t(n * K) * 4), 0)
          << "group " << e << " rows " << row << ".." << row + n;
      row += n;
    }
    ASSERT_EQ(row, N);
  }
}

struct PackCase {
  int64_t inter, k, block_n, block_k;
  int64_t want_parts;  // P of the packed scale grid
};

TEST(QuantExpertsFp8, PackedGateUpDequantizesLikeEachPart) {
  std::mt19937_64 rng(test::fresh_seed());
  // I a multiple of block_n (grids stack), I not (one grid per part), partial K blocks,
  // a non-square block.
  for (const PackCase& c : {PackCase{256, 384, 128, 128, 1}, PackCase{200, 272, 128, 128, 2},
                            PackCase{72, 144, 128, 128, 2}, PackCase{96, 200, 64, 32, 2},
                            PackCase{128, 160, 64, 128, 1}}) {
    SCOPED_TRACE(::testing::Message() << "I=" << c.inter << " K=" << c.k << " block "
                                      << c.block_n << "x" << c.block_k);
    const Fp8BlockConfig cfg{c.block_n, c.block_k};
    const int64_t G = 3;
    std::vector<std::vector<Fp8BlockTensors>> w13(G), w2(G);
    for (int64_t e = 0; e < G; ++e) {
      w13[e] = {random_part(c.inter, c.k, cfg, rng), random_part(c.inter, c.k, cfg, rng)};
      w2[e] = {random_part(c.k, c.inter, cfg, rng)};
    }
    const ExpertMatrices p13 = quant::pack_fp8_block_experts(w13, cfg, "w13");
    EXPECT_EQ(p13.format, WeightFormat::fp8_block);
    EXPECT_EQ(p13.n, 2 * c.inter);  // logical sizes, never packed ones
    EXPECT_EQ(p13.k, c.k);
    EXPECT_EQ(p13.group_n, c.block_n);
    EXPECT_EQ(p13.group_k, c.block_k);
    EXPECT_EQ(p13.w.dtype(), DType::f8_e4m3);
    ASSERT_EQ(p13.scales.dim(), 4);
    EXPECT_EQ(p13.scales.size(1), c.want_parts);
    p13.validate(G, 2 * c.inter, c.k, "w13");
    expect_stack_equals_parts(quant::dequantize_experts(p13), w13, cfg);
    const ExpertMatrices p2 = quant::pack_fp8_block_experts(w2, cfg, "w2");
    EXPECT_EQ(p2.scales.size(1), 1);
    expect_stack_equals_parts(quant::dequantize_experts(p2), w2, cfg);
  }
}

TEST(QuantExpertsFp8, QuantizeExpertsIsTheBlockQuantizerPerGroup) {
  std::mt19937_64 rng(test::fresh_seed());
  const Tensor w = test::random_tensor({2, 200, 272}, DType::bf16, rng);
  quant::QuantizeOptions opt;
  opt.format = WeightFormat::fp8_block;
  opt.group_size = 128;
  const ExpertMatrices q = quant::quantize_experts(w, opt);
  EXPECT_EQ(q.n, 200);
  EXPECT_EQ(q.k, 272);
  std::vector<std::vector<Fp8BlockTensors>> parts(2);
  for (int64_t e = 0; e < 2; ++e)
    parts[size_t(e)] = {quant::quantize_fp8_block(w.narrow(0, e, 1).view({200, 272}))};
  expect_stack_equals_parts(quant::dequantize_experts(q), parts, {});
  // Close to the input (e4m3 has 3 mantissa bits: relative error <= 1/16 of the block amax).
  const auto got = test::to_floats(quant::dequantize_experts(q));
  const auto want = test::to_floats(w);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 0.07f) << i;
}

TEST(QuantExpertsFp8, RandomExpertsOnTheHost) {
  const ExpertMatrices r = quant::random_experts(WeightFormat::fp8_block, 2, 300, 256, 128, 0.5f,
                                                 7, Device::cpu(), Stream());
  r.validate(2, 300, 256, "random");
  EXPECT_EQ(r.scales.dim(), 4);
  const auto v = test::to_floats(quant::dequantize_experts(r));
  float amax = 0;
  for (float f : v) {
    ASSERT_TRUE(std::isfinite(f));
    amax = std::max(amax, std::fabs(f));
  }
  EXPECT_GT(amax, 0.2f);
  EXPECT_LE(amax, 0.5f);
}

TEST(QuantExpertsFp8, BadStacksAreRefused) {
  std::mt19937_64 rng(test::fresh_seed());
  const Fp8BlockConfig cfg;
  // Unequal parts with a boundary inside a scale block.
  std::vector<std::vector<Fp8BlockTensors>> uneven = {
      {random_part(100, 128, cfg, rng), random_part(60, 128, cfg, rng)}};
  EXPECT_QUANT_ERROR([&] { quant::pack_fp8_block_experts(uneven, cfg, "w13"); }, "w13",
                     "100, 60", "scale block");
  // Parts disagreeing on K.
  std::vector<std::vector<Fp8BlockTensors>> k_mismatch = {
      {random_part(128, 128, cfg, rng), random_part(128, 256, cfg, rng)}};
  EXPECT_QUANT_ERROR([&] { quant::pack_fp8_block_experts(k_mismatch, cfg, "w13"); }, "w13",
                     "share K");
  // Groups disagreeing on N.
  std::vector<std::vector<Fp8BlockTensors>> n_mismatch = {{random_part(128, 128, cfg, rng)},
                                                          {random_part(256, 128, cfg, rng)}};
  EXPECT_QUANT_ERROR([&] { quant::pack_fp8_block_experts(n_mismatch, cfg, "w2"); }, "w2[1]",
                     "expected [128, 128]");
  // A scale grid of the wrong shape, a NaN scale, an e4m3 NaN code: validate_fp8_block's
  // errors, naming the part.
  std::vector<std::vector<Fp8BlockTensors>> bad = {{random_part(128, 256, cfg, rng)}};
  bad[0][0].weight_scale_inv = Tensor::zeros({1, 1}, DType::f32);
  EXPECT_QUANT_ERROR([&] { quant::pack_fp8_block_experts(bad, cfg, "w2"); },
                     "w2[0].part0.weight_scale_inv");
  bad[0][0] = random_part(128, 256, cfg, rng);
  bad[0][0].weight_scale_inv.data<float>()[1] = std::nanf("");
  EXPECT_QUANT_ERROR([&] { quant::pack_fp8_block_experts(bad, cfg, "w2"); },
                     "w2[0].part0.weight_scale_inv");
  bad[0][0] = random_part(128, 256, cfg, rng);
  static_cast<uint8_t*>(bad[0][0].weight.data())[5] = 0x7f;
  EXPECT_QUANT_ERROR([&] { quant::pack_fp8_block_experts(bad, cfg, "w2"); }, "w2[0].part0.weight",
                     "NaN");
  // A stack whose scales do not match its logical sizes.
  std::vector<std::vector<Fp8BlockTensors>> ok = {{random_part(128, 256, cfg, rng)}};
  ExpertMatrices m = quant::pack_fp8_block_experts(ok, cfg, "w2");
  m.scales = Tensor::zeros({1, 1, 1, 1}, DType::f32);
  EXPECT_QUANT_ERROR([&] { quant::dequantize_experts(m); }, "fp8_block scales");
}

}  // namespace
}  // namespace moelora
