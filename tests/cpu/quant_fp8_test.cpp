// FP8 block-scale weights: e4m3 edge values, partial blocks when N or K is not a multiple of
// 128, transformers' quantization formula, the dynamic 1 x 128 activation quantization, and
// bad checkpoints.
#include <cmath>
#include <tuple>
#include <random>

#include "moelora/quant/fp8_block.h"
#include "quant_test_util.h"
#include "test_util.h"

namespace moelora {
namespace {

using namespace quant;
using quant_test::clone;

TEST(QuantFp8Block, E4m3EdgeValuesTimesTheBlockMultiplier) {
  // One 1 x 8 weight, one block, weight_scale_inv = 2 (a multiplier).
  Fp8BlockTensors t;
  t.weight = quant_test::u8_tensor({0x7e, 0xfe, 0x01, 0x07, 0x08, 0x80, 0x38, 0x00}, {1, 8},
                                   DType::f8_e4m3);
  t.weight_scale_inv = quant_test::f32_tensor({2.0f}, {1, 1});
  const Tensor w = dequantize_fp8_block(t, {}, "edge");
  const std::vector<float> expect = {896.0f,         -896.0f, 2.0f * 0x1p-9f, 2.0f * 7 * 0x1p-9f,
                                     2.0f * 0x1p-6f, -0.0f,   2.0f,           0.0f};
  for (size_t i = 0; i < expect.size(); ++i) EXPECT_EQ(w.data<float>()[i], expect[i]) << i;
  EXPECT_TRUE(std::signbit(w.data<float>()[5]));
}

TEST(QuantFp8Block, PartialBlocksWhenNAndKAreNotMultiplesOf128) {
  const int64_t n = 130, k = 200;
  Fp8BlockTensors t;
  t.weight = quant_test::u8_tensor(std::vector<uint8_t>(size_t(n * k), 0x38), {n, k},
                                   DType::f8_e4m3);  // 1.0 everywhere
  t.weight_scale_inv = quant_test::f32_tensor({1.0f, 2.0f, 3.0f, 4.0f}, {2, 2});
  const QuantDims d = validate_fp8_block(t, {}, "pad");
  EXPECT_EQ(d.num_groups_n, 2);
  EXPECT_EQ(d.num_groups, 2);
  const Tensor w = dequantize_fp8_block(t, {}, "pad");
  const float* p = w.data<float>();
  EXPECT_EQ(p[0 * k + 0], 1.0f);
  EXPECT_EQ(p[0 * k + 127], 1.0f);
  EXPECT_EQ(p[127 * k + 128], 2.0f);
  EXPECT_EQ(p[128 * k + 0], 3.0f);
  EXPECT_EQ(p[129 * k + 199], 4.0f);
  // A floor-sized grid (transformers' divisible-only shapes) is rejected, naming ceil.
  t.weight_scale_inv = quant_test::f32_tensor({1.0f}, {1, 1});
  EXPECT_QUANT_ERROR([&] { validate_fp8_block(t, {}, "pad"); }, "pad.weight_scale_inv",
                     "expected shape [2, 2]", "found [1, 1]", "ceil(N/128)");
}

TEST(QuantFp8Block, QuantizerIsTransformersFormula) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t n = 130, k = 200;
  Tensor w = test::random_tensor({n, k}, DType::bf16, rng, -2.0f, 2.0f);
  // Block (1, 0) all zero: scale 1, weights 0.
  for (int64_t r = 128; r < n; ++r)
    for (int64_t c = 0; c < 128; ++c) w.data<bf16_t>()[r * k + c] = float_to_bf16(0.0f);
  // Block (0, 1) holds subnormal-bound values next to an amax of 448 (scale exactly 1).
  w.data<bf16_t>()[0 * k + 128] = float_to_bf16(448.0f);
  w.data<bf16_t>()[0 * k + 129] = float_to_bf16(0x1p-9f);       // smallest subnormal
  w.data<bf16_t>()[0 * k + 130] = float_to_bf16(3 * 0x1p-10f);  // 1.5 ulp: ties to even (2)
  w.data<bf16_t>()[0 * k + 131] = float_to_bf16(0x1p-10f);      // 0.5 ulp: ties to even (0)
  w.data<bf16_t>()[0 * k + 132] = float_to_bf16(-300.0f);       // 288 or 320: 300 -> 288
  const Fp8BlockTensors q = quantize_fp8_block(w);
  ASSERT_EQ(q.weight_scale_inv.shape(), (Shape{2, 2}));
  const float* sinv = q.weight_scale_inv.data<float>();
  EXPECT_EQ(sinv[1 * 2 + 0], 1.0f);
  EXPECT_EQ(sinv[0 * 2 + 1], 1.0f);
  const auto* bytes = reinterpret_cast<const uint8_t*>(q.weight.data());
  EXPECT_EQ(bytes[128], 0x7e);
  EXPECT_EQ(bytes[129], 0x01);
  EXPECT_EQ(bytes[130], 0x02);
  EXPECT_EQ(bytes[131], 0x00);
  EXPECT_EQ(f8e4m3_to_float(f8e4m3_t{bytes[132]}), -288.0f);
  EXPECT_EQ(bytes[129 * k + 5], 0x00);
  // Every block: amax -> 448 / amax, weight = e4m3(w * scale), weight_scale_inv = 1 / scale.
  const std::vector<float> v = test::to_floats(w);
  for (int64_t bn = 0; bn < 2; ++bn)
    for (int64_t bk = 0; bk < 2; ++bk) {
      float amax = 0;
      for (int64_t r = bn * 128; r < std::min(n, bn * 128 + 128); ++r)
        for (int64_t c = bk * 128; c < std::min(k, bk * 128 + 128); ++c)
          amax = std::max(amax, std::fabs(v[size_t(r * k + c)]));
      const float scale = amax > 0 ? 448.0f / amax : 1.0f;
      EXPECT_EQ(sinv[bn * 2 + bk], 1.0f / scale);
      for (int64_t r = bn * 128; r < std::min(n, bn * 128 + 128); ++r)
        for (int64_t c = bk * 128; c < std::min(k, bk * 128 + 128); ++c)
          ASSERT_EQ(bytes[r * k + c], float_to_f8e4m3(v[size_t(r * k + c)] * scale).bits)
              << r << "," << c;
    }
}

TEST(QuantFp8Block, QuantizeWriteReadDequantizeRoundTrip) {
  std::mt19937_64 rng(test::fresh_seed());
  for (auto [n, k] : {std::pair<int64_t, int64_t>{256, 384}, {100, 260}, {1, 129}}) {
    SCOPED_TRACE(fmt::format("{} x {}", n, k));
    // Blocks of very different magnitudes, so a scale applied to the wrong block shows.
    Tensor w = test::random_tensor({n, k}, DType::bf16, rng, -0.1f, 0.1f);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < k; ++c) {
        bf16_t& x = w.data<bf16_t>()[r * k + c];
        x = float_to_bf16(bf16_to_float(x) * float(1 + 8 * (r / 128) + 3 * (c / 128)));
      }
    const Fp8BlockTensors q = quantize_fp8_block(w);
    std::map<std::string, Tensor> tensors;
    add_fp8_block_tensors(tensors, "model.layers.0.mlp.experts.7.down_proj", q);
    const std::string path = quant_test::temp_path("fp8.safetensors");
    quant_test::write_file(path, tensors);
    SafetensorsFile file(path);
    EXPECT_EQ(file.entry("model.layers.0.mlp.experts.7.down_proj.weight").dtype, "F8_E4M3");
    const Fp8BlockTensors back = load_fp8_block(file, "model.layers.0.mlp.experts.7.down_proj");
    const std::vector<float> ref = test::to_floats(w),
                             got = quant_test::values(dequantize_fp8_block(back, {}));
    const int64_t gk = ceil_div(k, 128);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < k; ++c) {
        const float s = back.weight_scale_inv.data<float>()[(r / 128) * gk + c / 128];
        const float x = ref[size_t(r * k + c)];
        // 3 mantissa bits: half an ulp is 2^-4 relative; subnormals step by 2^-9 * s.
        const float tol = std::max(std::fabs(x) * 0x1p-4f, 0x1p-10f * s) * 1.001f;
        ASSERT_LE(std::fabs(got[size_t(r * k + c)] - x), tol) << r << "," << c;
      }
    std::filesystem::remove(path);
  }
}

