// NVFP4 expert stacks (cuda_nvfp4's packed layout): pack -> dequantize equals the format's
// dequantizer bit for bit (odd N and K padded, gate/up parts with different weight_scale_2,
// i.e. the per-row global scale), quantize_experts, and bad input.
#include <cmath>
#include <cstring>
#include <random>

#include "moelora/quant/experts.h"
#include "quant_test_util.h"
#include "test_util.h"

namespace moelora {
namespace {

using namespace quant;

// A random [n, k] NVFP4 matrix: random codes, e4m3 scales across the range (subnormals too),
// weight_scale_2 = s2.
Nvfp4Tensors random_part(int64_t n, int64_t k, float s2, std::mt19937_64& rng) {
  Nvfp4Tensors t;
  t.weight = Tensor::empty({n, k / 2}, DType::u8);
  t.weight_scale = Tensor::empty({n, k / 16}, DType::f8_e4m3);
  t.weight_scale_2 = Tensor::empty({}, DType::f32);
  t.weight_scale_2.data<float>()[0] = s2;
  auto* w = t.weight.data<uint8_t>();
  for (int64_t i = 0; i < t.weight.numel(); ++i) w[i] = uint8_t(rng());
  auto* s = reinterpret_cast<uint8_t*>(t.weight_scale.data());
  for (int64_t i = 0; i < t.weight_scale.numel(); ++i) s[i] = uint8_t(rng() % 0x7f);  // no NaN
  return t;
}

// The stacked rows of a group's parts, dequantized by the format's definition.
Tensor expected_group(const std::vector<Nvfp4Tensors>& parts) {
  std::vector<Tensor> rows;
  int64_t n = 0, k = 0;
  for (const auto& p : parts) {
    rows.push_back(dequantize_nvfp4(p, "part"));
    n += rows.back().size(0);
    k = rows.back().size(1);
  }
  Tensor out = Tensor::empty({n, k}, DType::f32);
  int64_t r = 0;
  for (const Tensor& t : rows) {
    std::memcpy(out.data<float>() + r * k, t.data(), size_t(t.nbytes()));
    r += t.size(0);
  }
  return out;
}

void expect_bitwise(const Tensor& got, int64_t g, const Tensor& want) {
  const int64_t n = want.size(0), k = want.size(1);
  const float* a = got.data<float>() + g * n * k;
  const float* b = want.data<float>();
  int64_t bad = 0;
  for (int64_t i = 0; i < n * k; ++i)
    if (std::memcmp(&a[i], &b[i], 4) != 0 && ++bad <= 5)
      ADD_FAILURE() << "group " << g << " (" << i / k << ", " << i % k << "): " << a[i]
                    << " != " << b[i];
  EXPECT_EQ(bad, 0);
}

TEST(QuantExpertsNvfp4, PackDequantizeIsTheFormatsDefinition) {
  std::mt19937_64 rng(11);
  // N = 2 x 24 (not a multiple of 16 per part, 48 in all) and K = 80 (not a multiple of 64).
  for (auto [n_part, k] : {std::pair<int64_t, int64_t>{24, 80}, {7, 16}, {32, 128}}) {
    std::vector<std::vector<Nvfp4Tensors>> parts;
    for (int g = 0; g < 3; ++g)
      parts.push_back({random_part(n_part, k, 0.01f, rng), random_part(n_part, k, 0.01f, rng)});
    const ExpertMatrices m = pack_nvfp4_experts(parts, "w13");
    EXPECT_EQ(m.format, WeightFormat::nvfp4);
    EXPECT_EQ(m.n, 2 * n_part);
    EXPECT_EQ(m.k, k);
    EXPECT_EQ(m.group_k, 16);
    EXPECT_EQ(m.global_scale.dim(), 1);  // one weight_scale_2 everywhere: per group
    m.validate(3, 2 * n_part, k, "w13");
    const Tensor d = dequantize_experts(m);
    ASSERT_EQ(d.shape(), (Shape{3, 2 * n_part, k}));
    for (int g = 0; g < 3; ++g) expect_bitwise(d, g, expected_group(parts[size_t(g)]));
  }
}

TEST(QuantExpertsNvfp4, DifferentGateUpGlobalScalesAreKeptPerRow) {
  std::mt19937_64 rng(12);
  std::vector<std::vector<Nvfp4Tensors>> parts;
  for (int g = 0; g < 2; ++g)
    parts.push_back({random_part(16, 64, 0.5f + g, rng), random_part(16, 64, 0.003f, rng)});
  const ExpertMatrices m = pack_nvfp4_experts(parts, "w13");
  ASSERT_EQ(m.global_scale.shape(), (Shape{2, 32}));
  EXPECT_EQ(m.global_scale.data<float>()[0], 0.5f);
  EXPECT_EQ(m.global_scale.data<float>()[16], 0.003f);
  EXPECT_EQ(m.global_scale.data<float>()[32], 1.5f);
  m.validate(2, 32, 64, "w13");
  const Tensor d = dequantize_experts(m);
  for (int g = 0; g < 2; ++g) expect_bitwise(d, g, expected_group(parts[size_t(g)]));
}

TEST(QuantExpertsNvfp4, QuantizeExpertsRoundTrip) {
  std::mt19937_64 rng(13);
  const Tensor w = test::random_tensor({2, 40, 96}, DType::f32, rng, -2.0f, 2.0f);
  QuantizeOptions opt;
  opt.format = WeightFormat::nvfp4;
  opt.group_size = 16;
  const ExpertMatrices m = quantize_experts(w, opt);
  const Tensor d = dequantize_experts(m);
  for (int64_t g = 0; g < 2; ++g) {
    const Tensor wg = w.narrow(0, g, 1).view({40, 96});
    expect_bitwise(d, g, dequantize_nvfp4(quantize_nvfp4(wg)));
    // RTN error: at most half a step of the largest e2m1 gap (2 of 6) times the block scale.
    const float* a = d.data<float>() + g * 40 * 96;
    const float* b = wg.data<float>();
    for (int64_t i = 0; i < 40 * 96; ++i) ASSERT_NEAR(a[i], b[i], 2.0f / 6.0f + 1e-3f) << i;
  }
  opt.group_size = 32;
  EXPECT_QUANT_ERROR([&] { quantize_experts(w, opt); }, "group size 16", "32");
}

TEST(QuantExpertsNvfp4, BadInputNamesThePart) {
  std::mt19937_64 rng(14);
  EXPECT_QUANT_ERROR([&] { pack_nvfp4_experts({}, "w2"); }, "w2");
  // K differs between parts.
  EXPECT_QUANT_ERROR(
      [&] { pack_nvfp4_experts({{random_part(16, 64, 1, rng), random_part(16, 32, 1, rng)}}, "w13"); },
      "w13[0].part1", "K = 32", "64");
  // Groups disagree on N.
  EXPECT_QUANT_ERROR(
      [&] { pack_nvfp4_experts({{random_part(16, 64, 1, rng)}, {random_part(8, 64, 1, rng)}}, "w2"); },
      "group 1", "8", "16");
  // A NaN block scale, and a scale tensor of the wrong shape.
  Nvfp4Tensors bad = random_part(16, 64, 1, rng);
  reinterpret_cast<uint8_t*>(bad.weight_scale.data())[5] = 0x7f;
  EXPECT_QUANT_ERROR([&] { pack_nvfp4_experts({{bad}}, "w2"); }, "w2[0].part0.weight_scale");
  Nvfp4Tensors wrong = random_part(16, 64, 1, rng);
  wrong.weight_scale = Tensor::zeros({16, 3}, DType::f8_e4m3);
  EXPECT_QUANT_ERROR([&] { pack_nvfp4_experts({{wrong}}, "w2"); }, "w2[0].part0.weight_scale",
                     "[16, 4]");
  // A zero global scale.
  Nvfp4Tensors zero = random_part(16, 64, 0.0f, rng);
  EXPECT_QUANT_ERROR([&] { pack_nvfp4_experts({{zero}}, "w2"); }, "weight_scale_2");
}


// The kernel's unpack (sm90_moe_gemm_nvfp4.cuh: nvfp4::unpack_codes), replayed on the host:
// every register half must be the bf16 bit pattern of e2m1 * 2^-126 of the code the layout put
// there, so the GPU sees the format's values (checked against dequantize_experts).
TEST(QuantExpertsNvfp4, KernelUnpackMatchesTheLayout) {
  std::mt19937_64 rng(15);
  const ExpertMatrices m = pack_nvfp4_experts({{random_part(16, 64, 1.0f, rng)}}, "w");
  const Tensor d = dequantize_experts(m);
  const auto* w = m.w.data<uint8_t>();
  const auto* sc = reinterpret_cast<const uint8_t*>(m.scales.data());
  constexpr uint32_t kMask = 0x81C081C0u;
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j) {
      uint32_t x = 0;
      std::memcpy(&x, w + lane * 16 + j * 4, 4);
      const uint32_t a[4] = {x & kMask, (x << 3) & kMask, (x << 6) & kMask,
                             ((x << 1) & 0x80008000u) | ((x >> 5) & 0x01000100u) |
                                 ((x >> 4) & 0x00C000C0u)};
      for (int s = 0; s < 4; ++s)
        for (int h = 0; h < 2; ++h) {
          const uint32_t bits = (a[s] >> (16 * h)) & 0xffffu;
          float v = 0;
          const uint32_t f = bits << 16;
          std::memcpy(&v, &f, 4);
          const int row = lane / 4 + ((s & 1) ? 8 : 0);
          const int col = 16 * j + 2 * (lane % 4) + ((s & 2) ? 8 : 0) + h;
          const float scale = f8e4m3_to_float(f8e4m3_t{sc[(lane / 4) * 8 + j * 2 + (s & 1)]});
          ASSERT_EQ(std::ldexp(double(v), 126) * scale, double(d.data<float>()[row * 64 + col]))
              << "lane " << lane << " step " << j << " reg " << s << " half " << h;
        }
    }
}

}  // namespace
}  // namespace moelora
