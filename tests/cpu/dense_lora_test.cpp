// Dense LoRA (CPU reference): pool loading and validation, the op against the delta computed
// in double, base tokens untouched, mixed ranks and untargeted slices.
#include <gtest/gtest.h>

#include "dense_lora_case.h"
#include "kernels/cpu/dense_lora_ops.h"
#include "test_util.h"

namespace moelora {
namespace {

TEST(DenseLora, MatchesMergedDeltaWithMixedRanks) {
  std::mt19937_64 rng(test::fresh_seed());
  // q/k/v slices of widths 64/32/32; slot 0 has all three, slot 1 only q and v (rank 8/64),
  // slot 2 only k.
  const auto c = test::DenseLoraCase::make(37, 96, {64, 32, 32}, {{16, 16, 16}, {8, 0, 64}, {0, 4, 0}},
                                           64, rng);
  const DenseLoraPool pool = c.pool(Device::cpu());
  EXPECT_EQ(pool.rank(1, 1), 0);
  EXPECT_EQ(pool.rank(1, 2), 64);
  const int64_t m = c.x.size(0), n = c.slices.total();
  // f32 y starting from random base values: y_after - y_before is the delta.
  Tensor y = test::random_tensor({m, n}, DType::f32, rng);
  const auto before = test::to_floats(y);
  Tensor u = Tensor::empty({m, 3 * 64}, DType::f32);
  apply_dense_lora(pool, c.x, c.token_slot, u, y, Stream());
  const auto after = test::to_floats(y);
  std::vector<float> delta(after.size());
  for (size_t i = 0; i < after.size(); ++i) delta[i] = after[i] - before[i];
  EXPECT_TRUE(test::allclose(delta, c.expected_delta(), 1e-2, 1e-5));
  // Base tokens: bit-identical.
  const auto ts = test::to_ints(c.token_slot);
  for (int64_t t = 0; t < m; ++t)
    if (ts[size_t(t)] < 0)
      for (int64_t j = 0; j < n; ++j)
        ASSERT_EQ(after[size_t(t * n + j)], before[size_t(t * n + j)]) << "base token " << t;
}

TEST(DenseLora, Bf16OutputRoundsOnce) {
  std::mt19937_64 rng(test::fresh_seed());
  const auto c = test::DenseLoraCase::make(9, 32, {48}, {{16}, {32}}, 32, rng);
  const DenseLoraPool pool = c.pool(Device::cpu());
  Tensor y32 = test::random_tensor({9, 48}, DType::bf16, rng);
  Tensor y16 = Tensor::empty({9, 48}, DType::bf16);
  y16.copy_from(y32);
  Tensor yf = test::from_floats(test::to_floats(y32), {9, 48}, DType::f32);
  Tensor u = Tensor::empty({9, 32}, DType::f32);
  apply_dense_lora(pool, c.x, c.token_slot, u, y16, Stream());
  apply_dense_lora(pool, c.x, c.token_slot, u, yf, Stream());
  const auto a = test::to_floats(y16), b = test::to_floats(yf);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], round_bf16(b[i])) << i;
}

TEST(DenseLora, BadInput) {
  std::mt19937_64 rng(1);
  DenseLoraPool pool("layers.0.qkv", 16, DenseLoraSlices::from_sizes({8, 4}), 2, 8, Device::cpu());
  DenseLoraSlice ok{test::random_tensor({4, 16}, DType::f32, rng),
                    test::random_tensor({8, 4}, DType::f32, rng), 1.0f};
  test::expect_error([&] { pool.load(0, {ok}); }, "1 slices given for a module with 2");
  test::expect_error([&] { pool.load(2, {ok, {}}); }, "slot 2");
  DenseLoraSlice big{test::random_tensor({16, 16}, DType::f32, rng),
                     test::random_tensor({8, 16}, DType::f32, rng), 1.0f};
  test::expect_error([&] { pool.load(0, {big, {}}); }, "rank 16 is outside the pool's 1..8");
  DenseLoraSlice wrong_b{test::random_tensor({4, 16}, DType::f32, rng),
                         test::random_tensor({4, 4}, DType::f32, rng), 1.0f};
  test::expect_error([&] { pool.load(0, {wrong_b, {}}); }, "B expected [8, 4] (out, rank)");
  DenseLoraSlice wrong_a{test::random_tensor({4, 12}, DType::f32, rng),
                         test::random_tensor({8, 4}, DType::f32, rng), 1.0f};
  test::expect_error([&] { pool.load(0, {wrong_a, {}}); }, "A expected [4, 16] (rank, in)");
  pool.load(0, {ok, {}});
  Tensor x = test::random_tensor({3, 16}, DType::bf16, rng);
  Tensor u = Tensor::empty({3, 16}, DType::f32), y = Tensor::zeros({3, 12}, DType::f32);
  Tensor bad_slot = test::from_ints({0, 5, -1}, {3});
  test::expect_error([&] { apply_dense_lora(pool, x, bad_slot, u, y, Stream()); },
                     "token_slot[1] = 5");
  Tensor ts = test::from_ints({0, 1, -1}, {3});
  Tensor y_wrong = Tensor::zeros({3, 10}, DType::f32);
  test::expect_error([&] { apply_dense_lora(pool, x, ts, u, y_wrong, Stream()); },
                     "dense_lora_expand y");
  Tensor u_small = Tensor::empty({2, 16}, DType::f32);
  test::expect_error([&] { apply_dense_lora(pool, x, ts, u_small, y, Stream()); },
                     "workspace u has 2 rows for 3 tokens");
  // unload: the slot's tokens become base tokens.
  pool.unload(0);
  EXPECT_EQ(pool.rank(0, 0), 0);
}

}  // namespace
}  // namespace moelora
