// CPU dense ops (src/kernels/dense_ops.inc) against straightforward double-precision loops:
// RoPE (rotate-half layout), per-head RMSNorm, linear, paged GQA attention with scattered
// pages and mixed prefill / decode tokens, and their argument checks.
#include <cmath>
#include <random>

#include "kernels/cpu/dense_ops.h"
#include "test_util.h"

namespace moelora {
namespace {

const Stream& cpu_stream() {
  static Stream s = Stream::create(Device::cpu());
  return s;
}

TEST(DenseOps, RopeRotateHalf) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t M = 5, heads = 3, D = 8;
  Tensor x = test::random_tensor({M, heads * D}, DType::f32, rng);
  const std::vector<float> x0 = test::to_floats(x);
  const std::vector<int32_t> pos = {0, 1, 7, 100, 4095};
  const double theta = 1e6;
  cpu::rope(x, int(D), test::from_ints(pos, {M}), theta, cpu_stream());
  std::vector<float> expected(x0.size());
  for (int64_t t = 0; t < M; ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < D / 2; ++i) {
        const double f = pos[size_t(t)] * std::pow(theta, -2.0 * double(i) / double(D));
        const size_t a = size_t(t * heads * D + h * D + i), b = a + size_t(D / 2);
        expected[a] = float(x0[a] * std::cos(f) - x0[b] * std::sin(f));
        expected[b] = float(x0[b] * std::cos(f) + x0[a] * std::sin(f));
      }
  // f32 angles at position 4095 carry ~1e-4 relative phase error, as in transformers.
  EXPECT_TRUE(test::allclose(test::to_floats(x), expected, 1e-3));
  test::expect_error([&] { cpu::rope(x, 16, test::from_ints(pos, {M}), theta, cpu_stream()); },
                     "not a multiple of head_dim 16");
}

// A frequency table (YaRN's) replaces theta's frequencies and cos / sin take its scale; theta's
// own table gives theta's bits; attention_prologue passes both through.
TEST(DenseOps, RopeFrequencyTableAndScale) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t M = 4, heads = 2, D = 8;
  const Tensor x0 = test::random_tensor({M, heads * D}, DType::f32, rng);
  const Tensor pos = test::from_ints({0, 5, 33, 900}, {M});
  auto run = [&](const Tensor& table, float scale) {
    Tensor x = Tensor::empty(x0.shape(), DType::f32);
    x.copy_from(x0);
    cpu::rope(x, int(D), pos, 1e6, cpu_stream(), table, scale);
    return test::to_floats(x);
  };
  std::vector<float> own;
  for (int i = 0; i < D / 2; ++i) own.push_back(1.0f / std::pow(1e6f, float(2 * i) / float(D)));
  EXPECT_EQ(run(test::from_floats(own, {D / 2}, DType::f32), 1.0f), run(Tensor(), 1.0f));
  const std::vector<float> table = {0.5f, 0.02f, 1e-3f, 4e-5f};
  const float scale = 1.25f;
  const auto got = run(test::from_floats(table, {D / 2}, DType::f32), scale);
  const auto a0 = test::to_floats(x0);
  for (int64_t t = 0; t < M; ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < D / 2; ++i) {
        const double f = double(pos.data<int32_t>()[t]) * table[size_t(i)];
        const size_t a = size_t(t * heads * D + h * D + i), b = a + size_t(D / 2);
        EXPECT_NEAR(got[a], scale * (a0[a] * std::cos(f) - a0[b] * std::sin(f)), 1e-4);
        EXPECT_NEAR(got[b], scale * (a0[b] * std::cos(f) + a0[a] * std::sin(f)), 1e-4);
      }
  Tensor x = Tensor::empty(x0.shape(), DType::f32);
  test::expect_error(
      [&] {
        cpu::rope(x, int(D), pos, 1e6, cpu_stream(), test::from_floats({1, 2}, {2}, DType::f32),
                  1.0f);
      },
      "rope inv_freq");
  test::expect_error([&] { cpu::rope(x, int(D), pos, 1e6, cpu_stream(), Tensor(), -1.0f); },
                     "cos_sin_scale must be finite and > 0");
}

