// LoRA on experts through MoeLoraPool + MoeLoraHooks on the CPU reference backend, against a
// per-token double loop on explicitly merged weights W + s * B . A.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cpu/moe_ops.h"
#include "moe_reference.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"
#include "test_util.h"

namespace moelora {
namespace {

constexpr float kAlpha = 16.0f;

// Which modules an adapter targets and with what rank (0 = not targeted).
struct AdapterSpec {
  int gate = 0, up = 0, fused = 0, down = 0;
  bool rslora = false;
  DType dtype = DType::bf16;  // host dtype of A and B
};

// The PEFT scale, computed here independently of lora_scaling().
double peft_scale(int r, bool rslora) {
  return rslora ? kAlpha / std::sqrt(double(r)) : kAlpha / r;
}

// A [E, r, in] with A . x ~ O(1) for x in [-1, 1); B [E, out, r] with B . u ~ O(|u|).
void random_pair(int64_t E, int64_t in, int64_t out, int r, DType dt, std::mt19937_64& rng,
                 Tensor& a, Tensor& b) {
  const float sa = std::sqrt(3.0f / float(in)), sb = std::sqrt(3.0f / float(r));
  a = test::random_tensor({E, r, in}, dt, rng, -sa, sa);
  b = test::random_tensor({E, out, r}, dt, rng, -sb, sb);
}

MoeLoraWeights make_adapter(const MoeShape& s, const AdapterSpec& spec, std::mt19937_64& rng) {
  MoeLoraWeights w;
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  auto scale = [&](int r) {
    const float sc = lora_scaling(kAlpha, r, spec.rslora);
    EXPECT_NEAR(sc, peft_scale(r, spec.rslora), 1e-6 * sc);
    return sc;
  };
  if (spec.gate) {
    random_pair(E, H, I, spec.gate, spec.dtype, rng, w.gate_a, w.gate_b);
    w.gate_scale = scale(spec.gate);
  }
  if (spec.up) {
    random_pair(E, H, I, spec.up, spec.dtype, rng, w.up_a, w.up_b);
    w.up_scale = scale(spec.up);
  }
  if (spec.fused) {
    random_pair(E, H, 2 * I, spec.fused, spec.dtype, rng, w.gate_up_a, w.gate_up_b);
    w.gate_up_scale = scale(spec.fused);
  }
  if (spec.down) {
    random_pair(E, I, H, spec.down, spec.dtype, rng, w.down_a, w.down_b);
    w.down_scale = scale(spec.down);
  }
  return w;
}

// dst[e][row0 + i][c] += scale * sum_r b[e][i][r] * a[e][r][c] (row stride `cols`).
void merge(std::vector<double>& dst, int64_t rows_per_e, int64_t row0, int64_t cols,
           const Tensor& a_t, const Tensor& b_t, double scale) {
  const auto a = test::to_floats(a_t), b = test::to_floats(b_t);
  const int64_t E = a_t.size(0), r = a_t.size(1), out = b_t.size(1);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < out; ++i)
      for (int64_t c = 0; c < cols; ++c) {
        double d = 0;
        for (int64_t q = 0; q < r; ++q)
          d += double(b[size_t((e * out + i) * r + q)]) * a[size_t((e * r + q) * cols + c)];
        dst[size_t((e * rows_per_e + row0 + i) * cols + c)] += scale * d;
      }
}

// The adapter's merged expert weights W + s * B . A, in double.
test::RefExperts merged(const test::RefExperts& base, const MoeLoraWeights& w,
                        const AdapterSpec& spec) {
  test::RefExperts m = base;
  const int64_t H = base.H, I = base.I;
  if (spec.gate) merge(m.w13, 2 * I, 0, H, w.gate_a, w.gate_b, peft_scale(spec.gate, spec.rslora));
  if (spec.up) merge(m.w13, 2 * I, I, H, w.up_a, w.up_b, peft_scale(spec.up, spec.rslora));
  if (spec.fused)
    merge(m.w13, 2 * I, 0, H, w.gate_up_a, w.gate_up_b, peft_scale(spec.fused, spec.rslora));
  if (spec.down) merge(m.w2, H, 0, I, w.down_a, w.down_b, peft_scale(spec.down, spec.rslora));
  return m;
}

using test::reference_config;

MoeShape small_shape(int E, int k, int shared_inter = 0) {
  return test::make_test_shape(64, 48, E, k, shared_inter);
}

std::vector<uint16_t> bf16_bits(const Tensor& t) {
  std::vector<uint16_t> v(size_t(t.numel()));
  std::memcpy(v.data(), t.data(), v.size() * 2);
  return v;
}

// Loads `specs` into slots 0..n-1 of a pool with `extra_slots` more (never loaded: tokens on
// them get the base model), runs mixed batches of each size in `Ms` and checks:
//  - y against the double loop on merged weights (base weights for slot -1 / empty slots);
//  - base tokens bit-identical to a LoRA-off run;
//  - adapter tokens actually changed (the test would notice LoRA being skipped).
void check_lora_layer(const MoeShape& s, const RouterConfig& router,
                      const std::vector<AdapterSpec>& specs, int r_max,
                      const std::vector<int64_t>& Ms, int extra_slots = 0) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t max_tokens = 300;
  MoeRunner runner(reference_config(s, router, max_tokens));
  const MoeWeights w = test::random_moe_weights(s, rng, router.use_correction_bias);
  const auto base = test::RefExperts::from(w.w13.w, w.w2.w);
  test::RefExperts shared;
  if (s.shared_inter > 0) shared = test::RefExperts::from(w.shared_w13.w, w.shared_w2.w);
  const float* bias = w.correction_bias.defined() ? w.correction_bias.data<float>() : nullptr;

