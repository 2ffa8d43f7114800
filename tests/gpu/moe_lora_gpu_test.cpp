// CUDA MoE-LoRA ops (group ids, virtual-expert alignment, shrink, expand) and the CUDA hook
// path against the CPU reference, with mixed base/adapter tokens, ranks 8/16/64 in one batch,
// separate and fused gate_up adapters.
#include <cmath>
#include <cstring>
#include <vector>

#include "gpu_op_test_util.h"
#include "kernels/cpu/moe_ops.h"
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/core/graph.h"
#include "moelora/lora/moe_lora.h"

namespace moelora {
namespace {

using test::poisoned;
using test::to_gpu;

constexpr int kSlots = 4, kRmax = 64;

MoeShape lora_shape() {
  MoeShape s;
  s.name = "lora-test";
  s.hidden = 512, s.inter = 256, s.num_experts = 32, s.top_k = 4;
  return s;
}

Tensor rnd(const Shape& shape, std::mt19937_64& rng, float a) {
  return test::random_tensor(shape, DType::f32, rng, -a, a);
}

// Slot 0: separate gate r8 / up r16, down r8. Slot 1: fused gate_up r16, down r64.
// Slot 2: separate gate r64 / up r64 (shrink rank 128), no down. Slot 3: gate only r8, down r16.
std::vector<MoeLoraWeights> make_adapters(const MoeShape& s, std::mt19937_64& rng) {
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  const float a = 1.0f, b = 0.5f;
  std::vector<MoeLoraWeights> w(kSlots);
  w[0].gate_a = rnd({E, 8, H}, rng, a), w[0].gate_b = rnd({E, I, 8}, rng, b);
  w[0].up_a = rnd({E, 16, H}, rng, a), w[0].up_b = rnd({E, I, 16}, rng, b);
  w[0].down_a = rnd({E, 8, I}, rng, a), w[0].down_b = rnd({E, H, 8}, rng, b);
  w[0].gate_scale = 2.0f, w[0].up_scale = 0.5f, w[0].down_scale = lora_scaling(16, 8, true);
  w[1].gate_up_a = rnd({E, 16, H}, rng, a), w[1].gate_up_b = rnd({E, 2 * I, 16}, rng, b);
  w[1].down_a = rnd({E, 64, I}, rng, a), w[1].down_b = rnd({E, H, 64}, rng, b);
  w[1].gate_up_scale = 1.5f, w[1].down_scale = lora_scaling(32, 64, false);
  w[2].gate_a = rnd({E, 64, H}, rng, a), w[2].gate_b = rnd({E, I, 64}, rng, b);
  w[2].up_a = rnd({E, 64, H}, rng, a), w[2].up_b = rnd({E, I, 64}, rng, b);
  w[3].gate_a = rnd({E, 8, H}, rng, a), w[3].gate_b = rnd({E, I, 8}, rng, b);
  w[3].down_a = rnd({E, 16, I}, rng, a), w[3].down_b = rnd({E, H, 16}, rng, b);
  return w;
}

struct Pools {
  MoeLoraPool cpu, gpu;
  Pools(const MoeShape& s, std::mt19937_64& rng)
      : cpu(s, kSlots, kRmax, Device::cpu()), gpu(s, kSlots, kRmax, Device::cuda()) {
    const auto adapters = make_adapters(s, rng);
    for (int i = 0; i < kSlots; ++i) {
      cpu.load(i, adapters[size_t(i)]);
      gpu.load(i, adapters[size_t(i)]);
    }
  }
};

// ids [M, k]: distinct experts per token, ~1/8 of them -1.
Tensor random_ids(int64_t m, const MoeShape& s, std::mt19937_64& rng) {
  std::vector<int32_t> ids(size_t(m * s.top_k)), perm(size_t(s.num_experts));
  for (int e = 0; e < s.num_experts; ++e) perm[size_t(e)] = e;
  for (int64_t t = 0; t < m; ++t) {
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < s.top_k; ++j)
      ids[size_t(t * s.top_k + j)] = rng() % 8 == 0 ? -1 : perm[size_t(j)];
  }
  return test::from_ints(ids, {m, s.top_k});
}

// token_slot [M] in [-1, kSlots): base tokens mixed with every adapter.
Tensor random_token_slots(int64_t m, std::mt19937_64& rng) {
  return test::random_ints({m}, rng, -1, kSlots - 1);
}

// Compares entries written by the reference (non-NaN there) and requires the GPU to leave
// the others poisoned.
void expect_same_written(const Tensor& gpu, const Tensor& ref, double rel_tol) {
  const auto g = test::to_floats(gpu), r = test::to_floats(ref);
  std::vector<float> gw, rw;
  int64_t stray = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    if (std::isnan(r[i])) {
      stray += !std::isnan(g[i]);
    } else {
      gw.push_back(g[i]);
      rw.push_back(r[i]);
    }
  }
  EXPECT_EQ(stray, 0) << "entries written that the contract leaves untouched";
  EXPECT_TRUE(test::allclose(gw, rw, rel_tol, 1e-5));
}

