// The whole MoE layer on the CPU reference backend against a per-token double-precision loop.
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cpu/moe_ops.h"
#include "moe_reference.h"
#include "moelora/moe/runner.h"
#include "test_util.h"

namespace moelora {
namespace {

using test::reference_config;

MoeShape small_shape(int H, int I, int E, int k, int shared_inter = 0, bool shared_gate = false) {
  return test::make_test_shape(H, I, E, k, shared_inter, shared_gate);
}

// Runs the layer for each M and compares y with the double loop (and the routing with the
// reference routing).
void check_layer(const MoeShape& s, const RouterConfig& r, const std::vector<int64_t>& Ms) {
  std::mt19937_64 rng(test::fresh_seed());
  MoeRunner runner(reference_config(s, r, 300));
  EXPECT_EQ(runner.backend().name(), "reference");
  const MoeWeights w = test::random_moe_weights(s, rng, r.use_correction_bias);
  const auto experts = test::RefExperts::from(w.w13.w, w.w2.w);
  test::RefExperts shared;
  if (s.shared_inter > 0) shared = test::RefExperts::from(w.shared_w13.w, w.shared_w2.w);
  const float* bias = w.correction_bias.defined() ? w.correction_bias.data<float>() : nullptr;

  for (int64_t M : Ms) {
    SCOPED_TRACE("M=" + std::to_string(M));
    MoeInputs in;
    in.x = test::random_tensor({M, s.hidden}, DType::bf16, rng);
    in.router_logits = test::random_tensor({M, s.num_experts}, DType::f32, rng, -3.0f, 3.0f);
    if (s.shared_gate)
      in.shared_gate_logits = test::random_tensor({M}, DType::f32, rng, -3.0f, 3.0f);
    Tensor y = Tensor::empty({M, s.hidden}, DType::bf16);
    y.fill_bytes(0xff);
    runner.run(in, w, nullptr, y, Stream());

    const auto xf = test::to_floats(in.x);
    const float* lg = in.router_logits.data<float>();
    const auto ids = test::to_ints(runner.last_topk().ids);
    std::vector<float> expected;
    for (int64_t t = 0; t < M; ++t) {
      const std::vector<double> x(xf.begin() + t * s.hidden, xf.begin() + (t + 1) * s.hidden);
      const auto route = test::ref_route(lg + t * s.num_experts, bias, r);
      for (int j = 0; j < s.top_k; ++j)
        ASSERT_EQ(ids[size_t(t * s.top_k + j)], route.ids[size_t(j)]) << "token " << t;
      const double gate =
          s.shared_gate ? test::ref_sigmoid(in.shared_gate_logits.data<float>()[t]) : 1.0;
      const auto out = test::ref_moe_token(x, lg + t * s.num_experts, bias, r, experts,
                                           s.shared_inter > 0 ? &shared : nullptr, gate);
      expected.insert(expected.end(), out.begin(), out.end());
    }
    EXPECT_TRUE(test::allclose(test::to_floats(y), expected, 1e-2));
  }
}

TEST(MoeLayer, SoftmaxTop2MatchesDoubleLoop) {
  check_layer(small_shape(64, 48, 8, 2), RouterConfig::softmax_topk(8, 2, true), {1, 7, 64, 257});
  check_layer(small_shape(64, 48, 8, 2), RouterConfig::softmax_topk(8, 2, false), {13});
}

TEST(MoeLayer, DeepSeekV3GroupedWithBiasAndSharedExpert) {
  const MoeShape s = small_shape(64, 32, 16, 4, /*shared_inter=*/48);
  check_layer(s, RouterConfig::deepseek_v3(16, 4, 4, 2, 2.5f), {1, 7, 64});
}

TEST(MoeLayer, SharedExpertWithSigmoidGate) {
  const MoeShape s = small_shape(64, 48, 8, 2, /*shared_inter=*/96, /*shared_gate=*/true);
  check_layer(s, RouterConfig::softmax_topk(8, 2, false), {1, 7, 64});
}

// Experts that are not here (id -1, as with expert parallelism) contribute nothing: check the
// expert stages directly with a hand-made routing.
TEST(MoeLayer, NotHereSlotsAreSkipped) {
  std::mt19937_64 rng(test::fresh_seed());
  const MoeShape s = small_shape(32, 16, 4, 2);
  const MoeWeights w = test::random_moe_weights(s, rng, false);
  const auto experts = test::RefExperts::from(w.w13.w, w.w2.w);
  const int64_t M = 5, k = 2, slots = M * k;
  const std::vector<int32_t> ids = {0, -1, 3, 1, -1, -1, 2, 2, 1, 0};
  const std::vector<float> wts = {0.7f, 0.3f, 0.6f, 0.4f, 0.5f, 0.5f, 0.9f, 0.1f, 0.2f, 0.8f};
  const Tensor ids_t = test::from_ints(ids, {M, k});
  const Tensor x = test::random_tensor({M, s.hidden}, DType::bf16, rng);
  MoeAlignment plan = MoeAlignment::allocate(slots, s.num_experts, kMaxBlockM, Device::cpu());
  plan.block_m = 4;
  cpu::moe_align(ids_t, plan, Stream());
  Tensor h = Tensor::empty({slots, 2 * s.inter}, DType::f32),
         a = Tensor::empty({slots, s.inter}, DType::bf16);
  Tensor o = Tensor::empty({slots, s.hidden}, DType::f32),
         y = Tensor::empty({M, s.hidden}, DType::bf16);
  for (Tensor* t : {&h, &a, &o, &y}) t->fill_bytes(0xff);  // NaN where unwritten
  cpu::moe_gemm1(x, int(k), plan, w.w13.w, h, Stream());
  cpu::moe_activation(h, ids_t, a, Stream());
  cpu::moe_gemm2(a, plan, w.w2.w, test::from_floats(wts, {slots}, DType::f32), o, Stream());
  cpu::moe_reduce(o, ids_t, Tensor(), Tensor(), y, Stream());
  const auto xf = test::to_floats(x);
  std::vector<float> expected;
  for (int64_t t = 0; t < M; ++t) {
    const std::vector<double> xt(xf.begin() + t * s.hidden, xf.begin() + (t + 1) * s.hidden);
    std::vector<double> acc(size_t(s.hidden), 0.0);
    for (int64_t j = 0; j < k; ++j)
      if (ids[size_t(t * k + j)] >= 0)
        test::ref_expert(experts, ids[size_t(t * k + j)], xt, wts[size_t(t * k + j)], acc);
    expected.insert(expected.end(), acc.begin(), acc.end());
  }
  EXPECT_TRUE(test::allclose(test::to_floats(y), expected, 1e-2));
  // Token 2 has no expert here: exactly zero.
  const auto yf = test::to_floats(y);
  for (int64_t c = 0; c < s.hidden; ++c) ASSERT_EQ(yf[size_t(2 * s.hidden + c)], 0.0f);
}

TEST(MoeLayer, BadInputThrows) {
  std::mt19937_64 rng(test::fresh_seed());
  const MoeShape s = small_shape(32, 16, 4, 2);
  MoeRunner runner(reference_config(s, RouterConfig::softmax_topk(4, 2, true), 8));
  const MoeWeights w = test::random_moe_weights(s, rng, false);
  MoeInputs in;
  in.x = test::random_tensor({3, 32}, DType::bf16, rng);
  in.router_logits = test::random_tensor({3, 4}, DType::f32, rng);
  Tensor y = Tensor::empty({3, 32}, DType::bf16);
  MoeWeights bad = w;
  bad.w13 = test::random_tensor({4, 32, 16}, DType::bf16, rng);  // [E, 2I, H] with H, I swapped
  test::expect_error([&] { runner.run(in, bad, nullptr, y, Stream()); }, "w13");
  MoeInputs too_many = in;
  too_many.x = test::random_tensor({9, 32}, DType::bf16, rng);
  too_many.router_logits = test::random_tensor({9, 4}, DType::f32, rng);
  Tensor y9 = Tensor::empty({9, 32}, DType::bf16);
  test::expect_error([&] { runner.run(too_many, w, nullptr, y9, Stream()); }, "1..8");
  // Op level: gemm1 with a weight whose group count does not match the plan.
  MoeAlignment plan = MoeAlignment::allocate(6, 4, kMaxBlockM, Device::cpu());
  plan.block_m = 1;
  cpu::moe_align(test::from_ints({0, 1, 2, 3, 0, 1}, {3, 2}), plan, Stream());
  Tensor h = Tensor::empty({6, 32}, DType::f32);
  test::expect_error(
      [&] {
        cpu::moe_gemm1(in.x, 2, plan, test::random_tensor({3, 32, 32}, DType::bf16, rng), h,
                       Stream());
      },
      "moe_gemm1 w13");
  Tensor h_small = Tensor::empty({5, 32}, DType::f32);
  test::expect_error([&] { cpu::moe_gemm1(in.x, 2, plan, w.w13.w, h_small, Stream()); },
                     "moe_gemm1 h");
}

}  // namespace
}  // namespace moelora
