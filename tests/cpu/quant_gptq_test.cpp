// GPTQ int4/int8: the format's definition on hand-built words (zero - 1, act-order g_idx),
// quantize -> write -> read -> dequantize round trips, and bad checkpoints.
#include <cmath>
#include <numeric>
#include <random>

#include "moelora/quant/gptq.h"
#include "quant_test_util.h"
#include "test_util.h"

namespace moelora {
namespace {

using namespace quant;
using quant_test::clone;
using quant_test::error_of;

// Per-channel (G = K = 16) 4-bit weight, N = 8: column 0 holds q = k in word 0x76543210
// (rows 0..7, value of row 8i + j in bits 4j) and 15 - k below; zeros stored 3 (v1: zero 4).
GptqTensors hand_4bit() {
  GptqTensors t;
  std::vector<int32_t> qw(2 * 8, 0);
  qw[0 * 8 + 0] = 0x76543210;
  qw[1 * 8 + 0] = int32_t(0x89abcdefu);
  qw[0 * 8 + 1] = qw[1 * 8 + 1] = int32_t(0xffffffffu);  // column 1: all 15
  t.qweight = quant_test::i32_tensor(qw, {2, 8});
  t.scales = quant_test::f16_tensor({0.5f, 0.25f, 1, 1, 1, 1, 1, 1}, {1, 8});
  // column 0 zero field 3, column 1 zero field 15 (v1: zero 16), others 0.
  t.qzeros = quant_test::i32_tensor({int32_t(0x000000f3)}, {1, 1});
  return t;
}

TEST(QuantGptq, HandBuiltWordsFollowTheDefinition) {
  GptqConfig cfg{.bits = 4, .group_size = -1, .sym = false};
  const GptqTensors t = hand_4bit();
  const Tensor w = dequantize_gptq(t, cfg, "hand");
  ASSERT_EQ(w.shape(), (Shape{8, 16}));
  const float* p = w.data<float>();
  for (int k = 0; k < 16; ++k) {
    const int q = k < 8 ? k : 15 - (k - 8);
    EXPECT_EQ(gptq_q(t, 4, 0, k), q) << k;
    EXPECT_FLOAT_EQ(p[0 * 16 + k], 0.5f * float(q - 4)) << k;     // stored 3 -> zero 4
    EXPECT_FLOAT_EQ(p[1 * 16 + k], 0.25f * float(15 - 16)) << k;  // stored 15 -> zero 16
  }
  // GPTQModel v2 stores the zero itself.
  cfg.zero_format = GptqZeroFormat::v2_true;
  const Tensor w2 = dequantize_gptq(t, cfg, "hand");
  EXPECT_FLOAT_EQ(w2.data<float>()[0 * 16 + 2], 0.5f * float(2 - 3));
  EXPECT_FLOAT_EQ(w2.data<float>()[1 * 16 + 0], 0.25f * float(15 - 15));
}

TEST(QuantGptq, EightBitWordsFollowTheDefinition) {
  // K = 32 per-channel, N = 4: row 4i + j in bits 8j of qweight[i, n].
  GptqConfig cfg{.bits = 8, .group_size = -1, .sym = true};
  std::vector<int32_t> qw(8 * 4, int32_t(0x80808080u));
  qw[0 * 4 + 2] = int32_t(0x01ff7f80u);  // n = 2: rows 0..3 = 0x80, 0x7f, 0xff, 0x01
  GptqTensors t;
  t.qweight = quant_test::i32_tensor(qw, {8, 4});
  t.scales = quant_test::f16_tensor({1, 1, 0.125f, 1}, {1, 4});
  t.qzeros = quant_test::i32_tensor({int32_t(0x7f7f7f7fu)}, {1, 1});  // sym v1: 128 - 1
  const Tensor w = dequantize_gptq(t, cfg, "hand8");
  const float* p = w.data<float>();
  EXPECT_FLOAT_EQ(p[2 * 32 + 0], 0.0f);
  EXPECT_FLOAT_EQ(p[2 * 32 + 1], 0.125f * -1);
  EXPECT_FLOAT_EQ(p[2 * 32 + 2], 0.125f * 127);
  EXPECT_FLOAT_EQ(p[2 * 32 + 3], 0.125f * -127);
  EXPECT_EQ(detect_gptq_zero_format(t.qzeros, 8), GptqZeroFormat::v1_minus_one);
}

// K = 64, G = 32, g_idx[k] = k % 2 (act-order): even channels use group 0's scale, odd ones
// group 1's, whatever their position.
TEST(QuantGptq, ActOrderGIdxPicksTheGroupOfEachChannel) {
  const int64_t n = 8, k = 64;
  GptqTensors t;
  t.qweight = quant_test::i32_tensor(std::vector<int32_t>(8 * n, int32_t(0x99999999u)), {8, n});
  std::vector<float> sc(2 * n);
  for (int64_t c = 0; c < n; ++c) sc[size_t(c)] = 1.0f, sc[size_t(n + c)] = 2.0f;
  t.scales = quant_test::f16_tensor(sc, {2, n});
  t.qzeros = quant_test::i32_tensor(std::vector<int32_t>(2, int32_t(0x77777777u)), {2, 1});
  std::vector<int32_t> g(k);
  for (int64_t i = 0; i < k; ++i) g[size_t(i)] = int32_t(i % 2);
  t.g_idx = quant_test::i32_tensor(g, {k});
  GptqConfig cfg{.bits = 4, .group_size = 32, .sym = true, .desc_act = true};
  const Tensor w = dequantize_gptq(t, cfg, "ao");
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c)
      ASSERT_FLOAT_EQ(w.data<float>()[r * k + c], c % 2 ? 2.0f : 1.0f) << r << "," << c;

