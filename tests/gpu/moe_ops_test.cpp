// CUDA routing, alignment, activation and reduction against the CPU reference ops, on fresh
// random inputs with poisoned outputs.
#include <algorithm>
#include <cmath>
#include <vector>

#include "gpu_op_test_util.h"
#include "kernels/cpu/moe_ops.h"
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_ops.h"

namespace moelora {
namespace {

using test::poisoned;
using test::to_gpu;

constexpr int64_t kTokenCounts[] = {1, 7, 64, 257, 1024};

struct RouteCase {
  const char* name;
  RouterConfig cfg;
  bool ties;  // logits on a coarse grid, so many experts tie
};

std::vector<RouteCase> route_cases() {
  RouterConfig v2 = RouterConfig::softmax_topk(64, 6, false);
  v2.n_group = 8, v2.topk_group = 3, v2.group_score = GroupScore::max;
  RouterConfig v3_norenorm = RouterConfig::deepseek_v3(256, 8, 8, 4, 2.5f, false);
  return {
      {"qwen3_softmax_renorm", RouterConfig::softmax_topk(128, 8, true), false},
      {"softmax_no_renorm", RouterConfig::softmax_topk(60, 4, false), false},
      {"mixtral", RouterConfig::softmax_topk(8, 2, true), false},
      {"ties", RouterConfig::softmax_topk(128, 8, true), true},
      {"v3_grouped_bias", RouterConfig::deepseek_v3(256, 8, 8, 4, 2.5f), false},
      {"v3_grouped_bias_ties", RouterConfig::deepseek_v3(256, 8, 8, 4, 2.5f), true},
      {"v3_no_renorm", v3_norenorm, false},
      {"v2_group_max", v2, false},
      {"e1024_k32", RouterConfig::softmax_topk(1024, 32, true), false},
  };
}

// Runs CPU and GPU routing (separate ops, and the fused route+align) and compares.
void check_route(const RouteCase& rc, int64_t m, std::mt19937_64& rng, const Stream& s) {
  SCOPED_TRACE(::testing::Message() << rc.name << " M=" << m);
  const RouterConfig& cfg = rc.cfg;
  const int E = cfg.num_experts, k = cfg.top_k;
  Tensor logits = test::random_tensor({m, E}, DType::f32, rng, -4.0f, 4.0f);
  if (rc.ties) {
    float* p = logits.data<float>();
    for (int64_t i = 0; i < logits.numel(); ++i) p[i] = std::round(p[i]);
  }
  Tensor bias;
  if (cfg.use_correction_bias) {
    bias = test::random_tensor({E}, DType::f32, rng, -0.1f, 0.1f);
    if (rc.ties) bias.fill_bytes(0);
  }
  TopK ref{Tensor::empty({m, k}, DType::i32), Tensor::empty({m, k}, DType::f32)};
  cpu::moe_route(logits, bias, cfg, ref, Stream());
  const std::vector<int32_t> ref_ids = test::to_ints(ref.ids);
  const std::vector<float> ref_w = test::to_floats(ref.weights);

  const Tensor dlogits = to_gpu(logits), dbias = bias.defined() ? to_gpu(bias) : Tensor();
  TopK out{poisoned({m, k}, DType::i32, Device::cuda(), test::kPoisonInt),
           poisoned({m, k}, DType::f32, Device::cuda(), test::kPoisonFloat)};
  cuda::moe_route(dlogits, dbias, cfg, out, s);
  s.synchronize();
  EXPECT_EQ(test::to_ints(out.ids), ref_ids);
  EXPECT_TRUE(test::allclose(test::to_floats(out.weights), ref_w, 1e-5, 1e-6));

  // Fused route + align: same routing, and the plan of the separate align.
  for (int bm : {8, 16}) {
    TopK fused{poisoned({m, k}, DType::i32, Device::cuda(), test::kPoisonInt),
               poisoned({m, k}, DType::f32, Device::cuda(), test::kPoisonFloat)};
    MoeAlignment plan = test::poisoned_plan(m * k, E, bm, Device::cuda());
    cuda::moe_route_align(dlogits, dbias, cfg, fused, plan, s);
    MoeAlignment ref_plan = test::poisoned_plan(m * k, E, bm, Device::cpu());
    cpu::moe_align(ref.ids, ref_plan, Stream());
    s.synchronize();
    EXPECT_EQ(test::to_ints(fused.ids), ref_ids);
    EXPECT_TRUE(test::allclose(test::to_floats(fused.weights), ref_w, 1e-5, 1e-6));
    const int32_t total = test::to_ints(plan.num_padded)[0];
    ASSERT_EQ(total, test::to_ints(ref_plan.num_padded)[0]);
    const auto got = test::to_ints(plan.sorted_slots), want = test::to_ints(ref_plan.sorted_slots);
    EXPECT_TRUE(std::equal(want.begin(), want.begin() + total, got.begin())) << "bm=" << bm;
    EXPECT_EQ(test::to_ints(plan.group_offsets), test::to_ints(ref_plan.group_offsets));
  }
}

TEST(CudaMoeRoute, MatchesReference) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (const RouteCase& rc : route_cases())
    for (int64_t m : kTokenCounts) check_route(rc, m, rng, s);
}

TEST(CudaMoeRoute, BadInput) {
  MOELORA_REQUIRE_GPU();
  const RouterConfig cfg = RouterConfig::softmax_topk(16, 2, true);
  Stream s = Stream::create(Device::cuda());
  TopK out{Tensor::empty({4, 2}, DType::i32, Device::cuda()),
           Tensor::empty({4, 2}, DType::f32, Device::cuda())};
  test::expect_error(
      [&] { cuda::moe_route(Tensor::zeros({4, 15}, DType::f32, Device::cuda()), Tensor(), cfg, out, s); },
      "logits");
  test::expect_error(
      [&] { cuda::moe_route(Tensor::zeros({4, 16}, DType::bf16, Device::cuda()), Tensor(), cfg, out, s); },
      "logits");
  test::expect_error(
      [&] { cuda::moe_route(Tensor::zeros({4, 16}, DType::f32), Tensor(), cfg, out, s); }, "CUDA");
  TopK wrong{Tensor::empty({4, 3}, DType::i32, Device::cuda()), out.weights};
  test::expect_error(
      [&] { cuda::moe_route(Tensor::zeros({4, 16}, DType::f32, Device::cuda()), Tensor(), cfg, wrong, s); },
      "topk.ids");
  const RouterConfig v3 = RouterConfig::deepseek_v3(16, 2, 4, 2, 1.0f);
  test::expect_error(
      [&] { cuda::moe_route(Tensor::zeros({4, 16}, DType::f32, Device::cuda()), Tensor(), v3, out, s); },
      "correction_bias");
}

// Random group ids in [-1, G): each token's choices distinct unless `one_group`.
std::vector<int32_t> random_group_ids(int64_t m, int k, int groups, bool one_group,
                                      std::mt19937_64& rng) {
  std::vector<int32_t> ids(size_t(m * k));
  std::uniform_int_distribution<int> pick(0, groups - 1);
  for (int64_t t = 0; t < m; ++t)
    for (int j = 0; j < k; ++j) {
      int32_t g = one_group ? groups - 1 : pick(rng);
      if (!one_group && rng() % 7 == 0) g = -1;
      ids[size_t(t * k + j)] = g;
    }
  return ids;
}

// GPU plan == CPU plan on every entry the contract defines; entries past them untouched.
void check_align(const std::vector<int32_t>& ids, int64_t m, int k, int groups, int bm,
                 const Stream& s, const std::vector<int32_t>* cpu_ids = nullptr) {
  SCOPED_TRACE(::testing::Message() << "M=" << m << " k=" << k << " G=" << groups << " bm=" << bm);
  const int64_t n = m * k;
  Tensor hids = test::from_ints(cpu_ids ? *cpu_ids : ids, {m, k});
  MoeAlignment ref = test::poisoned_plan(n, groups, bm, Device::cpu());
  cpu::moe_align(hids, ref, Stream());
  MoeAlignment plan = test::poisoned_plan(n, groups, bm, Device::cuda());
  cuda::moe_align(to_gpu(test::from_ints(ids, {m, k})), plan, s);
  s.synchronize();

  const int32_t total = test::to_ints(ref.num_padded)[0];
  ASSERT_EQ(test::to_ints(plan.num_padded)[0], total);
  EXPECT_EQ(test::to_ints(plan.group_offsets), test::to_ints(ref.group_offsets));
  const auto got = test::to_ints(plan.sorted_slots), want = test::to_ints(ref.sorted_slots);
  for (int64_t i = 0; i < total; ++i) ASSERT_EQ(got[size_t(i)], want[size_t(i)]) << "entry " << i;
  for (size_t i = size_t(total); i < got.size(); ++i)
    ASSERT_EQ(got[i], test::kPoisonIntValue) << "sorted_slots[" << i << "] written past the end";
  // block_group: the used blocks, then -1 over every block a kernel grid may visit.
  const int64_t grid_blocks = MoeAlignment::capacity(n, groups, bm) / bm;
  const auto bg = test::to_ints(plan.block_group), bg_ref = test::to_ints(ref.block_group);
  for (int64_t b = 0; b < grid_blocks; ++b) ASSERT_EQ(bg[size_t(b)], bg_ref[size_t(b)]) << "block " << b;
}

TEST(CudaMoeAlign, MatchesReference) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  struct Shape {
    int k, groups;
  };
  for (const Shape sh : {Shape{8, 128}, Shape{2, 8}, Shape{1, 1}, Shape{6, 64}, Shape{8, 1024},
                         Shape{8, 4096}, Shape{32, 256}})
    for (int64_t m : kTokenCounts)
      for (int bm : {1, 8, 16, 64, 128}) {
        if (m * sh.k >= 65536) continue;
        check_align(random_group_ids(m, sh.k, sh.groups, false, rng), m, sh.k, sh.groups, bm, s);
      }
}