constexpr int64_t kTokenCounts[] = {1, 7, 64, 257, 1024};

TEST(CudaMoeLora, OpsMatchReference) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  const MoeShape sh = lora_shape();
  Pools pools(sh, rng);
  Stream s = Stream::create(Device::cuda());
  const int k = sh.top_k, E = sh.num_experts;
  const int64_t H = sh.hidden, I = sh.inter, G = int64_t(kSlots) * E;
  for (int64_t m : kTokenCounts)
    for (int bm : {cuda::moe_lora_block_m(m, k), 1, 16}) {
      SCOPED_TRACE(::testing::Message() << "M=" << m << " block_m=" << bm);
      const int64_t n = m * k;
      Tensor ids = random_ids(m, sh, rng), ts = random_token_slots(m, rng);
      const Tensor dids = to_gpu(ids), dts = to_gpu(ts);

      // Virtual-expert ids, and the plan over them (separate ops and the fused op).
      Tensor vids_ref = Tensor::empty({m, k}, DType::i32);
      cpu::moe_lora_group_ids(ids, ts, E, vids_ref, Stream());
      Tensor vids = poisoned({m, k}, DType::i32, Device::cuda(), test::kPoisonInt);
      cuda::moe_lora_group_ids(dids, dts, E, vids, s);
      MoeAlignment vplan = test::poisoned_plan(n, int(G), bm, Device::cuda());
      cuda::moe_align(vids, vplan, s);
      MoeAlignment fused = test::poisoned_plan(n, int(G), bm, Device::cuda());
      cuda::moe_lora_align(dids, dts, E, fused, s);
      s.synchronize();
      ASSERT_EQ(test::to_ints(vids), test::to_ints(vids_ref));
      const int32_t total = test::to_ints(vplan.num_padded)[0];
      ASSERT_EQ(test::to_ints(fused.num_padded)[0], total);
      {
        const auto a = test::to_ints(vplan.sorted_slots), b = test::to_ints(fused.sorted_slots);
        EXPECT_TRUE(std::equal(a.begin(), a.begin() + total, b.begin()));
        EXPECT_EQ(test::to_ints(vplan.group_offsets), test::to_ints(fused.group_offsets));
      }
      const MoeAlignment hplan = test::host_copy(vplan);

      for (LoraSeam seam : {LoraSeam::gate_up, LoraSeam::down}) {
        const bool gu = seam == LoraSeam::gate_up;
        SCOPED_TRACE(gu ? "gate_up" : "down");
        const Tensor& A_cpu = gu ? pools.cpu.a13() : pools.cpu.a2();
        const Tensor& A_gpu = gu ? pools.gpu.a13() : pools.gpu.a2();
        const Tensor& B_cpu = gu ? pools.cpu.b13() : pools.cpu.b2();
        const Tensor& B_gpu = gu ? pools.gpu.b13() : pools.gpu.b2();
        const int64_t R = A_cpu.size(2), N = B_cpu.size(2);
        Tensor in = gu ? test::random_tensor({m, H}, DType::bf16, rng)
                       : test::random_tensor({n, I}, DType::bf16, rng);
        const int rows_div = gu ? k : 1;

        Tensor u_ref = poisoned({n, R}, DType::f32, Device::cpu(), test::kPoisonFloat);
        cpu::moe_lora_shrink(in, rows_div, hplan, A_cpu, pools.cpu.slot_meta(), seam, u_ref,
                             Stream());
        Tensor u = poisoned({n, R}, DType::f32, Device::cuda(), test::kPoisonFloat);
        const Tensor din = to_gpu(in);
        cuda::moe_lora_shrink(din, rows_div, vplan, A_gpu, pools.gpu.slot_meta(), seam, u, s);
        s.synchronize();
        expect_same_written(u, u_ref, 1e-4);

        // Expand from the reference u (unwritten columns stay NaN: they must not be read).
        Tensor out0 = test::random_tensor({n, N}, DType::f32, rng);
        Tensor sw = gu ? Tensor() : test::random_tensor({n}, DType::f32, rng, 0.0f, 1.0f);
        Tensor out_ref = out0.to(Device::cpu());
        Tensor h_u = u_ref.to(Device::cpu());
        cpu::moe_lora_expand(h_u, hplan, B_cpu, pools.cpu.slot_meta(), seam, sw, out_ref,
                             Stream());
        Tensor out = to_gpu(out0), du = to_gpu(h_u), dsw = sw.defined() ? to_gpu(sw) : Tensor();
        cuda::moe_lora_expand(du, vplan, B_gpu, pools.gpu.slot_meta(), seam, dsw, out, s);
        s.synchronize();
        EXPECT_TRUE(test::allclose(test::to_floats(out), test::to_floats(out_ref), 1e-5, 1e-5));

        // K-split shrink + summing expand (the hook path) gives the same result.
        for (int splits : {2, 3, 8}) {
          Tensor parts = poisoned({splits * n, R}, DType::f32, Device::cuda(), test::kPoisonFloat);
          cuda::moe_lora_shrink_split(din, rows_div, vplan, A_gpu, pools.gpu.slot_meta(), seam,
                                      splits, parts, s);
          Tensor out2 = to_gpu(out0);
          cuda::moe_lora_expand_split(parts, splits, vplan, B_gpu, pools.gpu.slot_meta(), seam,
                                      dsw, out2, s);
          s.synchronize();
          EXPECT_TRUE(test::allclose(test::to_floats(out2), test::to_floats(out_ref), 1e-4, 1e-4))
              << "splits=" << splits;
        }
      }
    }
}

