// cuda_wna16 (int4 / int8 expert weights, bf16 activations): each op against the CPU
// reference op on the dequantized weights (fresh random inputs, NaN-poisoned outputs,
// M = 1, 7, 64, 257, 1024), the whole layer against the reference runner with and without
// mixed-adapter LoRA, and (disabled by default) timings at the qwen3-30b-a3b shape against the
// byte roofline.
#include <cmath>
#include <cstdio>
#include <functional>
#include <set>
#include <vector>

#include <cuda_runtime_api.h>

#include "gpu_op_test_util.h"
#include "kernels/cpu/moe_ops.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_ops.h"
#include "kernels/cuda/moe_wna16_ops.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"
#include "moelora/quant/experts.h"

namespace moelora {
namespace {

using test::to_gpu;

struct Variant {
  const char* name;
  quant::QuantizeOptions opt;
};

quant::QuantizeOptions options(WeightFormat f, quant::IntSource src, int64_t group, bool sym,
                               bool act_order = false) {
  quant::QuantizeOptions o;
  o.format = f, o.source = src, o.group_size = group, o.sym = sym, o.act_order = act_order;
  o.seed = 17;
  return o;
}

std::vector<Variant> variants() {
  using quant::IntSource;
  const WeightFormat i4 = WeightFormat::int4, i8 = WeightFormat::int8;
  return {{"int4 gptq sym g128", options(i4, IntSource::gptq, 128, true)},
          {"int4 gptq asym g32", options(i4, IntSource::gptq, 32, false)},
          {"int4 gptq act-order g64", options(i4, IntSource::gptq, 64, false, true)},
          {"int4 awq g128", options(i4, IntSource::awq, 128, false)},
          {"int4 ct sym per-channel", options(i4, IntSource::ct, -1, true)},
          {"int8 gptq sym g64", options(i8, IntSource::gptq, 64, true)},
          {"int8 ct asym per-channel", options(i8, IntSource::ct, -1, false)},
          {"int8 gptq act-order g32", options(i8, IntSource::gptq, 32, true, true)}};
}

// A random bf16 stack [G, N, K] of magnitude ~2 / sqrt(K), quantized, on the host.
ExpertMatrices quantized(int64_t g, int64_t n, int64_t k, const quant::QuantizeOptions& o,
                         std::mt19937_64& rng) {
  const float a = 2.0f / std::sqrt(float(k));
  return quant::quantize_experts(test::random_tensor({g, n, k}, DType::bf16, rng, -a, a), o);
}

// Routed ids with distinct experts per token and some "not here" (-1) slots.
Tensor random_ids(int64_t m, int top_k, int groups, std::mt19937_64& rng) {
  std::vector<int32_t> ids(static_cast<size_t>(m * top_k)), perm(static_cast<size_t>(groups));
  for (int g = 0; g < groups; ++g) perm[size_t(g)] = g;
  for (int64_t t = 0; t < m; ++t) {
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < top_k; ++j)
      ids[size_t(t * top_k + j)] = rng() % 7 == 0 ? -1 : perm[size_t(j)];
  }
  return test::from_ints(ids, {m, top_k});
}

// Rows of `out` for slots with ids >= 0 (the rows the ops write).
std::vector<float> live_rows(const Tensor& out, const Tensor& ids) {
  const std::vector<float> v = test::to_floats(out);
  const std::vector<int32_t> id = test::to_ints(ids);
  const int64_t cols = out.size(1);
  std::vector<float> r;
  for (size_t s = 0; s < id.size(); ++s)
    if (id[s] >= 0) r.insert(r.end(), v.begin() + int64_t(s) * cols, v.begin() + int64_t(s + 1) * cols);
  return r;
}

TEST(CudaWna16Ops, MatchCpuReferenceOnDequantizedWeights) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  const Device d = Device::cuda();
  constexpr int kGroups = 8, kTopK = 4;
  // gemm1: N = 2I = 256, K = H = 256; gemm2: N = H = 256, K = I = 128. Plus an odd stack:
  // N = 40 (48 packed rows), K = 96 (int4: 128 packed channels), group 32.
  for (const Variant& v : variants()) {
    const ExpertMatrices w13 = quantized(kGroups, 256, 256, v.opt, rng);
    const ExpertMatrices w2 = quantized(kGroups, 256, 128, v.opt, rng);
    quant::QuantizeOptions odd_opt = v.opt;
    if (odd_opt.group_size != -1) odd_opt.group_size = 32;
    const ExpertMatrices odd = quantized(kGroups, 40, 96, odd_opt, rng);
    const Tensor w13_f = quant::dequantize_experts(w13), w2_f = quant::dequantize_experts(w2),
                 odd_f = quant::dequantize_experts(odd);
    const ExpertMatrices dw13 = w13.to(d), dw2 = w2.to(d), dodd = odd.to(d);
    const ExpertMatrices wide = quantized(kGroups, 2048, 256, v.opt, rng);
    const Tensor wide_f = quant::dequantize_experts(wide);
    const ExpertMatrices dwide = wide.to(d);
    for (int64_t m : {1, 7, 64, 257, 1024}) {
      SCOPED_TRACE(::testing::Message() << v.name << " M=" << m);
      const int64_t slots = m * kTopK;
      const Tensor ids = random_ids(m, kTopK, kGroups, rng);
      MoeShape shape;
      shape.hidden = 256, shape.inter = 128, shape.num_experts = kGroups, shape.top_k = kTopK;
      MoeAlignment plan = test::poisoned_plan(slots, kGroups, cuda::moe_block_m(m, shape), d);
      cuda::moe_align(to_gpu(ids), plan, s);
      s.synchronize();
      const MoeAlignment hplan = test::host_copy(plan);
      const Tensor x = test::random_tensor({m, 256}, DType::bf16, rng);
      const Tensor a = test::random_tensor({slots, 128}, DType::bf16, rng);
      const Tensor sw = test::random_tensor({slots}, DType::f32, rng, 0.1f, 1.0f);
      const Tensor dx = to_gpu(x), da = to_gpu(a), dsw = to_gpu(sw);

      // gemm1 -> h
      Tensor h_ref = Tensor::zeros({slots, 256}, DType::f32);
      cpu::moe_gemm1(x, kTopK, hplan, w13_f, h_ref, Stream());
      Tensor h = test::poisoned({slots, 256}, DType::f32, d, test::kPoisonFloat);
      cuda::moe_gemm1_wna16(dx, kTopK, plan, dw13, h, s);
      s.synchronize();
      EXPECT_TRUE(test::allclose(live_rows(h, ids), live_rows(h_ref, ids), 5e-3, 2e-3)) << "gemm1";

      // fused gemm1 + activation -> a (bit-identical to gemm1 then moe_activation on the GPU)
      Tensor act_ref = test::poisoned({slots, 128}, DType::bf16, d, test::kPoisonFloat);
      cuda::moe_activation(h, to_gpu(ids), act_ref, s);
      Tensor act = test::poisoned({slots, 128}, DType::bf16, d, test::kPoisonFloat);
      cuda::moe_gemm1_activation_wna16(dx, kTopK, plan, dw13, act, s);
      s.synchronize();
      EXPECT_EQ(test::raw_bits16(act), test::raw_bits16(act_ref)) << "fused activation";

      // gemm2 -> o (with and without slot weights; plan_ready gives the same result)
      Tensor o_ref = Tensor::zeros({slots, 256}, DType::f32);
      cpu::moe_gemm2(a, hplan, w2_f, sw, o_ref, Stream());
      Tensor o = test::poisoned({slots, 256}, DType::f32, d, test::kPoisonFloat);
      cuda::moe_gemm2_wna16(da, plan, dw2, dsw, o, s);
      Tensor o2 = test::poisoned({slots, 256}, DType::f32, d, test::kPoisonFloat);
      cuda::moe_gemm2_wna16_plan_ready(da, plan, dw2, dsw, o2, s);
      s.synchronize();
      EXPECT_TRUE(test::allclose(live_rows(o, ids), live_rows(o_ref, ids), 5e-3, 2e-3)) << "gemm2";
      EXPECT_EQ(test::raw_bits32(o), test::raw_bits32(o2)) << "plan_ready";

      // odd sizes: gemm1 over N = 40, K = 96 (x's first 96 columns)
      const Tensor x96 = test::random_tensor({m, 96}, DType::bf16, rng);
      Tensor ho_ref = Tensor::zeros({slots, 40}, DType::f32);
      cpu::moe_gemm1(x96, kTopK, hplan, odd_f, ho_ref, Stream());
      Tensor ho = test::poisoned({slots, 40}, DType::f32, d, test::kPoisonFloat);
      cuda::moe_gemm1_wna16(to_gpu(x96), kTopK, plan, dodd, ho, s);
      s.synchronize();
      EXPECT_TRUE(test::allclose(live_rows(ho, ids), live_rows(ho_ref, ids), 5e-3, 2e-3))
          << "odd sizes";
      // A wide gemm1 (N = 2048: enough CTAs for 64-row tiles at small batches).
      if (m <= 64) {
        Tensor hw_ref = Tensor::zeros({slots, 2048}, DType::f32);
        cpu::moe_gemm1(x, kTopK, hplan, wide_f, hw_ref, Stream());
        Tensor hw = test::poisoned({slots, 2048}, DType::f32, d, test::kPoisonFloat);
        cuda::moe_gemm1_wna16(dx, kTopK, plan, dwide, hw, s);
        s.synchronize();
        EXPECT_TRUE(test::allclose(live_rows(hw, ids), live_rows(hw_ref, ids), 5e-3, 2e-3))
            << "wide";
      }
    }
  }
}

