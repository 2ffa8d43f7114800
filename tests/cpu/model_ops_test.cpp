// CPU model step ops (kernels/model_ops.inc): cast, copy_columns, gather_rows, router_margin
// against direct computations on fresh random inputs, and their argument checks.
#include <algorithm>
#include <cmath>
#include <functional>

#include "kernels/cpu/model_ops.h"
#include "test_util.h"

namespace moelora {
namespace {

TEST(ModelOps, CastRoundsToNearestEvenAndWidensExactly) {
  std::mt19937_64 rng(test::fresh_seed());
  const Tensor x = test::random_tensor({7, 13}, DType::f32, rng, -3, 3);
  Tensor b = Tensor::empty({7, 13}, DType::bf16), back = Tensor::empty({7, 13}, DType::f32);
  cpu::cast(x, b, Stream());
  cpu::cast(b, back, Stream());
  for (int64_t i = 0; i < x.numel(); ++i) {
    EXPECT_EQ(b.data<bf16_t>()[i].bits, float_to_bf16(x.data<float>()[i]).bits);
    EXPECT_EQ(back.data<float>()[i], bf16_to_float(b.data<bf16_t>()[i]));
  }
  Tensor wrong = Tensor::empty({7, 12}, DType::f32);
  test::expect_error([&] { cpu::cast(x, wrong, Stream()); }, "cast output");
}

TEST(ModelOps, CopyColumnsSlicesEveryRow) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t m = 5, n = 24;
  const Tensor src = test::random_tensor({m, n}, DType::f32, rng);
  for (auto [col, w] : {std::pair<int64_t, int64_t>{0, 16}, {16, 4}, {20, 4}, {3, 21}}) {
    Tensor f = Tensor::empty({m, w}, DType::f32), b = Tensor::empty({m, w}, DType::bf16);
    cpu::copy_columns(src, col, f, Stream());
    cpu::copy_columns(src, col, b, Stream());
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < w; ++c) {
        const float e = src.data<float>()[r * n + col + c];
        EXPECT_EQ(f.data<float>()[r * w + c], e);
        EXPECT_EQ(b.data<bf16_t>()[r * w + c].bits, float_to_bf16(e).bits);
      }
  }
  Tensor too_wide = Tensor::empty({m, 8}, DType::f32);
  test::expect_error([&] { cpu::copy_columns(src, 20, too_wide, Stream()); },
                     "outside src");
}

TEST(ModelOps, GatherRowsPicksRowsAndChecksRange) {
  std::mt19937_64 rng(test::fresh_seed());
  const Tensor src = test::random_tensor({9, 6}, DType::bf16, rng);
  const Tensor rows = test::from_ints({8, 0, 3, 3}, {4});
  Tensor dst = Tensor::empty({4, 6}, DType::f32);
  cpu::gather_rows(src, rows, dst, Stream());
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t c = 0; c < 6; ++c)
      EXPECT_EQ(dst.data<float>()[i * 6 + c],
                bf16_to_float(src.data<bf16_t>()[rows.data<int32_t>()[i] * 6 + c]));
  const Tensor bad = test::from_ints({1, 9}, {2});
  Tensor d2 = Tensor::empty({2, 6}, DType::f32);
  test::expect_error([&] { cpu::gather_rows(src, bad, d2, Stream()); }, "outside [0, 9)");
}

// The margin by a full sort (equal values counted separately).
float sorted_margin(const float* row, int64_t e, int k) {
  std::vector<float> v(row, row + e);
  std::sort(v.begin(), v.end(), std::greater<float>());
  return v[size_t(k) - 1] - v[size_t(k)];
}

TEST(ModelOps, RouterMarginMatchesASortIncludingTies) {
  std::mt19937_64 rng(test::fresh_seed());
  for (auto [e, k] : {std::pair<int64_t, int>{8, 2}, {64, 8}, {5, 1}, {4, 4}, {3, 6}}) {
    const int64_t m = 11, cols = 3;
    // Small integers: many ties, also across the k-th / (k+1)-th cut.
    Tensor lg = Tensor::empty({m, e}, DType::f32);
    std::uniform_int_distribution<int> d(-3, 3);
    for (int64_t i = 0; i < lg.numel(); ++i) lg.data<float>()[i] = 0.5f * float(d(rng));
    Tensor margin = Tensor::zeros({m, cols}, DType::f32);
    cpu::router_margin(lg, k, margin, 1, Stream());
    for (int64_t t = 0; t < m; ++t) {
      const float got = margin.data<float>()[t * cols + 1];
      if (k >= e)
        EXPECT_EQ(got, INFINITY);
      else
        EXPECT_EQ(got, sorted_margin(lg.data<float>() + t * e, e, k)) << "E " << e << " k " << k;
      EXPECT_EQ(margin.data<float>()[t * cols], 0.f);  // other columns untouched
      EXPECT_EQ(margin.data<float>()[t * cols + 2], 0.f);
    }
  }
  Tensor lg = Tensor::empty({2, 4}, DType::f32), margin = Tensor::empty({2, 2}, DType::f32);
  test::expect_error([&] { cpu::router_margin(lg, 2, margin, 2, Stream()); }, "column 2");
}

}  // namespace
}  // namespace moelora