TEST(CudaMoeAlign, AllTokensToOneExpert) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (int64_t m : kTokenCounts)
    for (int bm : {1, 16, 128}) check_align(random_group_ids(m, 8, 128, true, rng), m, 8, 128, bm, s);
  // Every slot "not here" (expert parallelism: all experts elsewhere).
  check_align(std::vector<int32_t>(64 * 8, -1), 64, 8, 128, 16, s);
}

TEST(CudaMoeAlign, OutOfRangeIdsAreSkipped) {
  MOELORA_REQUIRE_GPU();
  // Device ids cannot be validated without a sync: ids outside [-1, G) must be skipped (like
  // -1), never written out of bounds.
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  const int64_t m = 64;
  const int k = 8, G = 128;
  std::vector<int32_t> ids = random_group_ids(m, k, G, false, rng), clean = ids;
  for (size_t i = 0; i < ids.size(); i += 5) {
    ids[i] = (i % 2) ? G + int32_t(i) : -1000 - int32_t(i);
    clean[i] = -1;
  }
  check_align(ids, m, k, G, 16, s, &clean);
}

TEST(CudaMoeAlign, BadInput) {
  MOELORA_REQUIRE_GPU();
  Stream s = Stream::create(Device::cuda());
  // Sized for 16 slots at block_m <= 8: 32 slots may need more than it holds.
  MoeAlignment plan = MoeAlignment::allocate(16, 8, 8, Device::cuda());
  plan.block_m = 8;
  Tensor ids = Tensor::zeros({4, 4}, DType::i32, Device::cuda());
  test::expect_error([&] { cuda::moe_align(Tensor::zeros({4, 4}, DType::f32, Device::cuda()), plan, s); },
                          "group_ids");
  test::expect_error([&] { cuda::moe_align(Tensor::zeros({8, 4}, DType::i32, Device::cuda()), plan, s); },
                          "sorted_slots");
  plan.block_m = 0;
  test::expect_error([&] { cuda::moe_align(ids, plan, s); }, "block_m");
  plan.block_m = 8;
  MoeAlignment huge = MoeAlignment::allocate(16, 1 << 20, 8, Device::cuda());
  huge.block_m = 8;
  test::expect_error([&] { cuda::moe_align(ids, huge, s); }, "groups");
}