// transformers 5.x saves a per-expert scale grid of one block row or column squeezed to 1-D;
// the loader views it back, and refuses a 1-D scale whose grid has no unit dimension.
TEST(QuantFp8Block, LoadsSqueezedScaleGrid) {
  std::mt19937_64 rng(test::fresh_seed());
  for (auto [n, k, ok] : {std::tuple<int64_t, int64_t, bool>{128, 256, true}, {256, 128, true},
                          {256, 256, false}}) {
    SCOPED_TRACE(fmt::format("{} x {}", n, k));
    const Fp8BlockTensors q = quantize_fp8_block(test::random_tensor({n, k}, DType::bf16, rng));
    std::map<std::string, Tensor> tensors;
    tensors["e.weight"] = q.weight;
    tensors["e.weight_scale_inv"] = q.weight_scale_inv.view({q.weight_scale_inv.numel()});
    const std::string path = quant_test::temp_path("fp8_squeezed.safetensors");
    quant_test::write_file(path, tensors);
    SafetensorsFile file(path);
    if (ok) {
      const Fp8BlockTensors back = load_fp8_block(file, "e");
      EXPECT_EQ(back.weight_scale_inv.shape(), q.weight_scale_inv.shape());
      EXPECT_EQ(test::to_floats(dequantize_fp8_block(back, {})),
                test::to_floats(dequantize_fp8_block(q, {})));
    } else {
      test::expect_error([&] { load_fp8_block(file, "e"); }, "e.weight_scale_inv");
    }
    std::filesystem::remove(path);
  }
}

