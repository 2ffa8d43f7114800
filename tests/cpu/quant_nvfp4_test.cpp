// NVFP4 (ModelOpt): e2m1 codes including -0, nibble order, ModelOpt's rounding and scales,
// round trips through safetensors, and bad checkpoints.
#include <cmath>
#include <random>

#include "moelora/quant/nvfp4.h"
#include "quant_test_util.h"
#include "test_util.h"

namespace moelora {
namespace {

using namespace quant;
using quant_test::clone;

Tensor scalar(float v) {
  Tensor t = Tensor::empty({}, DType::f32);
  t.data<float>()[0] = v;
  return t;
}

TEST(QuantNvfp4, E2m1CodesIncludingNegativeZero) {
  const float expect[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
  for (uint8_t c = 0; c < 16; ++c) {
    EXPECT_EQ(e2m1_to_float(c), expect[c]) << int(c);
    EXPECT_EQ(std::signbit(e2m1_to_float(c)), c >= 8) << int(c);
  }
}

TEST(QuantNvfp4, RoundingMatchesModelOpt) {
  // Ties go to the even code: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2,
  // 3.5 -> 4, 5 -> 4; beyond 6 saturates; tiny negatives keep the sign (-0).
  const std::vector<std::pair<float, uint8_t>> cases = {
      {0.0f, 0},  {0.24f, 0},  {0.25f, 0}, {0.26f, 1}, {0.75f, 2},   {1.25f, 2},  {1.3f, 3},
      {1.75f, 4}, {2.5f, 4},   {2.6f, 5},  {3.5f, 6},  {4.9f, 6},    {5.0f, 6},   {5.1f, 7},
      {6.0f, 7},  {100.0f, 7}, {-0.1f, 8}, {-0.0f, 0}, {-0.75f, 10}, {-3.5f, 14}, {-7.0f, 15}};
  for (auto [v, code] : cases) EXPECT_EQ(int(float_to_e2m1(v)), int(code)) << v;
}

TEST(QuantNvfp4, LowNibbleIsTheEvenElement) {
  Nvfp4Tensors t;
  std::vector<uint8_t> bytes(8, 0x00);
  bytes[0] = 0x2f;  // element 0: code 0xf = -6; element 1: code 2 = 1.0
  bytes[7] = 0x87;  // element 14: 6; element 15: -0
  t.weight = quant_test::u8_tensor(bytes, {1, 8});
  t.weight_scale = quant_test::u8_tensor({0x40}, {1, 1}, DType::f8_e4m3);  // e4m3 2.0
  t.weight_scale_2 = scalar(0.25f);
  t.input_scale = scalar(1.0f);
  const QuantDims d = validate_nvfp4(t, "hand");
  EXPECT_EQ(d.k, 16);
  EXPECT_EQ(d.packed_cols, 8);
  const Tensor w = dequantize_nvfp4(t, "hand");
  const float* p = w.data<float>();
  EXPECT_EQ(p[0], -6.0f * 2.0f * 0.25f);
  EXPECT_EQ(p[1], 1.0f * 2.0f * 0.25f);
  EXPECT_EQ(p[14], 6.0f * 0.5f);
  EXPECT_EQ(p[15], 0.0f);
  EXPECT_TRUE(std::signbit(p[15]));
  EXPECT_EQ(nvfp4_code(t, 0, 0), 0xf);
  EXPECT_EQ(nvfp4_code(t, 0, 1), 0x2);
}

TEST(QuantNvfp4, QuantizerScalesAreModelOpts) {
  // One block of 16 e2m1 values times 7/16, so amax = 2.625: weight_scale_2 = 2.625 / (448 * 6)
  // = 2^-10 exactly, the block scale 2.625 / (6 * 2^-10) = 448, and w / (448 * 2^-10) gives back
  // the e2m1 values exactly, ties included (0.25, 0.75, 1.25, 2.5, 3.5, 5 round to even).
  const float kUnit = 0.4375f;
  std::vector<float> v(32, 0.0f);
  const float row[16] = {6, -3, 1.5f, 0.25f, 0.75f, -0.1f, 2.5f, 5,
                         4, -6, 0.5f, 1.25f, 0,     3.5f,  -2,   1.75f};
  const uint8_t codes[16] = {7, 13, 3, 0, 2, 8, 4, 6, 6, 15, 1, 2, 0, 6, 12, 4};
  for (int i = 0; i < 16; ++i) v[size_t(i)] = row[i] * kUnit;
  for (int i = 16; i < 32; ++i) v[size_t(i)] = 0.001f * float(i - 16);  // second block, tiny
  const Tensor w = quant_test::f32_tensor(v, {1, 32});
  const Nvfp4Tensors q = quantize_nvfp4(w, /*input_amax=*/12.0f);
  EXPECT_EQ(q.weight_scale_2.dim(), 0);
  const float s2 = 0x1p-10f;
  EXPECT_EQ(q.weight_scale_2.data<float>()[0], s2);
  EXPECT_EQ(q.input_scale.data<float>()[0], 12.0f / 2688.0f);
  const auto* sc = reinterpret_cast<const uint8_t*>(q.weight_scale.data());
  EXPECT_EQ(sc[0], 0x7e);  // 448
  // Second block: amax 0.015 -> 0.015 / (6 s2) = 2.56 -> e4m3 2.5.
  EXPECT_EQ(f8e4m3_to_float(f8e4m3_t{sc[1]}), 2.5f);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(int(nvfp4_code(q, 0, i)), int(codes[i])) << i;
  const Tensor dq = dequantize_nvfp4(q);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(dq.data<float>()[i], e2m1_to_float(codes[i]) * kUnit) << i;
  for (int i = 16; i < 32; ++i)  // 0.001 i / (2.5 * 2^-10) on the e2m1 grid
    EXPECT_EQ(dq.data<float>()[i],
              e2m1_to_float(float_to_e2m1(v[size_t(i)] / (2.5f * s2))) * 2.5f * s2)
        << i;
  // An all-zero weight still gets finite scales.
  const Nvfp4Tensors z = quantize_nvfp4(Tensor::zeros({2, 16}, DType::bf16));
  EXPECT_NO_THROW(validate_nvfp4(z, "zero"));
  for (float x : quant_test::values(dequantize_nvfp4(z))) EXPECT_EQ(x, 0.0f);
}

// Half the gap to the next e2m1 magnitude at |v| (the format's step there).
float half_step(float a) {
  return a <= 2.0f ? 0.25f : a <= 4.0f ? 0.5f : 1.0f;
}

TEST(QuantNvfp4, QuantizeWriteReadDequantizeRoundTrip) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t n = 24, k = 96;
  const Tensor w = test::random_tensor({n, k}, DType::bf16, rng, -0.3f, 0.3f);
  const Nvfp4Tensors q = quantize_nvfp4(w, 1.0f);
  std::map<std::string, Tensor> tensors;
  add_nvfp4_tensors(tensors, "model.layers.3.mlp.experts.1.gate_proj", q);
  const std::string path = quant_test::temp_path("nvfp4.safetensors");
  quant_test::write_file(path, tensors);
  SafetensorsFile file(path);
  EXPECT_EQ(file.entry("model.layers.3.mlp.experts.1.gate_proj.weight_scale_2").shape, Shape{});
  const Nvfp4Tensors back = load_nvfp4(file, "model.layers.3.mlp.experts.1.gate_proj");
  EXPECT_EQ(validate_nvfp4(back, "x"), nvfp4_dims(n, k));
  const std::vector<float> ref = test::to_floats(w),
                           got = quant_test::values(dequantize_nvfp4(back));
  const float s2 = back.weight_scale_2.data<float>()[0];
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) {
      const float denom =
          f8e4m3_to_float(back.weight_scale.data<f8e4m3_t>()[r * (k / 16) + c / 16]) * s2;
      const float a = std::fabs(ref[size_t(r * k + c)]) / denom;
      // Within half a step of the e2m1 grid, plus what saturation at 6 cuts off (the e4m3
      // rounding of the block scale can push a block's amax slightly past 6).
      const float tol = (half_step(std::min(a, 6.0f)) + std::max(a - 6.0f, 0.0f)) * denom * 1.0001f;
      ASSERT_LE(std::fabs(got[size_t(r * k + c)] - ref[size_t(r * k + c)]), tol) << r << "," << c;
    }
  EXPECT_LT(test::diff(got, ref).rel_l2, 0.15);
  std::filesystem::remove(path);
}

TEST(QuantNvfp4, BadCheckpointsNameTheTensor) {
  std::mt19937_64 rng(test::fresh_seed());
  const Tensor w = test::random_tensor({8, 64}, DType::bf16, rng);
  const Nvfp4Tensors good = quantize_nvfp4(w, 2.0f);
  EXPECT_NO_THROW(validate_nvfp4(good, "l"));

  Nvfp4Tensors t = good;
  t.weight_scale = Tensor::zeros({8, 8}, DType::f8_e4m3);  // K/8: a group of 8
  EXPECT_QUANT_ERROR([&] { validate_nvfp4(t, "l"); }, "l.weight_scale", "expected shape [8, 4]",
                     "found [8, 8]");
  t = good;
  t.weight = Tensor::zeros({8, 5}, DType::u8);  // K = 10
  EXPECT_QUANT_ERROR([&] { validate_nvfp4(t, "l"); }, "l.weight", "K = 2 x 5 columns = 10",
                     "multiple of 16");
  t = good;
  t.weight = Tensor::zeros({8, 8}, DType::i32);  // packed like int4 GPTQ
  EXPECT_QUANT_ERROR([&] { validate_nvfp4(t, "l"); }, "l.weight", "expected u8", "found i32");
  for (uint8_t bad : {uint8_t(0x7f), uint8_t(0xc0)}) {  // NaN, -2.0
    t = good;
    t.weight_scale = clone(good.weight_scale);
    reinterpret_cast<uint8_t*>(t.weight_scale.data())[2 * 4 + 3] = bad;
    EXPECT_QUANT_ERROR([&] { validate_nvfp4(t, "l"); }, "l.weight_scale[2, 3]",
                       "finite non-negative");
  }
  for (float bad : {NAN, INFINITY, 0.0f}) {
    t = good;
    t.weight_scale_2 = scalar(bad);
    EXPECT_QUANT_ERROR([&] { validate_nvfp4(t, "l"); }, "l.weight_scale_2", "finite positive");
    t = good;
    t.input_scale = scalar(bad);
    EXPECT_QUANT_ERROR([&] { validate_nvfp4(t, "l"); }, "l.input_scale", "finite positive");
  }
  t = good;
  t.weight_scale_2 = Tensor::zeros({2}, DType::f32);
  EXPECT_QUANT_ERROR([&] { validate_nvfp4(t, "l"); }, "l.weight_scale_2", "f32 scalar",
                     "found f32 [2]");

  std::map<std::string, Tensor> tensors;
  add_nvfp4_tensors(tensors, "l", good);
  const std::string path = quant_test::temp_path("nvfp4_trunc.safetensors");
  quant_test::write_file(path, tensors, /*cut=*/2);
  EXPECT_QUANT_ERROR([&] { SafetensorsFile f(path); }, "l.weight_scale_2", "truncated");
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace moelora
