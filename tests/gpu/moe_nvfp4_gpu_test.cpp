// cuda_nvfp4: the NVFP4 expert GEMM ops against the CPU reference GEMMs run on the
// dequantized weights (fresh random inputs, NaN-poisoned outputs, M = 1 .. 1024, per-matrix
// and per-row global scales, K and N that need padding), the whole layer against the
// `reference` backend (with and without mixed-adapter LoRA, with a shared expert), and
// timings at the qwen3-30b-a3b shape (disabled; run with --gtest_also_run_disabled_tests).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "gpu_op_test_util.h"
#include "kernels/cpu/moe_ops.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_nvfp4_ops.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"
#include "moelora/quant/experts.h"

namespace moelora {
namespace {

using test::poisoned;
using test::to_gpu;

// w13 from separately quantized gate and up halves (their weight_scale_2 differ: the per-row
// global scale) or, with `per_group`, through quantize_experts (one scale per expert).
ExpertMatrices make_w13(int64_t E, int64_t I, int64_t H, bool per_group, std::mt19937_64& rng) {
  const float a = 2.0f / std::sqrt(float(H));
  const Tensor w = test::random_tensor({E, 2 * I, H}, DType::f32, rng, -a, a);
  if (per_group) {
    quant::QuantizeOptions opt;
    opt.format = WeightFormat::nvfp4;
    opt.group_size = 16;
    return quant::quantize_experts(w, opt);
  }
  std::vector<std::vector<quant::Nvfp4Tensors>> parts;
  for (int64_t e = 0; e < E; ++e) {
    const Tensor we = w.narrow(0, e, 1).view({2 * I, H});
    // Up rows at a different magnitude so the two weight_scale_2 surely differ.
    Tensor up = Tensor::empty({I, H}, DType::f32);
    for (int64_t i = 0; i < I * H; ++i) up.data<float>()[i] = 3.0f * we.data<float>()[I * H + i];
    parts.push_back({quant::quantize_nvfp4(we.narrow(0, 0, I)), quant::quantize_nvfp4(up)});
  }
  return quant::pack_nvfp4_experts(parts, "w13");
}

ExpertMatrices make_w2(int64_t E, int64_t H, int64_t I, std::mt19937_64& rng) {
  const float a = 2.0f / std::sqrt(float(I));
  quant::QuantizeOptions opt;
  opt.format = WeightFormat::nvfp4;
  opt.group_size = 16;
  return quant::quantize_experts(test::random_tensor({E, H, I}, DType::f32, rng, -a, a), opt);
}

// ids [M, k]: distinct experts per token, ~1/8 of them -1.
Tensor random_ids(int64_t m, int k, int E, std::mt19937_64& rng) {
  std::vector<int32_t> ids(static_cast<size_t>(m * k)), perm(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) perm[size_t(e)] = e;
  for (int64_t t = 0; t < m; ++t) {
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < k; ++j) ids[size_t(t * k + j)] = rng() % 8 == 0 ? -1 : perm[size_t(j)];
  }
  return test::from_ints(ids, {m, k});
}

MoeAlignment device_plan(const MoeAlignment& h) {
  MoeAlignment d = h;
  d.sorted_slots = to_gpu(h.sorted_slots);
  d.block_group = to_gpu(h.block_group);
  d.num_padded = to_gpu(h.num_padded);
  d.group_offsets = to_gpu(h.group_offsets);
  return d;
}

// Entries the reference wrote (non-NaN there) compared; the GPU must leave the rest poisoned.
void expect_same_written(const Tensor& gpu, const Tensor& ref, double tol) {
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
  EXPECT_TRUE(test::allclose(gw, rw, tol, tol));
}

struct OpShape {
  int64_t E, H, I;
  int k;
};

TEST(CudaNvfp4, OpsMatchReference) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  // 272 = 17 x 16 (K padded to 320), I = 144 (N = 288: 18 row tiles, 144 / 16 fused).
  for (const OpShape sh : {OpShape{16, 512, 256, 4}, OpShape{8, 272, 144, 2}}) {
    for (bool per_group : {false, true}) {
      const ExpertMatrices w13 = make_w13(sh.E, sh.I, sh.H, per_group, rng);
      const ExpertMatrices w2 = make_w2(sh.E, sh.H, sh.I, rng);
      ASSERT_EQ(w13.global_scale.dim(), per_group ? 1 : 2);
      const Tensor w13_f = quant::dequantize_experts(w13), w2_f = quant::dequantize_experts(w2);
      const ExpertMatrices d13 = w13.to(Device::cuda()), d2 = w2.to(Device::cuda());
      MoeShape ms;
      ms.hidden = int(sh.H), ms.inter = int(sh.I), ms.num_experts = int(sh.E), ms.top_k = sh.k;
      for (int64_t m : {1, 7, 64, 257, 1024}) {
        SCOPED_TRACE(::testing::Message() << "H=" << sh.H << " per_group=" << per_group
                                          << " M=" << m);
        const int64_t n = m * sh.k;
        const Tensor ids = random_ids(m, sh.k, int(sh.E), rng);
        MoeAlignment hplan = MoeAlignment::allocate(n, int(sh.E), kMaxBlockM, Device::cpu());
        hplan.block_m = cuda::moe_block_m(m, ms);
        cpu::moe_align(ids, hplan, Stream());
        const MoeAlignment dplan = device_plan(hplan);
        const Tensor x = test::random_tensor({m, sh.H}, DType::bf16, rng);
        const Tensor a = test::random_tensor({n, sh.I}, DType::bf16, rng);
        const Tensor sw = test::random_tensor({n}, DType::f32, rng, 0.0f, 1.0f);
        const Tensor dx = to_gpu(x), da = to_gpu(a), dsw = to_gpu(sw), dids = to_gpu(ids);

        Tensor h_ref = poisoned({n, 2 * sh.I}, DType::f32, Device::cpu(), test::kPoisonFloat);
        cpu::moe_gemm1(x, sh.k, hplan, w13_f, h_ref, Stream());
        Tensor dh = poisoned({n, 2 * sh.I}, DType::f32, Device::cuda(), test::kPoisonFloat);
        cuda::moe_gemm1_nvfp4(dx, sh.k, dplan, d13, dh, s);
        // Fused activation: bit-identical to gemm1 + moe_activation.
        Tensor act = poisoned({n, sh.I}, DType::bf16, Device::cuda(), test::kPoisonFloat);
        Tensor act_fused = poisoned({n, sh.I}, DType::bf16, Device::cuda(), test::kPoisonFloat);
        cuda::moe_activation(dh, dids, act, s);
        cuda::moe_gemm1_activation_nvfp4(dx, sh.k, dplan, d13, act_fused, s);

        Tensor o_ref = poisoned({n, sh.H}, DType::f32, Device::cpu(), test::kPoisonFloat);
        cpu::moe_gemm2(a, hplan, w2_f, sw, o_ref, Stream());
        Tensor dout = poisoned({n, sh.H}, DType::f32, Device::cuda(), test::kPoisonFloat);
        cuda::moe_gemm2_nvfp4(da, dplan, d2, dsw, dout, s);
        s.synchronize();
        expect_same_written(dh, h_ref, 2e-3);
        expect_same_written(dout, o_ref, 2e-3);
        const auto b0 = test::raw_bits16(act), b1 = test::raw_bits16(act_fused);
        const auto idv = test::to_ints(ids);
        int64_t diff = 0;
        for (int64_t r = 0; r < n; ++r)
          if (idv[size_t(r)] >= 0)
            for (int64_t c = 0; c < sh.I; ++c)
              diff += b0[size_t(r * sh.I + c)] != b1[size_t(r * sh.I + c)];
        EXPECT_EQ(diff, 0) << "fused activation differs from gemm1 + moe_activation";
      }
    }
  }
}