  const int n = int(specs.size()), S = n + extra_slots;
  MoeLoraPool pool(s, S, r_max, Device::cpu());
  std::vector<test::RefExperts> slot_experts;
  for (int i = 0; i < n; ++i) {
    const MoeLoraWeights lw = make_adapter(s, specs[size_t(i)], rng);
    pool.load(i, lw);
    slot_experts.push_back(merged(base, lw, specs[size_t(i)]));
  }
  auto hooks = MoeLoraHooks::create(pool, max_tokens);

  for (int64_t M : Ms) {
    SCOPED_TRACE("M=" + std::to_string(M));
    MoeInputs in;
    in.x = test::random_tensor({M, s.hidden}, DType::bf16, rng);
    in.router_logits = test::random_tensor({M, s.num_experts}, DType::f32, rng, -3.0f, 3.0f);
    Tensor token_slot = test::random_ints({M}, rng, -1, S - 1);
    if (M > 1) token_slot.data<int32_t>()[0] = -1;  // at least one base token
    hooks->bind(LoraBatch{token_slot});
    Tensor y_on = Tensor::empty({M, s.hidden}, DType::bf16), y_off = y_on.to(Device::cpu());
    y_on.fill_bytes(0xff);
    y_off.fill_bytes(0xff);
    runner.run(in, w, hooks.get(), y_on, Stream());
    runner.run(in, w, nullptr, y_off, Stream());

    const auto xf = test::to_floats(in.x);
    const float* lg = in.router_logits.data<float>();
    const int32_t* ts = token_slot.data<int32_t>();
    std::vector<float> expected;
    for (int64_t t = 0; t < M; ++t) {
      const std::vector<double> x(xf.begin() + t * s.hidden, xf.begin() + (t + 1) * s.hidden);
      const auto& experts = ts[t] >= 0 && ts[t] < n ? slot_experts[size_t(ts[t])] : base;
      const auto out = test::ref_moe_token(x, lg + t * s.num_experts, bias, router, experts,
                                           s.shared_inter > 0 ? &shared : nullptr, 1.0);
      expected.insert(expected.end(), out.begin(), out.end());
    }
    EXPECT_TRUE(test::allclose(test::to_floats(y_on), expected, 1e-2));

    const auto on = bf16_bits(y_on), off = bf16_bits(y_off);
    int64_t changed_rows = 0, adapter_rows = 0;
    for (int64_t t = 0; t < M; ++t) {
      const bool lora = ts[t] >= 0 && ts[t] < n;
      bool same = true;
      for (int64_t c = 0; c < s.hidden; ++c)
        same &= on[size_t(t * s.hidden + c)] == off[size_t(t * s.hidden + c)];
      if (!lora)
        EXPECT_TRUE(same) << "base token " << t << " (slot " << ts[t]
                          << ") differs from the LoRA-off run";
      adapter_rows += lora;
      changed_rows += lora && !same;
    }
    EXPECT_EQ(changed_rows, adapter_rows) << "LoRA left some adapter tokens unchanged";
  }
}

const RouterConfig kSoftmax82 = RouterConfig::softmax_topk(8, 2, true);

