// int4 / int8 expert stacks (cuda_wna16 layout): pack -> dequantize_experts equals each
// format's own dequantizer bit for bit, logical vs packed sizes, bad input.
#include <cstring>
#include <numeric>
#include <random>

#include <gtest/gtest.h>

#include "moelora/core/random.h"
#include "moelora/quant/experts.h"
#include "quant/wna16_layout.h"
#include "quant_test_util.h"
#include "test_util.h"

namespace moelora {
namespace {

using namespace quant;

struct Variant {
  IntSource source;
  int bits;
  int64_t group;  // -1 per-channel
  bool sym;
  bool act_order = false;
  GptqZeroFormat zf = GptqZeroFormat::v1_minus_one;
};

std::string describe(const Variant& v) {
  const char* src = v.source == IntSource::gptq ? "gptq" : v.source == IntSource::awq ? "awq" : "ct";
  return fmt::format("{} int{} g{} {}{}{}", src, v.bits, v.group, v.sym ? "sym" : "asym",
                     v.act_order ? " act-order" : "",
                     v.source == IntSource::gptq && !v.sym
                         ? (v.zf == GptqZeroFormat::v1_minus_one ? " v1" : " v2")
                         : "");
}

std::vector<int32_t> shuffled(int64_t k, std::mt19937_64& rng) {
  std::vector<int32_t> p(static_cast<size_t>(k));
  std::iota(p.begin(), p.end(), 0);
  std::shuffle(p.begin(), p.end(), rng);
  return p;
}

// Builds G groups of {gate, up} parts (each [n_part, k]) in the variant's checkpoint format,
// packs them and returns the packed stack and the formats' own dequantization [G, 2 n_part, k].
std::pair<ExpertMatrices, Tensor> build(const Variant& v, int64_t groups, int64_t n_part,
                                        int64_t k, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Tensor expect = Tensor::empty({groups, 2 * n_part, k}, DType::f32);
  auto put = [&](int64_t g, int p, const Tensor& deq) {
    std::memcpy(expect.data<float>() + (g * 2 + p) * n_part * k, deq.data<float>(),
                size_t(n_part * k) * sizeof(float));
  };
  if (v.source == IntSource::gptq) {
    GptqConfig cfg{v.bits, v.group, v.sym, v.act_order, v.zf};
    std::vector<std::vector<GptqTensors>> parts(static_cast<size_t>(groups));
    for (int64_t g = 0; g < groups; ++g) {
      const std::vector<int32_t> perm = v.act_order ? shuffled(k, rng) : std::vector<int32_t>{};
      for (int p = 0; p < 2; ++p) {
        GptqTensors t = quantize_gptq(test::random_tensor({n_part, k}, DType::f32, rng), cfg, perm);
        put(g, p, dequantize_gptq(t, cfg));
        parts[size_t(g)].push_back(t);
      }
    }
    return {pack_gptq_experts(parts, cfg, "w13"), expect};
  }
  if (v.source == IntSource::awq) {
    AwqConfig cfg{4, v.group};
    std::vector<std::vector<AwqTensors>> parts(static_cast<size_t>(groups));
    for (int64_t g = 0; g < groups; ++g)
      for (int p = 0; p < 2; ++p) {
        AwqTensors t = quantize_awq(test::random_tensor({n_part, k}, DType::f32, rng), cfg);
        put(g, p, dequantize_awq(t, cfg));
        parts[size_t(g)].push_back(t);
      }
    return {pack_awq_experts(parts, cfg, "w13"), expect};
  }
  CtPackConfig cfg{v.bits, v.group == -1 ? CtStrategy::channel : CtStrategy::group, v.group, v.sym};
  std::vector<std::vector<CtPackTensors>> parts(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g)
    for (int p = 0; p < 2; ++p) {
      CtPackTensors t = quantize_ct_pack(test::random_tensor({n_part, k}, DType::f32, rng), cfg,
                                         p ? DType::bf16 : DType::f16);
      put(g, p, dequantize_ct_pack(t, cfg));
      parts[size_t(g)].push_back(t);
    }
  return {pack_ct_experts(parts, cfg, "w13"), expect};
}

void expect_bit_equal(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  const float* x = a.data<float>();
  const float* y = b.data<float>();
  for (int64_t i = 0; i < a.numel(); ++i)
    if (std::memcmp(&x[i], &y[i], sizeof(float)) != 0) {
      ADD_FAILURE() << what << ": element " << i << " is " << x[i] << ", format says " << y[i];
      return;
    }
}

TEST(QuantExpertsWna16, PackDequantizeMatchesEveryFormat) {
  const std::vector<Variant> variants = {
      {IntSource::gptq, 4, 128, true},
      {IntSource::gptq, 4, 32, true},
      {IntSource::gptq, 4, 64, false},
      {IntSource::gptq, 4, -1, true},
      {IntSource::gptq, 4, 128, false, false, GptqZeroFormat::v2_true},
      {IntSource::gptq, 4, 32, true, true},
      {IntSource::gptq, 4, 64, false, true},
      {IntSource::gptq, 8, 128, true},
      {IntSource::gptq, 8, 32, false},
      {IntSource::gptq, 8, -1, false, false, GptqZeroFormat::v2_true},
      {IntSource::gptq, 8, 64, true, true},
      {IntSource::awq, 4, 128, false},
      {IntSource::awq, 4, 32, false},
      {IntSource::awq, 4, -1, false},
      {IntSource::ct, 4, 32, true},
      {IntSource::ct, 4, 128, false},
      {IntSource::ct, 4, -1, true},
      {IntSource::ct, 8, 64, true},
      {IntSource::ct, 8, -1, false},
  };
  uint64_t seed = 1;
  for (const Variant& v : variants) {
    // K = 256 (whole tiles) and, for groups <= 64, K = 96 / 160 (padding past the last tile);
    // N = 2 x 24 (not a multiple of 16: padded rows).
    std::vector<int64_t> ks = {256};
    if (v.group == 32 || v.group == -1) ks.push_back(96);
    if (v.group == 32) ks.push_back(160);
    for (int64_t k : ks) {
      SCOPED_TRACE(describe(v) + " K=" + std::to_string(k));
      auto [m, expect] = build(v, 3, 24, k, seed++);
      EXPECT_EQ(m.format, v.bits == 4 ? WeightFormat::int4 : WeightFormat::int8);
      EXPECT_EQ(m.groups, 3);
      EXPECT_EQ(m.n, 48);  // logical: 2 parts x 24, never the padded 48 -> 48 / packed rows
      EXPECT_EQ(m.k, k);
      EXPECT_EQ(m.group_k, v.group == -1 ? k : v.group);
      EXPECT_EQ(m.perm.defined(), v.act_order);
      EXPECT_EQ(m.zeros.defined(), !v.sym);
      expect_bit_equal(dequantize_experts(m), expect, "dequantize_experts");
    }
  }
}

TEST(QuantExpertsWna16, LogicalVsPackedSizes) {
  // N = 40 logical rows pad to 48 packed rows; K = 96 to 128 (int4) or stays 96 (int8).
  std::mt19937_64 rng(7);
  Tensor w = test::random_tensor({2, 40, 96}, DType::f32, rng);
  for (int bits : {4, 8}) {
    QuantizeOptions opt;
    opt.format = bits == 4 ? WeightFormat::int4 : WeightFormat::int8;
    opt.group_size = 32;
    const ExpertMatrices m = quantize_experts(w, opt);
    EXPECT_EQ(m.n, 40);
    EXPECT_EQ(m.k, 96);
    EXPECT_EQ(wna16::padded_n(m.n), 48);
    EXPECT_EQ(wna16::padded_k(m.k, bits), bits == 4 ? 128 : 96);
    EXPECT_EQ(m.w.shape(),
              (Shape{2, 3, wna16::padded_k(96, bits) / wna16::tile_k(bits), wna16::kTileWords}));
    EXPECT_EQ(m.scales.shape(), (Shape{2, 3, 48}));
    EXPECT_NO_THROW(m.validate(2, 40, 96, "w"));
    EXPECT_THROW(m.validate(2, 48, 96, "w"), Error);  // a packed N is not a logical N
    // Close to the input (round to nearest: half a step of at most 2 amax / 15).
    const Tensor d = dequantize_experts(m);
    const float tol = bits == 4 ? 0.07f : 0.005f;
    for (int64_t i = 0; i < w.numel(); ++i)
      ASSERT_NEAR(d.data<float>()[i], w.data<float>()[i], tol) << "bits " << bits << " at " << i;
  }
}

TEST(QuantExpertsWna16, QuantizeExpertsSources) {
  std::mt19937_64 rng(9);
  Tensor w = test::random_tensor({2, 32, 128}, DType::bf16, rng);
  for (IntSource src : {IntSource::gptq, IntSource::awq, IntSource::ct}) {
    QuantizeOptions opt;
    opt.source = src;
    opt.group_size = 64;
    opt.sym = src != IntSource::awq;
    opt.act_order = src == IntSource::gptq;
    opt.seed = 3;
    const ExpertMatrices m = quantize_experts(w, opt);
    EXPECT_EQ(m.perm.defined(), src == IntSource::gptq);
    const Tensor d = dequantize_experts(m);
    for (int64_t i = 0; i < w.numel(); ++i)
      ASSERT_NEAR(d.data<float>()[i], float_at(w, i), 0.08f) << int(src) << " at " << i;
  }
  QuantizeOptions bad;
  bad.format = WeightFormat::int8;
  bad.source = IntSource::awq;
  EXPECT_QUANT_ERROR([&] { quantize_experts(w, bad); }, "int4 only");
  bad.format = WeightFormat::int4;
  bad.source = IntSource::ct;
  bad.act_order = true;
  EXPECT_QUANT_ERROR([&] { quantize_experts(w, bad); }, "act-order");
}

TEST(QuantExpertsWna16, BadInput) {
  std::mt19937_64 rng(11);
  GptqConfig cfg{4, 32, true, true, GptqZeroFormat::v1_minus_one};
  const GptqTensors gate = quantize_gptq(test::random_tensor({16, 64}, DType::f32, rng), cfg,
                                         shuffled(64, rng));
  const GptqTensors up = quantize_gptq(test::random_tensor({16, 64}, DType::f32, rng), cfg,
                                       shuffled(64, rng));
  // Act-order parts of one group with different g_idx.
  EXPECT_QUANT_ERROR([&] { pack_gptq_experts({{gate, up}}, cfg, "w13"); }, "w13[0][1]",
                     "share their act-order");
  // A part without g_idx beside one with.
  GptqTensors no_gidx = up;
  no_gidx.g_idx = Tensor();
  EXPECT_QUANT_ERROR([&] { pack_gptq_experts({{gate, no_gidx}}, cfg, "w13"); }, "has no g_idx");
  // Scales of the wrong shape: the tensor is named.
  GptqTensors bad_scales = gate;
  bad_scales.scales = Tensor::zeros({3, 16}, DType::f16);
  EXPECT_QUANT_ERROR([&] { pack_gptq_experts({{bad_scales}}, cfg, "w13"); }, "w13[0][0].scales");
  // Groups disagreeing on N.
  const GptqTensors small = quantize_gptq(test::random_tensor({8, 64}, DType::f32, rng), cfg,
                                          shuffled(64, rng));
  EXPECT_QUANT_ERROR([&] { pack_gptq_experts({{gate}, {small}}, cfg, "w2"); }, "group 1",
                     "N = 8");
  // Parts disagreeing on K.
  GptqConfig plain{4, 32, true, false, GptqZeroFormat::v1_minus_one};
  const GptqTensors k64 = quantize_gptq(test::random_tensor({16, 64}, DType::f32, rng), plain);
  const GptqTensors k96 = quantize_gptq(test::random_tensor({16, 96}, DType::f32, rng), plain);
  EXPECT_QUANT_ERROR([&] { pack_gptq_experts({{k64, k96}}, plain, "w13"); }, "w13[0][1]", "K = 96");
  // A group size that does not divide K.
  QuantizeOptions opt;
  opt.group_size = 64;
  EXPECT_QUANT_ERROR([&] { quantize_experts(test::random_tensor({1, 16, 96}, DType::f32, rng), opt); },
                     "must divide K = 96");
  // Empty stacks.
  EXPECT_QUANT_ERROR([&] { pack_awq_experts({}, AwqConfig{}, "w2"); }, "no expert groups");
  // 8-bit tensors read as 4-bit.
  GptqConfig c8{8, 32, true, false, GptqZeroFormat::v1_minus_one};
  const GptqTensors t8 = quantize_gptq(test::random_tensor({16, 64}, DType::f32, rng), c8);
  EXPECT_QUANT_ERROR([&] { pack_gptq_experts({{t8}}, plain, "w2"); }, "8-bit checkpoint read as 4-bit");
}

TEST(QuantExpertsWna16, RandomExpertsHost) {
  for (WeightFormat f : {WeightFormat::int4, WeightFormat::int8}) {
    const ExpertMatrices m =
        random_experts(f, 2, 40, 128, 64, 0.05f, 5, Device::cpu(), Stream());
    EXPECT_EQ(m.n, 40);
    EXPECT_EQ(m.k, 128);
    EXPECT_EQ(m.group_k, 64);
    EXPECT_NO_THROW(m.validate(2, 40, 128, "w"));
    const Tensor d = dequantize_experts(m);
    float amax = 0.0f;
    for (int64_t i = 0; i < d.numel(); ++i) amax = std::max(amax, std::fabs(d.data<float>()[i]));
    EXPECT_LE(amax, 0.05f * 1.01f);
    EXPECT_GT(amax, 0.02f);
  }
  EXPECT_QUANT_ERROR(
      [] { random_experts(WeightFormat::int4, 1, 16, 96, 64, 1.0f, 0, Device::cpu(), Stream()); },
      "must divide K = 96");
}

}  // namespace
}  // namespace moelora