// Every tile (rows 32/64/128) at every token width (block_m 8..128) for gemm1, fused gemm1
// and gemm2 against the reference on one routing.
TEST(CudaNvfp4, EveryTileMatchesReference) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  // K long enough for the ring to wrap (main-loop refills) at every stage width, and full
  // blocks of 64 and 128 tokens (M k / E = 150 slots per expert).
  const int64_t E = 8, H = 1024, I = 512, m = 300;
  const int k = 4;
  const ExpertMatrices w13 = make_w13(E, I, H, false, rng), w2 = make_w2(E, H, I, rng);
  const Tensor w13_f = quant::dequantize_experts(w13), w2_f = quant::dequantize_experts(w2);
  const ExpertMatrices d13 = w13.to(Device::cuda()), d2 = w2.to(Device::cuda());
  const int64_t n = m * k;
  const Tensor ids = random_ids(m, k, int(E), rng);
  const Tensor x = test::random_tensor({m, H}, DType::bf16, rng);
  const Tensor a = test::random_tensor({n, I}, DType::bf16, rng);
  const Tensor dx = to_gpu(x), da = to_gpu(a), dids = to_gpu(ids);
  for (int bm : {8, 16, 32, 64, 128}) {
    MoeAlignment hplan = MoeAlignment::allocate(n, int(E), kMaxBlockM, Device::cpu());
    hplan.block_m = bm;
    cpu::moe_align(ids, hplan, Stream());
    const MoeAlignment dplan = device_plan(hplan);
    Tensor h_ref = poisoned({n, 2 * I}, DType::f32, Device::cpu(), test::kPoisonFloat);
    cpu::moe_gemm1(x, k, hplan, w13_f, h_ref, Stream());
    Tensor o_ref = poisoned({n, H}, DType::f32, Device::cpu(), test::kPoisonFloat);
    cpu::moe_gemm2(a, hplan, w2_f, Tensor(), o_ref, Stream());
    for (int variant = 0; variant < 6; ++variant) {
      const int rows = 32 << (variant % 3);
      const bool split_k = variant >= 3;
      SCOPED_TRACE(::testing::Message() << "block_m=" << bm << " rows=" << rows
                                        << " split_k=" << split_k);
      cuda::MoeGemmConfig cfg;
      cfg.rows = rows;
      cfg.row_tiles_fastest = bm >= 32;
      cfg.split_k = split_k;
      Tensor dh = poisoned({n, 2 * I}, DType::f32, Device::cuda(), test::kPoisonFloat);
      cuda::moe_gemm1_nvfp4_tiled(dx, k, dplan, d13, dh, s, cfg, false);
      Tensor act = poisoned({n, I}, DType::bf16, Device::cuda(), test::kPoisonFloat);
      Tensor act_fused = poisoned({n, I}, DType::bf16, Device::cuda(), test::kPoisonFloat);
      cuda::moe_gemm1_nvfp4_tiled(dx, k, dplan, d13, act_fused, s, cfg, true);
      cuda::moe_activation(dh, dids, act, s);
      Tensor dout = poisoned({n, H}, DType::f32, Device::cuda(), test::kPoisonFloat);
      cuda::moe_gemm2_nvfp4_tiled(da, dplan, d2, Tensor(), dout, s, cfg);
      s.synchronize();
      expect_same_written(dh, h_ref, 2e-3);
      expect_same_written(dout, o_ref, 2e-3);
      EXPECT_EQ(test::raw_bits16(act), test::raw_bits16(act_fused));
    }
  }
}