TEST(CudaWna16Ops, BadInput) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(3);
  Stream s = Stream::create(Device::cuda());
  const Device d = Device::cuda();
  const ExpertMatrices w = quantized(2, 64, 128, options(WeightFormat::int4, quant::IntSource::gptq, 64, true), rng).to(d);
  MoeAlignment plan = MoeAlignment::allocate(4, 2, kMaxBlockM, d);
  plan.block_m = 8;
  Tensor x = Tensor::zeros({2, 128}, DType::bf16, d), h = Tensor::zeros({4, 64}, DType::f32, d);
  Tensor x64 = Tensor::zeros({2, 64}, DType::bf16, d);
  test::expect_error([&] { cuda::moe_gemm1_wna16(x64, 2, plan, w, h, s); }, "logical K = 128");
  ExpertMatrices bad = w;
  bad.w = Tensor::zeros({2, 4, 4, 128}, DType::i32, d);  // int8's K tiles for an int4 stack
  test::expect_error([&] { cuda::moe_gemm1_wna16(x, 2, plan, bad, h, s); }, "w13 codes");
  bad = w;
  bad.group_k = 96;
  test::expect_error([&] { cuda::moe_gemm1_wna16(x, 2, plan, bad, h, s); }, "group size 96");
  Tensor a_bad = Tensor::zeros({4, 16}, DType::bf16, d);
  ExpertMatrices odd = w;
  odd.n = 48;  // N / 2 = 24: gate and up rows not on 16-row tiles
  odd.w = Tensor::zeros({2, 3, 2, 128}, DType::i32, d);
  odd.scales = Tensor::zeros({2, 2, 48}, DType::f32, d);
  test::expect_error([&] { cuda::moe_gemm1_activation_wna16(x, 2, plan, odd, a_bad, s); },
                     "multiple of 16");
  ExpertMatrices bf = ExpertMatrices(Tensor::zeros({2, 64, 128}, DType::bf16, d));
  test::expect_error([&] { cuda::moe_gemm1_wna16(x, 2, plan, bf, h, s); }, "int4 / int8");
}