  const ActOrder a = act_order_from_g_idx(t.g_idx, k, 2, 32, "ao.g_idx");
  EXPECT_FALSE(a.monotonic);
  EXPECT_TRUE(a.uniform);
  EXPECT_EQ(a.group_start, (std::vector<int32_t>{0, 32, 64}));
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(a.perm[size_t(i)], 2 * i);
    EXPECT_EQ(a.perm[size_t(32 + i)], 2 * i + 1);
  }
  cfg.desc_act = false;
  EXPECT_QUANT_ERROR([&] { validate_gptq(t, cfg, "ao"); }, "ao.g_idx", "desc_act");
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::fabs(x)));
  return m;
}

struct RoundTripCase {
  int bits;
  int64_t group;
  bool sym;
  GptqZeroFormat zf;
  bool act_order;
};

TEST(QuantGptq, QuantizeWriteReadDequantizeRoundTrip) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t n = 64, k = 256;
  const std::vector<RoundTripCase> cases = {
      {4, 128, true, GptqZeroFormat::v1_minus_one, false},
      {4, 64, false, GptqZeroFormat::v1_minus_one, false},
      {4, 32, false, GptqZeroFormat::v2_true, false},
      {4, -1, true, GptqZeroFormat::v1_minus_one, false},
      {4, 128, false, GptqZeroFormat::v1_minus_one, true},
      {8, 128, true, GptqZeroFormat::v1_minus_one, false},
      {8, 32, false, GptqZeroFormat::v1_minus_one, true},
      {8, -1, false, GptqZeroFormat::v2_true, false},
  };
  for (const RoundTripCase& c : cases) {
    SCOPED_TRACE(fmt::format("bits {} group {} sym {} v2 {} act_order {}", c.bits, c.group, c.sym,
                             c.zf == GptqZeroFormat::v2_true, c.act_order));
    Tensor w = test::random_tensor({n, k}, DType::bf16, rng, -1.0f, 1.0f);
    // A row of non-negative values exercises v1's missing zero of 0.
    for (int64_t i = 0; i < k; ++i)
      w.data<bf16_t>()[i] = float_to_bf16(std::fabs(bf16_to_float(w.data<bf16_t>()[i])));
    const GptqConfig cfg{c.bits, c.group, c.sym, c.act_order, c.zf};
    std::vector<int32_t> perm;
    if (c.act_order) {
      perm.resize(size_t(k));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
    }
    const GptqTensors q = quantize_gptq(w, cfg, perm);
    const std::string path = quant_test::temp_path("gptq.safetensors");
    std::map<std::string, Tensor> tensors;
    add_gptq_tensors(tensors, "model.layers.0.mlp.experts.3.up_proj", q);
    quant_test::write_file(path, tensors);
    SafetensorsFile file(path);
    const GptqTensors back = load_gptq(file, "model.layers.0.mlp.experts.3.up_proj", cfg);
    const QuantDims d = validate_gptq(back, cfg, "x");
    EXPECT_EQ(d, gptq_dims(cfg, n, k));
    EXPECT_EQ(d.packed_rows, k * c.bits / 32);
    EXPECT_EQ(d.packed_cols, n);
    if (c.sym) EXPECT_EQ(detect_gptq_zero_format(back.qzeros, c.bits), c.zf);
    if (c.act_order) {
      const ActOrder a = act_order_from_g_idx(back.g_idx, k, d.num_groups, d.group_size, "g");
      EXPECT_FALSE(a.monotonic);
      EXPECT_TRUE(a.uniform);
    }
    const Tensor dq = dequantize_gptq(back, cfg, "x");
    const std::vector<float> ref = test::to_floats(w), got = quant_test::values(dq);
    // Every element within its group's step: half a step on symmetric grids, a full step
    // where an asymmetric zero's rounding clips an edge, plus the f16 rounding of the scale
    // (relative 2^-11 over up to 2^(bits-1) steps).
    const int32_t* g_idx = back.g_idx.data<int32_t>();
    for (int64_t r = 0; r < n; ++r)
      for (int64_t col = 0; col < k; ++col) {
        const float s = f16_to_float(back.scales.data<f16_t>()[g_idx[col] * n + r]);
        const float tol = (c.sym ? 0.5f : 1.0f) * s + float(1 << c.bits) / 2048.0f * s + 1e-6f;
        ASSERT_LE(std::fabs(got[size_t(r * k + col)] - ref[size_t(r * k + col)]), tol)
            << "row " << r << " col " << col;
      }
    const test::Diff df = test::diff(got, ref);
    EXPECT_LT(df.rel_l2, c.bits == 4 ? 0.12 : 0.01);
    EXPECT_GT(max_abs(got), 0.5);
    std::filesystem::remove(path);
  }
}