TEST(DenseOps, RmsNormPerHeadAndLinear) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t M = 3, heads = 4, D = 16, N = 24;
  Tensor x = test::random_tensor({M, heads * D}, DType::f32, rng, -2, 2);
  Tensor w = test::random_tensor({D}, DType::bf16, rng, 0.5, 1.5);
  Tensor out = Tensor::empty({M, heads * D}, DType::bf16);
  cpu::rms_norm(x, w, 1e-6f, out, cpu_stream());
  const std::vector<float> xv = test::to_floats(x), wv = test::to_floats(w);
  std::vector<float> expected(xv.size());
  for (int64_t r = 0; r < M * heads; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += double(xv[size_t(r * D + i)]) * xv[size_t(r * D + i)];
    const double inv = 1.0 / std::sqrt(ss / double(D) + 1e-6);
    for (int64_t i = 0; i < D; ++i)
      expected[size_t(r * D + i)] = float(xv[size_t(r * D + i)] * inv * wv[size_t(i)]);
  }
  EXPECT_TRUE(test::allclose(test::to_floats(out), expected, 1e-2));  // bf16 output

  Tensor W = test::random_tensor({N, heads * D}, DType::bf16, rng);
  Tensor y = Tensor::empty({M, N}, DType::f32);
  cpu::linear(out, W, y, cpu_stream());
  const std::vector<float> ov = test::to_floats(out), Wv = test::to_floats(W);
  std::vector<float> ey(size_t(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < heads * D; ++k)
        acc += double(ov[size_t(m * heads * D + k)]) * Wv[size_t(n * heads * D + k)];
      ey[size_t(m * N + n)] = float(acc);
    }
  EXPECT_TRUE(test::allclose(test::to_floats(y), ey, 1e-5));
  Tensor bad = Tensor::empty({M, N + 1}, DType::f32);
  test::expect_error([&] { cpu::linear(out, W, bad, cpu_stream()); }, "linear output y");
}

TEST(DenseOps, PagedAttentionMatchesContiguousGqa) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t heads = 4, kvh = 2, D = 8, page = 4, pages = 12;
  // Sequence 0: 9 cached tokens, decode token at position 9. Sequence 1: a prefill of 6.
  const std::vector<int64_t> lens = {10, 6};
  const std::vector<std::vector<int32_t>> page_of = {{7, 2, 11}, {5, 0}};
  Tensor kc = Tensor::zeros({pages, page, kvh, D}, DType::bf16);
  Tensor vc = Tensor::zeros({pages, page, kvh, D}, DType::bf16);
  // Write every position of both sequences through kv_cache_write.
  std::vector<int32_t> slots;
  std::vector<int64_t> seq_of, pos_of;
  for (int64_t s = 0; s < 2; ++s)
    for (int64_t p = 0; p < lens[size_t(s)]; ++p) {
      slots.push_back(page_of[size_t(s)][size_t(p / page)] * int32_t(page) + int32_t(p % page));
      seq_of.push_back(s);
      pos_of.push_back(p);
    }
  const int64_t T = int64_t(slots.size());
  Tensor k = test::random_tensor({T, kvh * D}, DType::f32, rng);
  Tensor v = test::random_tensor({T, kvh * D}, DType::f32, rng);
  cpu::kv_cache_write(k, v, test::from_ints(slots, {T}), kc, vc, cpu_stream());

  // Queries: the decode token of sequence 0 and all 6 prefill tokens of sequence 1.
  std::vector<int32_t> qseq = {0}, qpos = {9};
  for (int32_t p = 0; p < 6; ++p) qseq.push_back(1), qpos.push_back(p);
  const int64_t M = int64_t(qseq.size());
  Tensor q = test::random_tensor({M, heads * D}, DType::bf16, rng);
  Tensor bt = test::from_ints({7, 2, 11, 5, 0, -1}, {2, 3});
  Tensor out = Tensor::empty({M, heads * D}, DType::f32);
  const float scale = 1.0f / std::sqrt(float(D));
  cpu::paged_attention(q, kc, vc, bt, test::from_ints(qseq, {M}), test::from_ints(qpos, {M}), scale,
                       out, cpu_stream());

  // Reference: contiguous K/V per sequence (bf16-rounded as stored), double softmax.
  const std::vector<float> kv_k = test::to_floats(k), kv_v = test::to_floats(v);
  const std::vector<float> qv = test::to_floats(q);
  std::vector<float> expected(size_t(M * heads * D));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kh = h / (heads / kvh);
      std::vector<double> sc;
      std::vector<int64_t> rows;
      for (int64_t t = 0; t < T; ++t)
        if (seq_of[size_t(t)] == qseq[size_t(m)] && pos_of[size_t(t)] <= qpos[size_t(m)]) {
          double dot = 0;
          for (int64_t c = 0; c < D; ++c)
            dot += double(qv[size_t(m * heads * D + h * D + c)]) *
                   round_bf16(kv_k[size_t(t * kvh * D + kh * D + c)]);
          sc.push_back(dot * scale);
          rows.push_back(t);
        }
      double mx = -1e300, sum = 0;
      for (double s : sc) mx = std::max(mx, s);
      for (double& s : sc) sum += (s = std::exp(s - mx));
      for (int64_t c = 0; c < D; ++c) {
        double acc = 0;
        for (size_t j = 0; j < sc.size(); ++j)
          acc += sc[j] / sum * round_bf16(kv_v[size_t(rows[j] * kvh * D + kh * D + c)]);
        expected[size_t(m * heads * D + h * D + c)] = float(acc);
      }
    }
  EXPECT_TRUE(test::allclose(test::to_floats(out), expected, 1e-5));

  // A query past the block table's pages, or a -1 page, is an error naming it.
  test::expect_error(
      [&] {
        Tensor o1 = out.first_rows(1);
        cpu::paged_attention(q.first_rows(1), kc, vc, bt, test::from_ints({1}, {1}),
                             test::from_ints({9}, {1}), scale, o1, cpu_stream());
      },
      "block_table[1, 2]=-1 is not a page");
  test::expect_error(
      [&] {
        cpu::kv_cache_write(k.first_rows(1), v.first_rows(1), test::from_ints({48}, {1}), kc, vc,
                            cpu_stream());
      },
      "slot_mapping[0]=48 outside the cache's 48 slots");
}