// Two adapters: separate gate r8 / up r16 / down r8, and fused gate_up r16 / down r64.
void load_adapters(const MoeShape& s, std::mt19937_64& rng, MoeLoraPool& p0, MoeLoraPool& p1) {
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  auto r = [&](const Shape& sh) { return test::random_tensor(sh, DType::f32, rng, -0.5f, 0.5f); };
  MoeLoraWeights a, b;
  a.gate_a = r({E, 8, H}), a.gate_b = r({E, I, 8}), a.up_a = r({E, 16, H}), a.up_b = r({E, I, 16});
  a.down_a = r({E, 8, I}), a.down_b = r({E, H, 8});
  b.gate_up_a = r({E, 16, H}), b.gate_up_b = r({E, 2 * I, 16});
  b.down_a = r({E, 64, I}), b.down_b = r({E, H, 64});
  b.down_scale = lora_scaling(32, 64, true);
  for (MoeLoraPool* p : {&p0, &p1}) {
    p->load(0, a);
    p->load(1, b);
  }
}

TEST(CudaNvfp4, LayerMatchesReferenceRunner) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  MoeShape base;
  base.name = "small", base.hidden = 256, base.inter = 128, base.num_experts = 16, base.top_k = 4;
  MoeShape v3 = base;
  v3.name = "small-v3", v3.num_experts = 32, v3.shared_inter = 128;
  struct Case {
    MoeShape shape;
    RouterConfig router;
  };
  for (const Case& c : {Case{base, RouterConfig::softmax_topk(16, 4, true)},
                        Case{v3, RouterConfig::deepseek_v3(32, 4, 4, 2, 2.5f)}}) {
    const int64_t E = c.shape.num_experts, H = c.shape.hidden, I = c.shape.inter;
    const int64_t max_tokens = 1024;
    MoeRunnerConfig rc;
    rc.shape = c.shape, rc.router = c.router, rc.max_tokens = max_tokens;
    rc.format = WeightFormat::nvfp4;
    rc.device = Device::cpu();
    MoeRunner ref(rc);
    rc.device = Device::cuda();
    MoeRunner gpu(rc);
    EXPECT_EQ(gpu.backend().name(), "cuda_nvfp4");
    MoeWeights w;
    w.format = WeightFormat::nvfp4;
    w.w13 = make_w13(E, I, H, false, rng);
    w.w2 = make_w2(E, H, I, rng);
    if (c.router.use_correction_bias)
      w.correction_bias = test::random_tensor({E}, DType::f32, rng, -0.1f, 0.1f);
    if (c.shape.shared_inter > 0) {
      w.shared_w13 = make_w13(1, c.shape.shared_inter, H, true, rng);
      w.shared_w2 = make_w2(1, H, c.shape.shared_inter, rng);
    }
    MoeWeights dw = w;
    for (ExpertMatrices* m : {&dw.w13, &dw.w2, &dw.shared_w13, &dw.shared_w2})
      if (m->defined()) *m = m->to(Device::cuda());
    if (dw.correction_bias.defined()) dw.correction_bias = to_gpu(dw.correction_bias);
    for (bool lora : {false, true}) {
      MoeLoraPool pool_cpu(c.shape, 2, 64, Device::cpu()), pool_gpu(c.shape, 2, 64, Device::cuda());
      if (lora) load_adapters(c.shape, rng, pool_cpu, pool_gpu);
      auto hooks_cpu = MoeLoraHooks::create(pool_cpu, max_tokens);
      auto hooks_gpu = MoeLoraHooks::create(pool_gpu, max_tokens);
      for (int64_t m : {1, 7, 64, 257, 1024}) {
        if (m == 1024 && (lora || c.shape.shared_inter > 0)) continue;  // keep the CPU side fast
        SCOPED_TRACE(::testing::Message() << c.shape.name << " lora=" << lora << " M=" << m);
        const Tensor x = test::random_tensor({m, H}, DType::bf16, rng);
        const Tensor logits = test::random_tensor({m, E}, DType::f32, rng, -3.0f, 3.0f);
        const Tensor ts = test::random_ints({m}, rng, -1, 1);
        Tensor y_ref = Tensor::empty({m, H}, DType::bf16);
        if (lora) hooks_cpu->bind(LoraBatch{ts});
        ref.run(MoeInputs{x, logits, Tensor()}, w, lora ? hooks_cpu.get() : nullptr, y_ref,
                Stream());
        const Tensor dts = to_gpu(ts);
        Tensor y = poisoned({m, H}, DType::bf16, Device::cuda(), test::kPoisonFloat);
        if (lora) hooks_gpu->bind(LoraBatch{dts});
        gpu.run(MoeInputs{to_gpu(x), to_gpu(logits), Tensor()}, dw,
                lora ? hooks_gpu.get() : nullptr, y, s);
        s.synchronize();
        EXPECT_EQ(test::to_ints(gpu.last_topk().ids), test::to_ints(ref.last_topk().ids));
        EXPECT_TRUE(test::allclose(test::to_floats(y), test::to_floats(y_ref), 1e-2, 1e-2));
      }
    }
  }
}