// What a kernel does with act-order: permute K so each group is contiguous. The product with
// the permuted activation columns must equal the original one, and in sorted order the
// groups are the contiguous runs group_start[g] .. group_start[g + 1].
TEST(QuantGptq, ActOrderPermutationMakesGroupsContiguous) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t n = 16, k = 128, g = 32;
  const Tensor w = test::random_tensor({n, k}, DType::f32, rng);
  std::vector<int32_t> perm(k);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  const GptqConfig cfg{.bits = 4, .group_size = g, .sym = true, .desc_act = true};
  const GptqTensors q = quantize_gptq(w, cfg, perm);
  const ActOrder a = act_order_from_g_idx(q.g_idx, k, k / g, g, "g_idx");
  ASSERT_FALSE(a.monotonic);
  const int32_t* g_idx = q.g_idx.data<int32_t>();
  for (int64_t grp = 0; grp < k / g; ++grp) {
    EXPECT_EQ(a.group_start[size_t(grp)], grp * g);
    for (int32_t i = a.group_start[size_t(grp)]; i < a.group_start[size_t(grp) + 1]; ++i)
      EXPECT_EQ(g_idx[a.perm[size_t(i)]], grp);
  }
  // The quantizer grouped exactly the channels the caller's permutation named.
  for (int64_t i = 0; i < k; ++i) EXPECT_EQ(g_idx[perm[size_t(i)]], i / g);
  const Tensor dq = dequantize_gptq(q, cfg, "ao");
  const std::vector<float> x = test::to_floats(test::random_tensor({k}, DType::f32, rng));
  for (int64_t r = 0; r < n; ++r) {
    double direct = 0, permuted = 0;
    for (int64_t c = 0; c < k; ++c) direct += double(dq.data<float>()[r * k + c]) * x[size_t(c)];
    for (int64_t i = 0; i < k; ++i) {
      const int32_t c = a.perm[size_t(i)];
      permuted += double(dq.data<float>()[r * k + c]) * x[size_t(c)];
    }
    EXPECT_NEAR(direct, permuted, 1e-9);
  }
}

TEST(QuantGptq, EightBitCheckpointReadAsFourBitIsNamed) {
  std::mt19937_64 rng(test::fresh_seed());
  const Tensor w = test::random_tensor({64, 256}, DType::bf16, rng);
  const GptqTensors q8 = quantize_gptq(w, {.bits = 8, .group_size = 128});
  EXPECT_QUANT_ERROR([&] { validate_gptq(q8, {.bits = 4, .group_size = 128}, "l"); }, "l.qweight",
                     "expected i32 [K/8 = 32, N = 64]", "found i32 [64, 64]",
                     "8-bit checkpoint read as 4-bit");
  // With g_idx gone K still follows from scales x G.
  GptqTensors no_gidx = q8;
  no_gidx.g_idx = Tensor();
  EXPECT_QUANT_ERROR([&] { validate_gptq(no_gidx, {.bits = 4, .group_size = 128}, "l"); },
                     "l.qweight", "8-bit");
}