TEST(DenseOps, EmbeddingSiluMulResidual) {
  std::mt19937_64 rng(test::fresh_seed());
  Tensor table = test::random_tensor({10, 6}, DType::bf16, rng);
  Tensor out = Tensor::empty({3, 6}, DType::f32);
  cpu::embedding(test::from_ints({9, 0, 9}, {3}), table, out, cpu_stream());
  const std::vector<float> tv = test::to_floats(table), ov = test::to_floats(out);
  for (int c = 0; c < 6; ++c) {
    EXPECT_EQ(ov[size_t(c)], tv[size_t(54 + c)]);
    EXPECT_EQ(ov[size_t(6 + c)], tv[size_t(c)]);
  }
  Tensor out1 = out.first_rows(1);
  test::expect_error([&] { cpu::embedding(test::from_ints({10}, {1}), table, out1, cpu_stream()); },
                     "token id 10 at position 0 is outside the vocabulary [0, 10)");

  Tensor gu = test::random_tensor({2, 8}, DType::f32, rng, -3, 3);
  Tensor act = Tensor::empty({2, 4}, DType::f32);
  cpu::silu_mul(gu, act, cpu_stream());
  const std::vector<float> g = test::to_floats(gu), a = test::to_floats(act);
  for (int t = 0; t < 2; ++t)
    for (int i = 0; i < 4; ++i) {
      const double x = g[size_t(t * 8 + i)];
      EXPECT_NEAR(a[size_t(t * 4 + i)], x / (1 + std::exp(-x)) * g[size_t(t * 8 + 4 + i)], 1e-5);
    }
  Tensor base = test::from_floats({1, 2, 3, 4, 5, 6, 7, 8}, {2, 4}, DType::f32);
  cpu::residual_add(base, act, cpu_stream());
  for (int i = 0; i < 8; ++i)
    EXPECT_FLOAT_EQ(test::to_floats(base)[size_t(i)], float(i + 1) + a[size_t(i)]);
}

}  // namespace
}  // namespace moelora