TEST(MoeLora, SeparateGateUpWithDifferentRanks) {
  check_lora_layer(small_shape(8, 2), kSoftmax82, {{.gate = 8, .up = 16}}, 16, {1, 7, 64});
}

TEST(MoeLora, FusedGateUpWithDown) {
  check_lora_layer(small_shape(8, 2), kSoftmax82, {{.fused = 16, .down = 8}}, 16, {1, 7, 64});
}

TEST(MoeLora, DownOnly) {
  check_lora_layer(small_shape(8, 2), kSoftmax82, {{.down = 8}}, 8, {7, 64});
}

TEST(MoeLora, GateOnly) {
  check_lora_layer(small_shape(8, 2), kSoftmax82, {{.gate = 16}}, 16, {7, 64});
}

TEST(MoeLora, UpOnlyFromF32Weights) {
  check_lora_layer(small_shape(8, 2), kSoftmax82, {{.up = 8, .dtype = DType::f32}}, 8, {7});
}

TEST(MoeLora, RsLoraScale) {
  check_lora_layer(small_shape(8, 2), kSoftmax82, {{.fused = 16, .down = 64, .rslora = true}}, 64,
                   {7, 64});
}

// Ranks 8, 16 and 64 (r_max = 64) and every kind of adapter in one batch, plus an empty slot
// and base tokens.
TEST(MoeLora, HeterogeneousRanksMixedBatch) {
  const std::vector<AdapterSpec> specs = {
      {.gate = 8, .up = 16, .down = 64},
      {.fused = 16, .down = 8},
      {.fused = 64, .down = 16, .rslora = true},
      {.gate = 64},
      {.down = 8},
      {.gate = 64, .up = 64, .down = 64},
  };
  check_lora_layer(small_shape(8, 2), kSoftmax82, specs, 64, {1, 7, 64, 257}, /*extra_slots=*/1);
}

TEST(MoeLora, GroupedRoutingWithSharedExpert) {
  const std::vector<AdapterSpec> specs = {{.fused = 8, .down = 8}, {.gate = 16, .up = 8}};
  check_lora_layer(small_shape(16, 4, /*shared_inter=*/32),
                   RouterConfig::deepseek_v3(16, 4, 4, 2, 2.5f), specs, 16, {7, 64});
}

TEST(MoeLora, UnloadedSlotIsBase) {
  std::mt19937_64 rng(test::fresh_seed());
  const MoeShape s = small_shape(8, 2);
  MoeRunner runner(reference_config(s, kSoftmax82, 16));
  const MoeWeights w = test::random_moe_weights(s, rng, false);
  MoeLoraPool pool(s, 2, 16, Device::cpu());
  pool.load(1, make_adapter(s, {.fused = 16, .down = 16}, rng));
  auto hooks = MoeLoraHooks::create(pool, 16);
  MoeInputs in;
  in.x = test::random_tensor({5, s.hidden}, DType::bf16, rng);
  in.router_logits = test::random_tensor({5, s.num_experts}, DType::f32, rng);
  hooks->bind(LoraBatch{test::from_ints({1, 1, -1, 1, 0}, {5})});
  Tensor y_off = Tensor::empty({5, s.hidden}, DType::bf16), y_on = y_off.to(Device::cpu());
  runner.run(in, w, nullptr, y_off, Stream());
  runner.run(in, w, hooks.get(), y_on, Stream());
  EXPECT_NE(bf16_bits(y_on), bf16_bits(y_off));
  pool.unload(1);
  EXPECT_FALSE(pool.loaded(1));
  runner.run(in, w, hooks.get(), y_on, Stream());
  EXPECT_EQ(bf16_bits(y_on), bf16_bits(y_off));
}

