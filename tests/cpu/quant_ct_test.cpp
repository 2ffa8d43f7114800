// compressed-tensors pack-quantized int4/int8: the packing (element 0 in the low bits,
// signed offset 2^(bits-1), K padded to a whole word, zero points packed along N), round trips
// through safetensors, and bad checkpoints.
#include <cmath>
#include <random>

#include "moelora/quant/compressed_tensors.h"
#include "quant_test_util.h"
#include "test_util.h"

namespace moelora {
namespace {

using namespace quant;
using quant_test::clone;

Tensor shape_tensor(int64_t n, int64_t k) {
  Tensor t = Tensor::empty({2}, DType::i64);
  t.data<int64_t>()[0] = n;
  t.data<int64_t>()[1] = k;
  return t;
}

// Row 0: signed q = k - 8 for k = 0..9 (K = 10 pads the second word); row 1: q = 0.
// Asymmetric channel zero points: row 0 -> -2 (field 6), row 1 -> 3 (field 11).
TEST(QuantCompressedTensors, Int4PackingFollowsTheLibrary) {
  CtPackTensors t;
  // pack_to_int32([-8..1] + 8) = fields 0..7 | 8, 9: words 0x76543210 and 0x98.
  t.weight_packed = quant_test::i32_tensor({0x76543210, 0x98, int32_t(0x88888888u), 0x88}, {2, 2});
  t.weight_scale = quant_test::f32_tensor({0.25f, 0.5f}, {2, 1});
  t.weight_shape = shape_tensor(2, 10);
  t.weight_zero_point = quant_test::i32_tensor({0xb6}, {1, 1});
  CtPackConfig cfg{.bits = 4, .strategy = CtStrategy::channel, .symmetric = false};
  const QuantDims d = validate_ct_pack(t, cfg, "hand");
  EXPECT_EQ(d.packed_cols, 2);
  EXPECT_EQ(d.k, 10);
  const Tensor w = dequantize_ct_pack(t, cfg, "hand");
  ASSERT_EQ(w.shape(), (Shape{2, 10}));
  for (int k = 0; k < 10; ++k) {
    EXPECT_EQ(ct_q(t, 4, 0, k), k - 8);
    EXPECT_FLOAT_EQ(w.data<float>()[k], 0.25f * float(k - 8 + 2)) << k;
    EXPECT_FLOAT_EQ(w.data<float>()[10 + k], 0.5f * float(0 - 3)) << k;
  }
  // Symmetric reading: no zero points.
  t.weight_zero_point = Tensor();
  cfg.symmetric = true;
  EXPECT_FLOAT_EQ(dequantize_ct_pack(t, cfg).data<float>()[0], 0.25f * -8);
}

TEST(QuantCompressedTensors, Int8PackingFollowsTheLibrary) {
  // pack_to_int32 docstring example: [1, 2] + 128 = [129, 130] -> 33409 (K = 2 padded to 4).
  CtPackTensors t;
  t.weight_packed = quant_test::i32_tensor({33409}, {1, 1});
  t.weight_scale = quant_test::f16_tensor({2.0f}, {1, 1});
  t.weight_shape = shape_tensor(1, 2);
  const CtPackConfig cfg{.bits = 8, .strategy = CtStrategy::channel};
  const Tensor w = dequantize_ct_pack(t, cfg, "doc");
  EXPECT_EQ(w.shape(), (Shape{1, 2}));
  EXPECT_FLOAT_EQ(w.data<float>()[0], 2.0f);
  EXPECT_FLOAT_EQ(w.data<float>()[1], 4.0f);
}

TEST(QuantCompressedTensors, GIdxSelectsTheGroup) {
  // K = 64, G = 32, channels alternate between groups 0 and 1.
  CtPackTensors t;
  t.weight_packed = quant_test::i32_tensor(std::vector<int32_t>(8, int32_t(0x99999999u)), {1, 8});
  t.weight_scale = quant_test::f32_tensor({1.0f, 3.0f}, {1, 2});
  t.weight_shape = shape_tensor(1, 64);
  std::vector<int32_t> g(64);
  for (int i = 0; i < 64; ++i) g[size_t(i)] = i % 2;
  t.weight_g_idx = quant_test::i32_tensor(g, {64});
  const Tensor w = dequantize_ct_pack(t, {.bits = 4, .group_size = 32}, "gi");
  for (int k = 0; k < 64; ++k) EXPECT_FLOAT_EQ(w.data<float>()[k], k % 2 ? 3.0f : 1.0f) << k;
}

struct Case {
  int bits;
  CtStrategy strategy;
  int64_t group;
  bool symmetric;
  int64_t n, k;
  DType scale_dtype;
};

TEST(QuantCompressedTensors, QuantizeWriteReadDequantizeRoundTrip) {
  std::mt19937_64 rng(test::fresh_seed());
  const std::vector<Case> cases = {
      {4, CtStrategy::group, 128, true, 64, 256, DType::bf16},
      {4, CtStrategy::group, 32, false, 12, 128, DType::bf16},  // N = 12: zero points padded
      {4, CtStrategy::channel, 0, true, 16, 100, DType::f16},   // K = 100: packed K padded
      {4, CtStrategy::channel, 0, false, 20, 36, DType::f32},
      {8, CtStrategy::group, 64, true, 32, 128, DType::bf16},
      {8, CtStrategy::group, 128, false, 10, 256, DType::f32},
      {8, CtStrategy::channel, 0, true, 8, 30, DType::bf16},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(fmt::format("bits {} channel {} group {} sym {} n {} k {}", c.bits,
                             c.strategy == CtStrategy::channel, c.group, c.symmetric, c.n, c.k));
    const Tensor w = test::random_tensor({c.n, c.k}, DType::bf16, rng, -1.0f, 0.7f);
    const CtPackConfig cfg{c.bits, c.strategy, c.group, c.symmetric};
    const CtPackTensors q = quantize_ct_pack(w, cfg, c.scale_dtype);
    const QuantDims d = validate_ct_pack(q, cfg, "q");
    EXPECT_EQ(d, ct_pack_dims(cfg, c.n, c.k));
    EXPECT_EQ(d.packed_cols, (c.k * c.bits + 31) / 32);
    if (!c.symmetric)
      EXPECT_EQ(q.weight_zero_point.shape(), (Shape{(c.n * c.bits + 31) / 32, d.num_groups}));
    std::map<std::string, Tensor> tensors;
    add_ct_pack_tensors(tensors, "model.layers.2.mlp.experts.5.gate_proj", q);
    const std::string path = quant_test::temp_path("ct.safetensors");
    quant_test::write_file(path, tensors);
    SafetensorsFile file(path);
    EXPECT_EQ(file.entry("model.layers.2.mlp.experts.5.gate_proj.weight_shape").dtype, "I64");
    const CtPackTensors back = load_ct_pack(file, "model.layers.2.mlp.experts.5.gate_proj", cfg);
    const std::vector<float> ref = test::to_floats(w),
                             got = quant_test::values(dequantize_ct_pack(back, cfg));
    ASSERT_EQ(got.size(), ref.size());
    const float steps = float(1 << c.bits);
    for (int64_t r = 0; r < c.n; ++r)
      for (int64_t col = 0; col < c.k; ++col) {
        const float s = [&] {
          const int64_t i = r * d.num_groups + col / d.group_size;
          return c.scale_dtype == DType::f32   ? back.weight_scale.data<float>()[i]
                 : c.scale_dtype == DType::f16 ? f16_to_float(back.weight_scale.data<f16_t>()[i])
                                               : bf16_to_float(back.weight_scale.data<bf16_t>()[i]);
        }();
        // Half a step on symmetric grids, a full one where a rounded zero clips an edge, plus
        // the scale's rounding to its dtype (bf16: relative 2^-8) over 2^(bits-1) steps.
        const float rel = c.scale_dtype == DType::bf16 ? 1.0f / 256 : 1.0f / 2048;
        const float tol = (c.symmetric ? 0.5f : 1.0f) * s + steps / 2 * rel * s + 1e-6f;
        ASSERT_LE(std::fabs(got[size_t(r * c.k + col)] - ref[size_t(r * c.k + col)]), tol)
            << r << "," << col;
      }
    EXPECT_LT(test::diff(got, ref).rel_l2, c.bits == 4 ? 0.12 : 0.01);
    std::filesystem::remove(path);
  }
}

TEST(QuantCompressedTensors, BadCheckpointsNameTheTensor) {
  std::mt19937_64 rng(test::fresh_seed());
  // Skewed to the negative side so every asymmetric zero point is far from 0.
  const Tensor w = test::random_tensor({16, 256}, DType::bf16, rng, -1.0f, 0.5f);
  const CtPackConfig cfg{.bits = 4, .group_size = 64, .symmetric = false};
  const CtPackTensors good = quantize_ct_pack(w, cfg);
  EXPECT_NO_THROW(validate_ct_pack(good, cfg, "l"));

  CtPackTensors t = good;
  t.weight_shape = shape_tensor(16, 300);  // K disagrees with the packed width
  EXPECT_QUANT_ERROR(
      [&] {
        validate_ct_pack(t, {.bits = 4, .strategy = CtStrategy::channel, .symmetric = false}, "l");
      },
      "l.weight_packed", "ceil(K/8) = 38", "found i32 [16, 32]");
  // An int8 checkpoint read as int4, and the other way round.
  const CtPackTensors q8 = quantize_ct_pack(w, {.bits = 8, .group_size = 64});
  EXPECT_QUANT_ERROR([&] { validate_ct_pack(q8, {.bits = 4, .group_size = 64}, "l"); },
                     "l.weight_packed", "8-bit checkpoint read as 4-bit");
  EXPECT_QUANT_ERROR(
      [&] { validate_ct_pack(good, {.bits = 8, .group_size = 64, .symmetric = false}, "l"); },
      "l.weight_packed", "4-bit checkpoint read as 8-bit");
  // Scales of the wrong group count; unsupported and non-dividing group sizes.
  EXPECT_QUANT_ERROR(
      [&] { validate_ct_pack(good, {.bits = 4, .group_size = 128, .symmetric = false}, "l"); },
      "l.weight_scale", "expected shape [16, 2]", "found [16, 4]");
  EXPECT_QUANT_ERROR([&] { validate_ct_pack(good, {.bits = 4, .group_size = 16}, "l"); },
                     "group_size", "found 16");
  EXPECT_QUANT_ERROR([&] { ct_pack_dims({.group_size = 128}, 16, 200); },
                     "group_size 128 must divide K = 200");
  // NaN / inf scales.
  for (float bad : {NAN, INFINITY}) {
    t = good;
    t.weight_scale = clone(good.weight_scale);
    t.weight_scale.data<bf16_t>()[3 * 4 + 1] = float_to_bf16(bad);
    EXPECT_QUANT_ERROR([&] { validate_ct_pack(t, cfg, "l"); }, "l.weight_scale[3, 1]", "finite");
  }
  // Asymmetric without zero points; symmetric with non-zero zero points.
  t = good;
  t.weight_zero_point = Tensor();
  EXPECT_QUANT_ERROR([&] { validate_ct_pack(t, cfg, "l"); }, "l.weight_zero_point", "missing");
  EXPECT_QUANT_ERROR([&] { validate_ct_pack(good, {.bits = 4, .group_size = 64}, "l"); },
                     "l.weight_zero_point", "symmetric: true expects zero points of 0");
  t = good;
  t.weight_zero_point = Tensor::zeros({16, 4}, DType::i32);  // unpacked along N
  EXPECT_QUANT_ERROR([&] { validate_ct_pack(t, cfg, "l"); }, "l.weight_zero_point",
                     "expected shape [2, 4]", "found [16, 4]");
  t = good;
  t.weight_shape = Tensor::zeros({3}, DType::i64);
  EXPECT_QUANT_ERROR([&] { validate_ct_pack(t, cfg, "l"); }, "l.weight_shape", "found i64 [3]");

  std::map<std::string, Tensor> tensors;
  add_ct_pack_tensors(tensors, "l", good);
  const std::string path = quant_test::temp_path("ct_trunc.safetensors");
  quant_test::write_file(path, tensors, /*cut=*/8);
  EXPECT_QUANT_ERROR([&] { SafetensorsFile f(path); }, "l.weight_zero_point", "truncated");
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace moelora