// ---- the whole layer ----

MoeWeights layer_weights(const MoeShape& sh, const quant::QuantizeOptions& o,
                         std::mt19937_64& rng) {
  MoeWeights w;
  w.format = o.format;
  const int64_t E = sh.num_experts, H = sh.hidden, I = sh.inter;
  w.w13 = quantized(E, 2 * I, H, o, rng);
  w.w2 = quantized(E, H, I, o, rng);
  if (sh.shared_inter > 0) {
    w.shared_w13 = quantized(1, 2 * sh.shared_inter, H, o, rng);
    w.shared_w2 = quantized(1, H, sh.shared_inter, o, rng);
  }
  return w;
}

MoeWeights to_device(const MoeWeights& w) {
  MoeWeights d = w;
  for (ExpertMatrices* m : {&d.w13, &d.w2, &d.shared_w13, &d.shared_w2})
    if (m->defined()) *m = m->to(Device::cuda());
  return d;
}

// Adapter 0: fused gate_up r16, down r8; adapter 1: separate gate r8 / up r4, down r16.
void add_adapters(const MoeShape& sh, std::mt19937_64& rng, MoeLoraPool& cpu_pool,
                  MoeLoraPool& gpu_pool) {
  const int64_t E = sh.num_experts, H = sh.hidden, I = sh.inter;
  auto t = [&](const Shape& shape) {
    return test::random_tensor(shape, DType::f32, rng, -0.4f, 0.4f);
  };
  MoeLoraWeights p, q;
  p.gate_up_a = t({E, 16, H}), p.gate_up_b = t({E, 2 * I, 16});
  p.down_a = t({E, 8, I}), p.down_b = t({E, H, 8});
  q.gate_a = t({E, 8, H}), q.gate_b = t({E, I, 8}), q.up_a = t({E, 4, H}), q.up_b = t({E, I, 4});
  q.down_a = t({E, 16, I}), q.down_b = t({E, H, 16});
  cpu_pool.load(0, p), cpu_pool.load(1, q);
  gpu_pool.load(0, p), gpu_pool.load(1, q);
}