TEST(CudaMoeActivation, MatchesReference) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (int inter : {768, 1408, 13})
    for (int64_t m : kTokenCounts) {
      SCOPED_TRACE(::testing::Message() << "I=" << inter << " M=" << m);
      const int k = 4;
      const int64_t n = m * k;
      Tensor h = test::random_tensor({n, 2 * int64_t(inter)}, DType::f32, rng, -4.0f, 4.0f);
      Tensor ids = test::from_ints(random_group_ids(m, k, 16, false, rng), {m, k});
      Tensor ref = poisoned({n, inter}, DType::bf16, Device::cpu(), test::kPoisonFloat);
      cpu::moe_activation(h, ids, ref, Stream());
      Tensor a = poisoned({n, inter}, DType::bf16, Device::cuda(), test::kPoisonFloat);
      cuda::moe_activation(to_gpu(h), to_gpu(ids), a, s);
      s.synchronize();
      // Rows of skipped slots stay poisoned on both sides; written rows agree to bf16 rounding.
      const auto got = test::raw_bits16(a), want = test::raw_bits16(ref);
      const auto gf = test::to_floats(a), wf = test::to_floats(ref);
      const auto idv = test::to_ints(ids);
      int64_t mismatches = 0;
      for (int64_t sl = 0; sl < n; ++sl)
        for (int i = 0; i < inter; ++i) {
          const size_t x = size_t(sl * inter + i);
          if (idv[size_t(sl)] < 0) {
            mismatches += got[x] != 0xFFFF;
          } else {
            mismatches += !(std::fabs(gf[x] - wf[x]) <= 1e-2 * std::fabs(wf[x]) + 1e-6);
          }
        }
      EXPECT_EQ(mismatches, 0);
    }
}

