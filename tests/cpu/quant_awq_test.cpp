// AWQ int4 (GEMM): the interleaved nibble order on hand-built words, round trips through
// safetensors, and bad checkpoints.
#include <cmath>
#include <random>

#include "moelora/quant/awq.h"
#include "quant_test_util.h"
#include "test_util.h"

namespace moelora {
namespace {

using namespace quant;
using quant_test::clone;

// AutoAWQ's packing written out independently (WQLinear_GEMM.from_linear): nibble i of a
// word takes logical column order_map[i] of its pack of 8.
uint32_t autoawq_pack(const int (&cols)[8]) {
  static constexpr int kOrderMap[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  uint32_t w = 0;
  for (int i = 0; i < 8; ++i) w |= uint32_t(cols[kOrderMap[i]]) << (4 * i);
  return w;
}

TEST(QuantAwq, NibbleOrderFollowsAutoAwq) {
  // Logical columns 0..7 hold 0..7: AutoAWQ stores 0x75316420.
  const int ramp[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(autoawq_pack(ramp), 0x75316420u);
  // N = 8, K = 32, one group; row k = 0 holds the ramp, other rows hold 8 everywhere.
  std::vector<int32_t> qw(32, int32_t(0x88888888u));
  qw[0] = int32_t(autoawq_pack(ramp));
  const int zeros[8] = {1, 0, 0, 0, 0, 0, 0, 3};  // zero 1 for column 0, 3 for column 7
  AwqTensors t;
  t.qweight = quant_test::i32_tensor(qw, {32, 1});
  t.qzeros = quant_test::i32_tensor({int32_t(autoawq_pack(zeros))}, {1, 1});
  t.scales = quant_test::f16_tensor({0.5f, 1, 1, 1, 1, 1, 1, 2.0f}, {1, 8});
  const AwqConfig cfg{.group_size = 32};
  const Tensor w = dequantize_awq(t, cfg, "hand");
  const float* p = w.data<float>();
  for (int j = 0; j < 8; ++j) EXPECT_EQ(awq_q(t, j, 0), j) << j;
  EXPECT_FLOAT_EQ(p[0 * 32 + 0], 0.5f * (0 - 1));
  EXPECT_FLOAT_EQ(p[1 * 32 + 0], 1.0f * (1 - 0));
  EXPECT_FLOAT_EQ(p[4 * 32 + 0], 1.0f * (4 - 0));
  EXPECT_FLOAT_EQ(p[7 * 32 + 0], 2.0f * (7 - 3));
  EXPECT_FLOAT_EQ(p[7 * 32 + 5], 2.0f * (8 - 3));
  // The raw word 0x76543210 (nibble i = i) reads as columns {0,4,1,5,2,6,3,7}.
  t.qweight = clone(t.qweight);
  t.qweight.data<int32_t>()[0] = 0x76543210;
  for (int j = 0; j < 8; ++j) EXPECT_EQ(awq_q(t, j, 0), kAwqReverseOrder[size_t(j)]) << j;
}

TEST(QuantAwq, QuantizeWriteReadDequantizeRoundTrip) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t n = 48, k = 256;
  for (int64_t group : {32, 64, 128, -1}) {
    SCOPED_TRACE(group);
    Tensor w = test::random_tensor({n, k}, DType::bf16, rng, -0.5f, 1.5f);
    const AwqConfig cfg{.group_size = group};
    const AwqTensors q = quantize_awq(w, cfg);
    std::map<std::string, Tensor> tensors;
    add_awq_tensors(tensors, "model.layers.1.mlp.experts.0.down_proj", q);
    const std::string path = quant_test::temp_path("awq.safetensors");
    quant_test::write_file(path, tensors);
    SafetensorsFile file(path);
    const AwqTensors back = load_awq(file, "model.layers.1.mlp.experts.0.down_proj", cfg);
    const QuantDims d = validate_awq(back, cfg, "x");
    EXPECT_EQ(d, awq_dims(cfg, n, k));
    EXPECT_EQ(d.packed_rows, k);
    EXPECT_EQ(d.packed_cols, n / 8);
    const std::vector<float> ref = test::to_floats(w),
                             got = quant_test::values(dequantize_awq(back, cfg));
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < k; ++c) {
        const float s = f16_to_float(back.scales.data<f16_t>()[(c / d.group_size) * n + r]);
        // Half a step, up to a full one where the rounded zero clips the range's edge, plus
        // the f16 rounding of the scale over 16 steps.
        ASSERT_LE(std::fabs(got[size_t(r * k + c)] - ref[size_t(r * k + c)]),
                  1.0f * s + 16.0f / 2048.0f * s + 1e-6f)
            << r << "," << c;
      }
    EXPECT_LT(test::diff(got, ref).rel_l2, 0.1);
    std::filesystem::remove(path);
  }
}

TEST(QuantAwq, BadCheckpointsNameTheTensor) {
  std::mt19937_64 rng(test::fresh_seed());
  const Tensor w = test::random_tensor({64, 256}, DType::f32, rng);
  const AwqConfig cfg{.group_size = 128};
  const AwqTensors good = quantize_awq(w, cfg);
  EXPECT_NO_THROW(validate_awq(good, cfg, "l"));

  AwqTensors t = good;
  t.scales = Tensor::zeros({2, 56}, DType::f16);
  EXPECT_QUANT_ERROR([&] { validate_awq(t, cfg, "l"); }, "l.qweight", "N/8 = 7",
                     "found i32 [256, 8]");
  t = good;
  t.scales = Tensor::zeros({3, 64}, DType::f16);
  EXPECT_QUANT_ERROR([&] { validate_awq(t, cfg, "l"); }, "l.scales has 3 groups of 128");
  // A GPTQ-layout qweight [K/8, N].
  t = good;
  t.qweight = Tensor::zeros({32, 64}, DType::i32);
  EXPECT_QUANT_ERROR([&] { validate_awq(t, cfg, "l"); }, "l.qweight", "GPTQ's [K/8, N]");
  // 8-bit values packed 4 per word.
  t = good;
  t.qweight = Tensor::zeros({256, 16}, DType::i32);
  EXPECT_QUANT_ERROR([&] { validate_awq(t, cfg, "l"); }, "l.qweight", "8-bit values",
                     "only stores 4-bit");
  EXPECT_QUANT_ERROR([&] { awq_dims({.bits = 8}, 64, 256); }, "only 4 is supported");
  EXPECT_QUANT_ERROR([&] { validate_awq(good, {.group_size = 256}, "l"); }, "group_size",
                     "found 256");
  t = good;
  t.qzeros = Tensor::zeros({2, 64}, DType::i32);
  EXPECT_QUANT_ERROR([&] { validate_awq(t, cfg, "l"); }, "l.qzeros", "expected shape [2, 8]",
                     "found [2, 64]");
  for (float bad : {NAN, -INFINITY}) {
    t = good;
    t.scales = clone(good.scales);
    t.scales.data<f16_t>()[1 * 64 + 9] = float_to_f16(bad);
    EXPECT_QUANT_ERROR([&] { validate_awq(t, cfg, "l"); }, "l.scales[1, 9]", "finite");
  }
  std::map<std::string, Tensor> tensors;
  add_awq_tensors(tensors, "l", good);
  const std::string path = quant_test::temp_path("awq_trunc.safetensors");
  quant_test::write_file(path, tensors, /*cut=*/4);
  EXPECT_QUANT_ERROR([&] { SafetensorsFile f(path); }, "l.scales", "truncated");
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace moelora