TEST(CudaWna16Layer, MatchesReferenceRunner) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  MoeShape plain;
  plain.name = "small", plain.hidden = 256, plain.inter = 128, plain.num_experts = 16;
  plain.top_k = 4;
  MoeShape shared = plain;
  shared.name = "small-shared", shared.shared_inter = 128, shared.shared_gate = true;
  struct LayerVariant {
    MoeShape shape;
    quant::QuantizeOptions opt;
  };
  const std::vector<LayerVariant> cases = {
      {plain, options(WeightFormat::int4, quant::IntSource::gptq, 128, true)},
      {shared, options(WeightFormat::int4, quant::IntSource::awq, 64, false)},
      {plain, options(WeightFormat::int8, quant::IntSource::gptq, 32, false, true)},
      {shared, options(WeightFormat::int8, quant::IntSource::ct, -1, true)}};
  for (const LayerVariant& c : cases) {
    const int64_t max_tokens = 1024;
    const RouterConfig router = RouterConfig::softmax_topk(c.shape.num_experts, c.shape.top_k, true);
    MoeRunnerConfig rc;
    rc.shape = c.shape, rc.router = router, rc.max_tokens = max_tokens, rc.format = c.opt.format;
    rc.device = Device::cpu();
    MoeRunner ref(rc);
    rc.device = Device::cuda();
    MoeRunner gpu(rc);
    EXPECT_EQ(gpu.backend().name(), "cuda_wna16");
    const MoeWeights w = layer_weights(c.shape, c.opt, rng);
    const MoeWeights dw = to_device(w);
    for (bool lora : {false, true}) {
      MoeLoraPool pool_cpu(c.shape, 2, 16, Device::cpu()), pool_gpu(c.shape, 2, 16, Device::cuda());
      if (lora) add_adapters(c.shape, rng, pool_cpu, pool_gpu);
      auto hooks_cpu = MoeLoraHooks::create(pool_cpu, max_tokens);
      auto hooks_gpu = MoeLoraHooks::create(pool_gpu, max_tokens);
      for (int64_t m : {1, 7, 64, 257, 1024}) {
        if (m == 1024 && (lora || c.shape.shared_inter > 0)) continue;  // CPU time
        SCOPED_TRACE(::testing::Message() << c.shape.name << " " << format_name(c.opt.format)
                                          << " lora=" << lora << " M=" << m);
        const Tensor x = test::random_tensor({m, int64_t(c.shape.hidden)}, DType::bf16, rng);
        const Tensor logits =
            test::random_tensor({m, int64_t(c.shape.num_experts)}, DType::f32, rng, -3.0f, 3.0f);
        const Tensor gate = c.shape.shared_gate
                                ? test::random_tensor({m}, DType::f32, rng, -2.0f, 2.0f)
                                : Tensor();
        // Base tokens (-1) mixed with both adapters.
        const Tensor slot = test::random_ints({m}, rng, -1, 1);
        Tensor y_ref = Tensor::empty({m, int64_t(c.shape.hidden)}, DType::bf16);
        if (lora) hooks_cpu->bind(LoraBatch{slot});
        ref.run(MoeInputs{x, logits, gate}, w, lora ? hooks_cpu.get() : nullptr, y_ref, Stream());
        Tensor y = test::poisoned({m, int64_t(c.shape.hidden)}, DType::bf16, Device::cuda(),
                                  test::kPoisonFloat);
        if (lora) hooks_gpu->bind(LoraBatch{to_gpu(slot)});
        gpu.run(MoeInputs{to_gpu(x), to_gpu(logits), gate.defined() ? to_gpu(gate) : Tensor()},
                dw, lora ? hooks_gpu.get() : nullptr, y, s);
        s.synchronize();
        EXPECT_EQ(test::to_ints(gpu.last_topk().ids), test::to_ints(ref.last_topk().ids));
        EXPECT_TRUE(test::allclose(test::to_floats(y), test::to_floats(y_ref), 1e-2, 1e-2));
      }
    }
  }
}