TEST(CudaMoeReduce, MatchesReference) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  enum Shared { none, ungated, gated };
  for (int hidden : {2048, 7168, 30})
    for (Shared sh : {none, ungated, gated})
      for (int64_t m : kTokenCounts) {
        SCOPED_TRACE(::testing::Message() << "H=" << hidden << " shared=" << int(sh) << " M=" << m);
        const int k = 8;
        Tensor o = test::random_tensor({m * k, int64_t(hidden)}, DType::f32, rng);
        Tensor ids = test::from_ints(random_group_ids(m, k, 64, false, rng), {m, k});
        // Rows of skipped slots hold NaN: the reduction must not read them.
        {
          const auto idv = test::to_ints(ids);
          float* p = o.data<float>();
          for (int64_t sl = 0; sl < m * k; ++sl)
            if (idv[size_t(sl)] < 0) std::fill(p + sl * hidden, p + (sl + 1) * hidden, NAN);
        }
        Tensor so, gate;
        if (sh != none) so = test::random_tensor({m, int64_t(hidden)}, DType::f32, rng);
        if (sh == gated) gate = test::random_tensor({m}, DType::f32, rng, -3.0f, 3.0f);
        Tensor ref = Tensor::empty({m, int64_t(hidden)}, DType::bf16);
        cpu::moe_reduce(o, ids, so, gate, ref, Stream());
        Tensor y = poisoned({m, int64_t(hidden)}, DType::bf16, Device::cuda(), test::kPoisonFloat);
        cuda::moe_reduce(to_gpu(o), to_gpu(ids), so.defined() ? to_gpu(so) : Tensor(),
                         gate.defined() ? to_gpu(gate) : Tensor(), y, s);
        s.synchronize();
        EXPECT_TRUE(test::allclose(test::to_floats(y), test::to_floats(ref), 1e-2, 1e-2));
      }
}

TEST(CudaMoeElementwise, BadInput) {
  MOELORA_REQUIRE_GPU();
  Stream s = Stream::create(Device::cuda());
  const Device d = Device::cuda();
  Tensor ids = Tensor::zeros({2, 2}, DType::i32, d);
  Tensor a = Tensor::empty({4, 8}, DType::bf16, d);
  test::expect_error([&] { cuda::moe_activation(Tensor::zeros({4, 15}, DType::f32, d), ids, a, s); }, "h");
  test::expect_error([&] { cuda::moe_activation(Tensor::zeros({4, 16}, DType::bf16, d), ids, a, s); }, "h");
  Tensor y = Tensor::empty({2, 8}, DType::bf16, d);
  test::expect_error([&] { cuda::moe_reduce(Tensor::zeros({3, 8}, DType::f32, d), ids, Tensor(), Tensor(), y, s); }, "o");
  test::expect_error(
      [&] { cuda::moe_reduce(Tensor::zeros({4, 8}, DType::f32, d), ids, Tensor::zeros({2, 7}, DType::f32, d), Tensor(), y, s); },
      "shared_o");
}

}  // namespace
}  // namespace moelora