// `early_seams`: call before_gate_up / before_down as the runner does (shrinks, and up to the
// delta threshold the expands, on the side stream); otherwise the after_* seams issue them.
// `graph`: the GPU seams are captured into a CUDA graph and replayed once (the side stream's
// fork/join become graph edges; an expand must still see the side stream's complete u).
void hooks_match_reference(bool early_seams, const MoeLoraHooksOptions& options = {},
                           bool graph = false) {
  std::mt19937_64 rng(test::fresh_seed());
  const MoeShape sh = lora_shape();
  Pools pools(sh, rng);
  Stream s = Stream::create(Device::cuda());
  const int64_t max_tokens = 1024;
  auto hooks_cpu = MoeLoraHooks::create(pools.cpu, max_tokens);
  auto hooks_gpu = MoeLoraHooks::create(pools.gpu, max_tokens, options);
  const int k = sh.top_k;
  const int64_t H = sh.hidden, I = sh.inter;
  for (int64_t m : kTokenCounts) {
    SCOPED_TRACE(::testing::Message() << "M=" << m);
    const int64_t n = m * k;
    Tensor ts = random_token_slots(m, rng);
    TopK topk{random_ids(m, sh, rng), test::random_tensor({m, k}, DType::f32, rng, 0.0f, 1.0f)};
    TopK dtopk{to_gpu(topk.ids), to_gpu(topk.weights)};
    Tensor x = test::random_tensor({m, H}, DType::bf16, rng);
    Tensor a = test::random_tensor({n, I}, DType::bf16, rng);
    Tensor h = test::random_tensor({n, 2 * I}, DType::f32, rng);
    Tensor o = test::random_tensor({n, H}, DType::f32, rng);
    // Device copies live until after the sync (the ops run asynchronously).
    Tensor dh = to_gpu(h), dout = to_gpu(o), dts = to_gpu(ts), dx = to_gpu(x), da = to_gpu(a);

    hooks_cpu->bind(LoraBatch{ts});
    hooks_cpu->after_route(topk, m, Stream());
    hooks_cpu->after_gate_up(x, topk, h, Stream());
    hooks_cpu->after_down(a, topk, o, Stream());
    hooks_gpu->bind(LoraBatch{dts});
    auto seams = [&] {
      hooks_gpu->after_route(dtopk, m, s);
      if (early_seams) hooks_gpu->before_gate_up(dx, dtopk, s);
      hooks_gpu->after_gate_up(dx, dtopk, dh, s);
      if (early_seams) hooks_gpu->before_down(da, dtopk, s);
      hooks_gpu->after_down(da, dtopk, dout, s);
    };
    CudaGraph g;  // outlives the replay
    if (graph) {
      s.synchronize();  // the uploads are done before the capture starts
      g = CudaGraph::capture(s, seams);
      g.replay(s);
    } else {
      seams();
    }
    s.synchronize();
    EXPECT_TRUE(test::allclose(test::to_floats(dh), test::to_floats(h), 1e-4, 1e-4));
    EXPECT_TRUE(test::allclose(test::to_floats(dout), test::to_floats(o), 1e-4, 1e-4));
  }
}