TEST(CudaWna16Layer, SupportsSaysWhy) {
  MOELORA_REQUIRE_GPU();
  MoeShape sh;
  sh.hidden = 256, sh.inter = 128, sh.num_experts = 8, sh.top_k = 2;
  MoeRunnerConfig rc;
  rc.shape = sh, rc.router = RouterConfig::softmax_topk(8, 2, true), rc.device = Device::cuda();
  rc.format = WeightFormat::fp8_block;
  rc.backend = "cuda_wna16";
  test::expect_error([&] { MoeRunner r(rc); }, "int4 / int8 weights only");
}

// ---- timings (disabled by default) ----

// Median microseconds of one `body`: 10 calls captured in one graph (launch gaps amortized).
double graph_us(const Stream& s, const std::function<void()>& body) {
  const double ms = test::graph_replay_median_ms(
      s, [&] { for (int i = 0; i < 10; ++i) body(); }, 3, 20);
  return 100.0 * ms;
}

TEST(CudaWna16Perf, DISABLED_Qwen3Roofline) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  const Device d = Device::cuda();
  const MoeShape sh = MoeShape::by_name("qwen3-30b-a3b");
  const int E = sh.num_experts, k = sh.top_k;
  const int64_t H = sh.hidden, I = sh.inter;
  // Device copy bandwidth (read + write) of this run, as BENCHMARKS.md's roofline.
  Tensor big0 = Tensor::zeros({int64_t(1) << 28}, DType::f32, d);
  Tensor big1 = Tensor::empty({int64_t(1) << 28}, DType::f32, d);
  const double copy_ms = test::graph_replay_median_ms(
      s, [&] { big1.copy_from(big0, &s); }, 2, 10);
  const double bw = 2.0 * double(big0.nbytes()) / (copy_ms * 1e-3);
  std::printf("device copy bandwidth %.2f TB/s\n", bw * 1e-12);
  for (WeightFormat f : {WeightFormat::int4, WeightFormat::int8}) {
    for (int64_t group : {128, -1}) {
      const ExpertMatrices w13 = quant::random_experts(f, E, 2 * I, H, group, 0.05f, 1, d, s);
      const ExpertMatrices w2 = quant::random_experts(f, E, H, I, group, 0.05f, 2, d, s);
      const double per_expert =
          double(w13.w.nbytes() + w13.scales.nbytes() + w2.w.nbytes() + w2.scales.nbytes()) / E;
      std::printf("%s group %ld: %.3f MB per expert (codes + scales)\n", format_name(f),
                  long(group), per_expert * 1e-6);
      std::printf("%-6s %9s %9s %9s %9s %9s %7s\n", "batch", "touched", "gemm1+act", "gemm2",
                  "total us", "roof us", "% roof");
      for (int64_t m : {1, 2, 4, 8, 16, 32, 64, 128, 256}) {
        const int64_t slots = m * k;
        const Tensor logits = test::random_tensor({m, E}, DType::f32, rng, -3, 3);
        TopK topk{Tensor::empty({m, k}, DType::i32, d), Tensor::empty({m, k}, DType::f32, d)};
        MoeAlignment plan = MoeAlignment::allocate(slots, E, kMaxBlockM, d);
        plan.block_m = cuda::moe_block_m(m, sh);
        cuda::moe_route(to_gpu(logits), Tensor(), sh.default_router(), topk, s);
        cuda::moe_align(topk.ids, plan, s);
        s.synchronize();
        const std::vector<int32_t> ids = test::to_ints(topk.ids);
        const std::set<int32_t> touched(ids.begin(), ids.end());
        Tensor x = test::random_tensor({m, H}, DType::bf16, rng).to(d);
        Tensor a = Tensor::empty({slots, I}, DType::bf16, d);
        Tensor o = Tensor::empty({slots, H}, DType::f32, d);
        const Tensor sw = topk.weights.view({slots});
        const double t1 = graph_us(s, [&] { cuda::moe_gemm1_activation_wna16(x, k, plan, w13, a, s); });
        const double t2 = graph_us(s, [&] { cuda::moe_gemm2_wna16_plan_ready(a, plan, w2, sw, o, s); });
        const double roof = 1e6 * double(touched.size()) * per_expert / bw;
        std::printf("%-6ld %9zu %9.1f %9.1f %9.1f %9.1f %6.0f%%\n", long(m), touched.size(), t1,
                    t2, t1 + t2, roof, 100.0 * roof / (t1 + t2));
      }
    }
  }
}

}  // namespace
}  // namespace moelora