TEST(QuantGptq, BadCheckpointsNameTheTensor) {
  std::mt19937_64 rng(test::fresh_seed());
  const Tensor w = test::random_tensor({64, 256}, DType::f32, rng);
  const GptqConfig cfg{.bits = 4, .group_size = 64, .sym = false};
  const GptqTensors good = quantize_gptq(w, cfg);
  EXPECT_NO_THROW(validate_gptq(good, cfg, "l"));

  // Scales with one group too many.
  GptqTensors t = good;
  t.scales = Tensor::zeros({5, 64}, DType::f16);
  EXPECT_QUANT_ERROR([&] { validate_gptq(t, cfg, "l"); }, "l.scales", "expected shape [4, 64]",
                     "found [5, 64]");
  // Scales of the wrong width (N).
  t = good;
  t.g_idx = Tensor();
  t.scales = Tensor::zeros({4, 72}, DType::f16);
  EXPECT_QUANT_ERROR([&] { validate_gptq(t, cfg, "l"); }, "l.qweight", "N = 72");
  // Unsupported group sizes, and a group size that does not divide K.
  EXPECT_QUANT_ERROR([&] { validate_gptq(good, {.bits = 4, .group_size = 16, .sym = false}, "l"); },
                     "group_size", "supported 32, 64, 128 and -1", "found 16");
  EXPECT_QUANT_ERROR([&] { gptq_dims({.bits = 4, .group_size = 128}, 64, 192); },
                     "group_size 128 must divide K = 192");
  EXPECT_QUANT_ERROR([&] { gptq_dims({.bits = 3, .group_size = 128}, 64, 256); },
                     "supported 4 and 8", "found 3");
  // NaN and inf scales.
  for (float bad : {NAN, INFINITY}) {
    t = good;
    t.scales = clone(good.scales);
    t.scales.data<f16_t>()[1 * 64 + 2] = float_to_f16(bad);
    EXPECT_QUANT_ERROR([&] { validate_gptq(t, cfg, "l"); }, "l.scales[1, 2]",
                       "expected a finite scale");
  }
  // g_idx out of range.
  t = good;
  t.g_idx = clone(good.g_idx);
  t.g_idx.data<int32_t>()[7] = 4;
  EXPECT_QUANT_ERROR([&] { validate_gptq(t, cfg, "l"); }, "l.g_idx[7]", "[0, 4)", "found 4");
  // Wrong qzeros shape.
  t = good;
  t.qzeros = Tensor::zeros({4, 16}, DType::i32);
  EXPECT_QUANT_ERROR([&] { validate_gptq(t, cfg, "l"); }, "l.qzeros", "expected shape [4, 8]");
}

TEST(QuantGptq, SymmetricZerosAreChecked) {
  std::mt19937_64 rng(test::fresh_seed());
  const Tensor w = test::random_tensor({64, 128}, DType::bf16, rng);
  const GptqTensors asym = quantize_gptq(w, {.bits = 4, .group_size = 128, .sym = false});
  EXPECT_QUANT_ERROR([&] { validate_gptq(asym, {.bits = 4, .group_size = 128, .sym = true}, "l"); },
                     "l.qzeros", "sym: true", "set sym: false");
  const GptqTensors v2 =
      quantize_gptq(w, {.bits = 4, .group_size = 128, .zero_format = GptqZeroFormat::v2_true});
  EXPECT_EQ(uint32_t(v2.qzeros.data<int32_t>()[0]), 0x88888888u);
  EXPECT_QUANT_ERROR([&] { validate_gptq(v2, {.bits = 4, .group_size = 128}, "l"); }, "l.qzeros",
                     "gptq_v2", "checkpoint_format");
  // Both readings agree once the format is declared.
  const Tensor a =
      dequantize_gptq(v2, {.bits = 4, .group_size = 128, .zero_format = GptqZeroFormat::v2_true});
  const GptqTensors v1 = quantize_gptq(w, {.bits = 4, .group_size = 128});
  EXPECT_EQ(quant_test::values(a), quant_test::values(dequantize_gptq(v1, {.bits = 4})));
}

TEST(QuantGptq, TruncatedFileNamesTheTensor) {
  std::mt19937_64 rng(test::fresh_seed());
  const Tensor w = test::random_tensor({64, 128}, DType::bf16, rng);
  const GptqTensors q = quantize_gptq(w, {.bits = 4, .group_size = 32});
  std::map<std::string, Tensor> tensors;
  add_gptq_tensors(tensors, "l", q);
  const std::string path = quant_test::temp_path("gptq_trunc.safetensors");
  quant_test::write_file(path, tensors, /*cut=*/100);
  // The data section is written in name order: l.scales is last and loses its tail.
  EXPECT_QUANT_ERROR([&] { SafetensorsFile f(path); }, "l.scales", "truncated");
  std::filesystem::remove(path);
  // A file missing a tensor.
  tensors.erase("l.qzeros");
  quant_test::write_file(path, tensors);
  SafetensorsFile f(path);
  EXPECT_QUANT_ERROR([&] { load_gptq(f, "l", {.bits = 4, .group_size = 32}); }, "l.qzeros");
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace moelora