TEST(CudaMoeLora, HooksMatchReference) {
  MOELORA_REQUIRE_GPU();
  hooks_match_reference(false);
}

TEST(CudaMoeLora, HooksWithEarlySeamsMatchReference) {
  MOELORA_REQUIRE_GPU();
  hooks_match_reference(true);
}

TEST(CudaMoeLora, HooksInGraphMatchReference) {
  MOELORA_REQUIRE_GPU();
  hooks_match_reference(true, {}, /*graph=*/true);
}

// The delta variant (off by default), switched on for every batch size by the option.
TEST(CudaMoeLora, HooksDeltaVariantMatchReference) {
  MOELORA_REQUIRE_GPU();
  MoeLoraHooksOptions options;
  options.delta_max_slots = int64_t(1) << 30;
  hooks_match_reference(true, options);
  hooks_match_reference(false, options);
}

// The small-batch path's ops: the delta (written for every aligned slot, nothing else) and
// its add (only rows of slots with an adapter change; base rows keep their bits).
TEST(CudaMoeLora, DeltaOpsMatchReference) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  const MoeShape sh = lora_shape();
  Pools pools(sh, rng);
  Stream s = Stream::create(Device::cuda());
  const int k = sh.top_k, E = sh.num_experts;
  const int64_t H = sh.hidden, I = sh.inter, G = int64_t(kSlots) * E;
  ASSERT_TRUE(cuda::moe_lora_delta_supported(H, I, kRmax));
  for (int64_t m : {int64_t(1), int64_t(7), int64_t(64)}) {
    SCOPED_TRACE(::testing::Message() << "M=" << m);
    const int64_t n = m * k;
    Tensor ids = random_ids(m, sh, rng), ts = random_token_slots(m, rng);
    const Tensor dids = to_gpu(ids), dts = to_gpu(ts);
    MoeAlignment vplan = test::poisoned_plan(n, int(G), cuda::moe_lora_block_m(m, k), Device::cuda());
    cuda::moe_lora_align(dids, dts, E, vplan, s);
    s.synchronize();
    const MoeAlignment hplan = test::host_copy(vplan);
    const auto hids = test::to_ints(ids), hts = test::to_ints(ts);
    for (LoraSeam seam : {LoraSeam::gate_up, LoraSeam::down}) {
      const bool gu = seam == LoraSeam::gate_up;
      SCOPED_TRACE(gu ? "gate_up" : "down");
      const Tensor& A_cpu = gu ? pools.cpu.a13() : pools.cpu.a2();
      const Tensor& B_cpu = gu ? pools.cpu.b13() : pools.cpu.b2();
      const int64_t R = A_cpu.size(2), N = B_cpu.size(2);
      Tensor in = gu ? test::random_tensor({m, H}, DType::bf16, rng)
                     : test::random_tensor({n, I}, DType::bf16, rng);
      const int rows_div = gu ? k : 1;
      Tensor u_ref = poisoned({n, R}, DType::f32, Device::cpu(), test::kPoisonFloat);
      cpu::moe_lora_shrink(in, rows_div, hplan, A_cpu, pools.cpu.slot_meta(), seam, u_ref, Stream());
      Tensor out0 = test::random_tensor({n, N}, DType::f32, rng);
      Tensor sw = gu ? Tensor() : test::random_tensor({n}, DType::f32, rng, 0.0f, 1.0f);
      Tensor out_ref = out0.to(Device::cpu());
      cpu::moe_lora_expand(u_ref, hplan, B_cpu, pools.cpu.slot_meta(), seam, sw, out_ref, Stream());

      const int splits = cuda::moe_lora_shrink_splits(n);
      Tensor parts = poisoned({splits * n, R}, DType::f32, Device::cuda(), test::kPoisonFloat);
      const Tensor din = to_gpu(in), dsw = sw.defined() ? to_gpu(sw) : Tensor();
      cuda::moe_lora_shrink_split(din, rows_div, vplan, gu ? pools.gpu.a13() : pools.gpu.a2(),
                                  pools.gpu.slot_meta(), seam, splits, parts, s);
      Tensor d = poisoned({n, N}, DType::f32, Device::cuda(), test::kPoisonFloat);
      cuda::moe_lora_expand_delta_split(parts, splits, vplan, gu ? pools.gpu.b13() : pools.gpu.b2(),
                                        pools.gpu.slot_meta(), seam, dsw, d, s);
      Tensor out = to_gpu(out0);
      cuda::moe_lora_add_delta(d, dids, dts, kSlots, E, out, s);
      s.synchronize();
      // Rows of aligned slots are written, all others left poisoned.
      const auto hd = test::to_floats(d);
      int64_t bad_rows = 0;
      for (int64_t r = 0; r < n; ++r) {
        const bool aligned = hts[size_t(r / k)] >= 0 && hids[size_t(r)] >= 0;
        bad_rows += aligned == std::isnan(hd[size_t(r * N)]);
      }
      EXPECT_EQ(bad_rows, 0) << "delta rows written for exactly the aligned slots";
      const auto go = test::to_floats(out), ro = test::to_floats(out_ref), o0 = test::to_floats(out0);
      EXPECT_TRUE(test::allclose(go, ro, 1e-4, 1e-4));
      int64_t base_changed = 0;
      for (int64_t r = 0; r < n; ++r)
        if (hts[size_t(r / k)] < 0 || hids[size_t(r)] < 0)
          for (int64_t c = 0; c < N; ++c)
            base_changed += std::memcmp(&go[size_t(r * N + c)], &o0[size_t(r * N + c)], 4) != 0;
      EXPECT_EQ(base_changed, 0) << "base rows must keep their bits";
    }
  }
}