TEST(QuantFp8Block, DynamicActivationQuantizationPer128Channels) {
  const int64_t m = 3, k = 300;
  std::mt19937_64 rng(test::fresh_seed());
  Tensor x = test::random_tensor({m, k}, DType::bf16, rng, -4.0f, 4.0f);
  for (int64_t c = 0; c < k; ++c) x.data<bf16_t>()[2 * k + c] = float_to_bf16(0.0f);  // zero row
  const Fp8Activation a = quantize_fp8_activation(x);
  ASSERT_EQ(a.scale.shape(), (Shape{m, 3}));
  const std::vector<float> v = test::to_floats(x);
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t g = 0; g < 3; ++g) {
      float amax = 0;
      for (int64_t c = g * 128; c < std::min(k, g * 128 + 128); ++c)
        amax = std::max(amax, std::fabs(v[size_t(r * k + c)]));
      EXPECT_EQ(a.scale.data<float>()[r * 3 + g], amax / 448.0f);  // s = amax / 448
    }
  EXPECT_EQ(a.scale.data<float>()[2 * 3 + 1], kFp8ActEps / 448.0f);
  const std::vector<float> got = quant_test::values(dequantize_fp8_activation(a));
  for (int64_t i = 0; i < m * k; ++i) {
    const float s = a.scale.data<float>()[(i / k) * 3 + (i % k) / 128];
    ASSERT_LE(std::fabs(got[size_t(i)] - v[size_t(i)]),
              std::max(std::fabs(v[size_t(i)]) * 0x1p-4f, 0x1p-10f * s) * 1.001f)
        << i;
  }
  for (int64_t c = 0; c < k; ++c) EXPECT_EQ(got[size_t(2 * k + c)], 0.0f);
}

TEST(QuantFp8Block, BadCheckpointsNameTheTensor) {
  std::mt19937_64 rng(test::fresh_seed());
  const Tensor w = test::random_tensor({130, 256}, DType::bf16, rng);
  const Fp8BlockTensors good = quantize_fp8_block(w);
  EXPECT_NO_THROW(validate_fp8_block(good, {}, "l"));
  for (float bad : {NAN, INFINITY, 0.0f, -1.0f}) {
    Fp8BlockTensors t = good;
    t.weight_scale_inv = clone(good.weight_scale_inv);
    t.weight_scale_inv.data<float>()[1 * 2 + 1] = bad;
    EXPECT_QUANT_ERROR([&] { validate_fp8_block(t, {}, "l"); }, "l.weight_scale_inv[1, 1]",
                       std::isfinite(bad) ? "positive" : "finite");
  }
  Fp8BlockTensors t = good;
  t.weight = clone(good.weight);
  reinterpret_cast<uint8_t*>(t.weight.data())[3 * 256 + 4] = 0xff;  // e4m3 NaN
  EXPECT_QUANT_ERROR([&] { validate_fp8_block(t, {}, "l"); }, "l.weight[3, 4]", "NaN");
  t = good;
  t.weight = w;  // bf16 weight where fp8 is declared
  EXPECT_QUANT_ERROR([&] { validate_fp8_block(t, {}, "l"); }, "l.weight", "f8_e4m3", "found bf16");
  t = good;
  t.weight_scale_inv = Tensor::zeros({2, 2}, DType::bf16);
  EXPECT_QUANT_ERROR([&] { validate_fp8_block(t, {}, "l"); }, "l.weight_scale_inv",
                     "expected dtype f32, found bf16");
  // A 64 x 64 block config against a 128 x 128 checkpoint.
  EXPECT_QUANT_ERROR(
      [&] {
        validate_fp8_block(good, {64, 64}, "l");
      },
      "l.weight_scale_inv", "expected shape [3, 4]", "found [2, 2]");

  std::map<std::string, Tensor> tensors;
  add_fp8_block_tensors(tensors, "l", good);
  const std::string path = quant_test::temp_path("fp8_trunc.safetensors");
  quant_test::write_file(path, tensors, /*cut=*/1);
  EXPECT_QUANT_ERROR([&] { SafetensorsFile f(path); }, "l.weight_scale_inv", "truncated");
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace moelora