TEST(MoeLora, BadInputThrows) {
  std::mt19937_64 rng(test::fresh_seed());
  const MoeShape s = small_shape(8, 2);
  MoeLoraPool pool(s, 2, 16, Device::cpu());
  // Rank above r_max.
  test::expect_error([&] { pool.load(0, make_adapter(s, {.fused = 32}, rng)); },
                     "rank 32 is outside the pool's 1..r_max=16");
  // Wrong A shape (in-dim I instead of H); wrong B shape (out-dim H instead of 2I).
  MoeLoraWeights w = make_adapter(s, {.fused = 8}, rng);
  w.gate_up_a = test::random_tensor({8, 8, 48}, DType::bf16, rng);
  test::expect_error([&] { pool.load(0, w); }, "gate_up lora_A: expected shape [8, 8, 64]");
  w = make_adapter(s, {.fused = 8}, rng);
  w.gate_up_b = test::random_tensor({8, 64, 8}, DType::bf16, rng);
  test::expect_error([&] { pool.load(0, w); }, "gate_up lora_B: expected shape [8, 96, 8]");
  // A rank != B rank.
  w = make_adapter(s, {.down = 8}, rng);
  w.down_b = test::random_tensor({8, 64, 4}, DType::bf16, rng);
  test::expect_error([&] { pool.load(0, w); }, "lora_A rank 8 != lora_B rank 4");
  // Slot out of range.
  test::expect_error([&] { pool.load(2, make_adapter(s, {.down = 8}, rng)); },
                     "slot 2 out of range");
  // Separate and fused gate_up both given; an A without its B.
  w = make_adapter(s, {.gate = 8, .fused = 8}, rng);
  test::expect_error([&] { pool.load(0, w); }, "both separate gate/up and fused gate_up");
  w = make_adapter(s, {.up = 8}, rng);
  w.up_b = Tensor();
  test::expect_error([&] { pool.load(0, w); }, "every A needs its B");
  EXPECT_FALSE(pool.loaded(0)) << "a failed load must leave the slot untouched";

  // A token on a slot the pool does not have: caught when the batch is grouped.
  MoeRunner runner(reference_config(s, kSoftmax82, 8));
  const MoeWeights mw = test::random_moe_weights(s, rng, false);
  auto hooks = MoeLoraHooks::create(pool, 8);
  MoeInputs in;
  in.x = test::random_tensor({3, s.hidden}, DType::bf16, rng);
  in.router_logits = test::random_tensor({3, s.num_experts}, DType::f32, rng);
  Tensor y = Tensor::empty({3, s.hidden}, DType::bf16);
  hooks->bind(LoraBatch{test::from_ints({0, 2, -1}, {3})});
  test::expect_error([&] { runner.run(in, mw, hooks.get(), y, Stream()); }, "outside [-1, 16)");
  hooks->bind(LoraBatch{test::from_ints({0, -3, -1}, {3})});
  test::expect_error([&] { runner.run(in, mw, hooks.get(), y, Stream()); }, "token_slot[1] = -3");
  // Running before bind() / binding too many tokens.
  auto unbound = MoeLoraHooks::create(pool, 8);
  test::expect_error([&] { runner.run(in, mw, unbound.get(), y, Stream()); }, "bind()");
  test::expect_error([&] { hooks->bind(LoraBatch{Tensor::zeros({9}, DType::i32)}); }, "M <= 8");
}

// The LoRA ops alone: a plan over the wrong number of virtual experts and a u too narrow for
// the pool's A are rejected.
TEST(MoeLora, OpsRejectMismatchedPlanAndWorkspace) {
  std::mt19937_64 rng(test::fresh_seed());
  const MoeShape s = small_shape(8, 2);
  MoeLoraPool pool(s, 2, 16, Device::cpu());
  const Tensor x = test::random_tensor({3, s.hidden}, DType::bf16, rng);
  MoeAlignment wrong = MoeAlignment::allocate(6, 8, kMaxBlockM, Device::cpu());  // not S*E = 16
  wrong.block_m = 1;
  cpu::moe_align(test::from_ints({0, 1, 2, 3, 4, 5}, {3, 2}), wrong, Stream());
  Tensor u = Tensor::empty({6, 32}, DType::f32);
  test::expect_error(
      [&] {
        cpu::moe_lora_shrink(x, 2, wrong, pool.a13(), pool.slot_meta(), LoraSeam::gate_up, u,
                             Stream());
      },
      "expected S*E");
  MoeAlignment plan = MoeAlignment::allocate(6, 16, kMaxBlockM, Device::cpu());
  plan.block_m = 1;
  cpu::moe_align(test::from_ints({0, 9, 2, 3, 4, 15}, {3, 2}), plan, Stream());
  Tensor narrow_u = Tensor::empty({6, 8}, DType::f32);
  test::expect_error(
      [&] {
        cpu::moe_lora_shrink(x, 2, plan, pool.a13(), pool.slot_meta(), LoraSeam::gate_up, narrow_u,
                             Stream());
      },
      "shrink u");
}

}  // namespace
}  // namespace moelora