TEST(CudaMoeLora, BadInput) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  const MoeShape sh = lora_shape();
  MoeLoraPool pool(sh, kSlots, kRmax, Device::cuda());
  Stream s = Stream::create(Device::cuda());
  const Device d = Device::cuda();
  const int64_t m = 4, n = m * sh.top_k;
  MoeAlignment vplan = MoeAlignment::allocate(n, kSlots * sh.num_experts, kMaxBlockM, d);
  vplan.block_m = 8;
  Tensor u = Tensor::empty({n, 2 * kRmax}, DType::f32, d);
  // Input width differs from A's K.
  test::expect_error(
      [&] {
        cuda::moe_lora_shrink(Tensor::zeros({m, 256}, DType::bf16, d), sh.top_k, vplan, pool.a13(),
                              pool.slot_meta(), LoraSeam::gate_up, u, s);
      },
      "A");
  // A plan for a different number of groups.
  MoeAlignment wrong = MoeAlignment::allocate(n, sh.num_experts, kMaxBlockM, d);
  wrong.block_m = 8;
  test::expect_error(
      [&] {
        cuda::moe_lora_shrink(Tensor::zeros({m, sh.hidden}, DType::bf16, d), sh.top_k, wrong,
                              pool.a13(), pool.slot_meta(), LoraSeam::gate_up, u, s);
      },
      "num_groups");
  // Wrong meta shape / dtype, output of the wrong width.
  test::expect_error(
      [&] {
        Tensor out = Tensor::zeros({n, 2 * sh.inter}, DType::f32, d);
        cuda::moe_lora_expand(u, vplan, pool.b13(), Tensor::zeros({kSlots, 5}, DType::i32, d),
                              LoraSeam::gate_up, Tensor(), out, s);
      },
      "meta");
  test::expect_error(
      [&] {
        Tensor out = Tensor::zeros({n, 2 * sh.inter + 2}, DType::f32, d);
        cuda::moe_lora_expand(u, vplan, pool.b13(), pool.slot_meta(), LoraSeam::gate_up,
                              Tensor(), out, s);
      },
      "out");
  test::expect_error(
      [&] {
        Tensor vids = Tensor::empty({m, sh.top_k}, DType::i32, d);
        cuda::moe_lora_group_ids(Tensor::zeros({m, sh.top_k}, DType::i32, d),
                                 Tensor::zeros({m + 1}, DType::i32, d), sh.num_experts, vids, s);
      },
      "token_slot");
  // Out-of-range slots and experts on the device are skipped (no adapter), not crashes.
  {
    Tensor ids = test::from_ints(std::vector<int32_t>(size_t(n), 1000), {m, sh.top_k});
    Tensor ts = test::from_ints({kSlots + 3, -5, 0, 1}, {m});
    cuda::moe_lora_align(to_gpu(ids), to_gpu(ts), sh.num_experts, vplan, s);
    s.synchronize();
    EXPECT_EQ(test::to_ints(vplan.num_padded)[0], 0);
  }
}