TEST(CudaNvfp4, RefusesWhatItCannotRun) {
  MOELORA_REQUIRE_GPU();
  MoeProblem p;
  p.shape.hidden = 200, p.shape.inter = 128, p.shape.num_experts = 8, p.shape.top_k = 2;
  p.format = WeightFormat::nvfp4;
  p.device = Device::cuda();
  test::expect_error([&] { make_moe_backend("cuda_nvfp4", p); }, "multiple of 16");
}

// Median microseconds of one `body` call: `reps` calls captured in one graph, replayed.
double graph_us(const Stream& s, int reps, const std::function<void()>& body) {
  const double ms = test::graph_replay_median_ms(
      s, [&] { for (int i = 0; i < reps; ++i) body(); }, /*warmup=*/3, /*timed=*/15);
  return 1000.0 * ms / reps;
}

TEST(CudaNvfp4Perf, DISABLED_Gemms) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  const MoeShape sh = MoeShape::by_name("qwen3-30b-a3b");
  const Device d = Device::cuda();
  const int k = sh.top_k, E = sh.num_experts;
  const int64_t H = sh.hidden, I = sh.inter;
  const ExpertMatrices w13 = quant::random_experts(WeightFormat::nvfp4, E, 2 * I, H, 16, 0.05f, 1, d, s);
  const ExpertMatrices w2 = quant::random_experts(WeightFormat::nvfp4, E, H, I, 16, 0.05f, 2, d, s);
  constexpr double kBytesPerWeight = 0.5 + 1.0 / 16;  // e2m1 code + e4m3 scale per 16
  constexpr double kTbs = 3.0;                        // the team's H100 copy bandwidth
  std::printf("nvfp4 qwen3-30b-a3b, floor = touched experts' bytes / %.1f TB/s\n", kTbs);
  std::printf("%-5s %4s %7s | %8s %8s %5s | %8s %8s %5s | %8s %5s | %9s %9s\n", "M", "bm", "touched",
              "gemm1", "floor", "%", "gemm2", "floor", "%", "g1+act", "%", "layer", "lora16x1");
  for (int64_t m : {1, 4, 16, 64, 256}) {
    const int64_t n = m * k;
    Tensor logits = test::random_tensor({m, E}, DType::f32, rng, -3, 3).to(d);
    TopK topk{Tensor::empty({m, k}, DType::i32, d), Tensor::empty({m, k}, DType::f32, d)};
    MoeAlignment plan = MoeAlignment::allocate(n, E, kMaxBlockM, d);
    plan.block_m = cuda::moe_block_m(m, sh);
    cuda::moe_route(logits, Tensor(), sh.default_router(), topk, s);
    cuda::moe_align(topk.ids, plan, s);
    s.synchronize();
    std::set<int32_t> touched;
    for (int32_t id : test::to_ints(topk.ids)) touched.insert(id);
    const double D = double(touched.size());
    Tensor x = test::random_tensor({m, H}, DType::bf16, rng).to(d);
    Tensor h = Tensor::empty({n, 2 * I}, DType::f32, d);
    Tensor a = test::random_tensor({n, I}, DType::bf16, rng).to(d);
    Tensor o = Tensor::empty({n, H}, DType::f32, d);
    const Tensor sw = topk.weights.view({n});
    const double t1 = graph_us(s, 20, [&] { cuda::moe_gemm1_nvfp4(x, k, plan, w13, h, s); });
    const double t1a =
        graph_us(s, 20, [&] { cuda::moe_gemm1_activation_nvfp4(x, k, plan, w13, a, s); });
    const double t2 =
        graph_us(s, 20, [&] { cuda::moe_gemm2_nvfp4(a, plan, w2, sw, o, s); });
    const double f1 = D * 2 * I * H * kBytesPerWeight / (kTbs * 1e6);
    const double f2 = D * H * I * kBytesPerWeight / (kTbs * 1e6);

    // The whole layer (route .. reduce), without and with one r16 adapter on every token.
    MoeRunnerConfig rc;
    rc.shape = sh, rc.router = sh.default_router(), rc.device = d, rc.max_tokens = 256;
    rc.format = WeightFormat::nvfp4;
    MoeRunner runner(rc);
    MoeWeights w;
    w.format = WeightFormat::nvfp4;
    w.w13 = w13;
    w.w2 = w2;
    MoeLoraPool pool(sh, 1, 16, d);
    {
      Tensor meta = pool.slot_meta().narrow(0, 0, 1);
      const std::vector<int32_t> v = {32, 16, 0, 16, 16, 16};
      meta.copy_from(test::from_ints(v, {1, 6}));
    }
    auto hooks = MoeLoraHooks::create(pool, rc.max_tokens);
    Tensor ts = test::random_ints({m}, rng, 0, 0).to(d);
    hooks->bind(LoraBatch{ts});
    Tensor y = Tensor::empty({m, H}, DType::bf16, d);
    const MoeInputs in{x, logits, Tensor()};
    const double tl = graph_us(s, 8, [&] { runner.run(in, w, nullptr, y, s); });
    const double tlr = graph_us(s, 8, [&] { runner.run(in, w, hooks.get(), y, s); });
    std::printf("%-5ld %4d %7.0f | %8.2f %8.2f %5.1f | %8.2f %8.2f %5.1f | %8.2f %5.1f | %9.2f %9.2f\n",
                long(m), plan.block_m, D, t1, f1, 100 * f1 / t1, t2, f2, 100 * f2 / t2, t1a,
                100 * f1 / t1a, tl, tlr);
  }
}

}  // namespace
}  // namespace moelora