// The direct variant's op (cuda::moe_lora_direct) names what is wrong; the hooks refuse a
// forced direct variant the pool cannot run and fall back when asked softly.
TEST(CudaMoeLora, DirectBadInput) {
  MOELORA_REQUIRE_GPU();
  const MoeShape sh = lora_shape();
  MoeLoraPool pool(sh, kSlots, kRmax, Device::cuda());
  Stream s = Stream::create(Device::cuda());
  const Device d = Device::cuda();
  const int64_t m = 4, n = m * sh.top_k;
  const Tensor ids = Tensor::zeros({m, sh.top_k}, DType::i32, d);
  const Tensor ts = Tensor::zeros({m}, DType::i32, d);
  const Tensor x = Tensor::zeros({m, sh.hidden}, DType::bf16, d);
  Tensor d13 = Tensor::empty({n, 2 * sh.inter}, DType::f32, d);
  auto gate_up = [&](const Tensor& in, int rows_div, const Tensor& A, Tensor& out, int cluster) {
    cuda::moe_lora_direct(in, rows_div, ids, ts, A, pool.b13(), pool.slot_meta(), LoraSeam::gate_up,
                          Tensor(), out, cluster, 64, s);
  };
  gate_up(x, sh.top_k, pool.a13(), d13, 4);  // fine
  s.synchronize();
  test::expect_error([&] { gate_up(x, 1, pool.a13(), d13, 4); }, "rows_div must be");
  test::expect_error([&] { gate_up(x, sh.top_k, pool.a2(), d13, 4); }, "A");
  test::expect_error([&] { gate_up(x, sh.top_k, pool.a13(), d13, 3); }, "cluster_size");
  Tensor narrow = Tensor::empty({n, 2 * sh.inter - 2}, DType::f32, d);
  test::expect_error([&] { gate_up(x, sh.top_k, pool.a13(), narrow, 4); }, "moe_lora_direct d");
  Tensor a = Tensor::zeros({n, sh.inter}, DType::bf16, d);
  Tensor d2 = Tensor::empty({n, sh.hidden}, DType::f32, d);
  const Tensor short_weights = Tensor::zeros({n - 1}, DType::f32, d);
  test::expect_error(
      [&] {
        cuda::moe_lora_direct(a, 1, ids, ts, pool.a2(), pool.b2(), pool.slot_meta(), LoraSeam::down,
                              short_weights, d2, 4, 64, s);
      },
      "slot_weights");
  // A hidden size the kernel cannot take (not a multiple of 8): an error when forced, the
  // overlap variant when asked softly.
  MoeShape odd = sh;
  odd.hidden = 260;
  MoeLoraPool odd_pool(odd, kSlots, kRmax, d);
  MoeLoraHooksOptions o;
  o.direct_max_tokens = 4;
  test::expect_error([&] { MoeLoraHooks::create(odd_pool, 4, o); }, "multiples of 8");
  o.direct_strict = false;
  o.overlap_max_tokens = 4;
  auto hooks = MoeLoraHooks::create(odd_pool, 4, o);
  EXPECT_TRUE(hooks->fuses_activation(4));
}

}  // namespace
}  // namespace moelora
