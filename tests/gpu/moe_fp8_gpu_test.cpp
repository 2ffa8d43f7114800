// cuda_fp8_block: the fp8 expert GEMM ops against the CPU reference ops run on the dequantized
// weights and the quantize-dequantized activations (fresh random inputs, poisoned outputs,
// M = 1, 7, 64, 257, 1024, gate/up parts not a multiple of the scale block, every tile), the
// whole MoeRunner layer in WeightFormat::fp8_block against the `reference` backend with and
// without mixed-adapter LoRA and with shared experts, and (disabled) timings vs the roofline.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <vector>

#include "fp8_test_util.h"
#include "gpu_op_test_util.h"
#include "kernels/cpu/moe_ops.h"
#include "kernels/cuda/moe_fp8_ops.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"
#include "moelora/quant/experts.h"
#include "moelora/quant/fp8_block.h"

namespace moelora {
namespace {

using test::fp8_layer_cases;
using test::fp8_stack;
using test::fp8_weights;
using test::Fp8LayerCase;
using test::on_gpu;
using test::poisoned;
using test::route;
using test::Routed;
using test::to_gpu;

// What the kernels multiply for an activation: its 1 x 128 fp8 quantization, dequantized.
Tensor quant_dequant(const Tensor& x) {
  return quant::dequantize_fp8_activation(quant::quantize_fp8_activation(x, 128), 128);
}

// Rows of slots with ids >= 0 match (rel/abs tolerance); the others still hold the poison.
void expect_rows(const Tensor& got_t, const Tensor& want_t, const Tensor& ids, double tol,
                 const char* what) {
  const auto got = test::to_floats(got_t), want = test::to_floats(want_t);
  const int64_t n = got_t.size(1);
  const auto id = test::to_ints(ids);
  std::vector<float> g, w;
  int64_t dead_written = 0;
  for (size_t s = 0; s < id.size(); ++s)
    for (int64_t c = 0; c < n; ++c) {
      const size_t i = s * size_t(n) + size_t(c);
      if (id[s] >= 0) {
        g.push_back(got[i]), w.push_back(want[i]);
      } else {
        dead_written += !std::isnan(got[i]);
      }
    }
  EXPECT_EQ(dead_written, 0) << what << ": rows of unaligned slots were written";
  EXPECT_TRUE(test::allclose(g, w, tol, tol)) << what;
}

struct OpCase {
  int64_t m;
  int E, k;
  int64_t H, I;
  int block_m = 0;  // 0: the heuristic's
  int rows = 0;     // 0: the heuristic's tile
  bool holes = true;
};

void run_ops(const OpCase& c, std::mt19937_64& rng, const Stream& s) {
  SCOPED_TRACE(::testing::Message()
               << "M=" << c.m << " E=" << c.E << " k=" << c.k << " H=" << c.H << " I=" << c.I
               << " block_m=" << c.block_m << " rows=" << c.rows);
  const int64_t M = c.m, S = M * c.k, H = c.H, I = c.I;
  MoeShape shape{"test", int(H), int(I), c.E, c.k};
  const int block_m = c.block_m ? c.block_m : cuda::moe_block_m(M, shape);
  const ExpertMatrices w13 = fp8_stack(c.E, {I, I}, H, rng);  // gate, up parts
  const ExpertMatrices w2 = fp8_stack(c.E, {H}, I, rng);
  const ExpertMatrices dw13 = w13.to(Device::cuda()), dw2 = w2.to(Device::cuda());
  const Routed r = route(M, c.E, c.k, block_m, c.holes, rng, s);
  const MoeAlignment hplan = test::host_copy(r.plan);
  const Tensor x = test::random_tensor({M, H}, DType::bf16, rng);
  const Tensor a = test::random_tensor({S, I}, DType::bf16, rng);
  const Tensor sw = test::random_tensor({S}, DType::f32, rng, 0.1f, 1.0f);

  // CPU reference on the values the kernels multiply.
  Tensor h_ref = Tensor::empty({S, 2 * I}, DType::f32), o_ref = Tensor::empty({S, H}, DType::f32);
  Tensor a_ref = Tensor::empty({S, I}, DType::bf16);
  h_ref.fill_bytes(0xFF), o_ref.fill_bytes(0xFF), a_ref.fill_bytes(0xFF);
  cpu::moe_gemm1(quant_dequant(x), c.k, hplan, quant::dequantize_experts(w13), h_ref, Stream());
  cpu::moe_activation(h_ref, r.ids, a_ref, Stream());
  cpu::moe_gemm2(quant_dequant(a), hplan, quant::dequantize_experts(w2), sw, o_ref, Stream());

  Tensor h = poisoned({S, 2 * I}, DType::f32, Device::cuda(), test::kPoisonFloat);
  Tensor act = poisoned({S, I}, DType::bf16, Device::cuda(), test::kPoisonFloat);
  Tensor o = poisoned({S, H}, DType::f32, Device::cuda(), test::kPoisonFloat);
  const Tensor dx = to_gpu(x), da = to_gpu(a), dsw = to_gpu(sw);
  // One buffer for both GEMM inputs, poisoned: every code the GEMMs read must be rewritten.
  cuda::Fp8ActBuffer buf = cuda::Fp8ActBuffer::allocate(S, std::max(H, I), Device::cuda());
  buf.q.fill_bytes(0x7F), buf.scale.fill_bytes(0xFF);
  if (c.rows) {
    const cuda::MoeGemmConfig cfg{c.rows, true, false, c.rows == 64};
    cuda::moe_gemm1_fp8_tiled(dx, c.k, r.plan, dw13, h, false, buf, s, cfg);
    cuda::moe_gemm1_fp8_tiled(dx, c.k, r.plan, dw13, act, true, buf, s, cfg);
    cuda::moe_gemm2_fp8_tiled(da, r.plan, dw2, dsw, o, buf, s, {c.rows, true, true, c.rows != 64});
  } else {
    cuda::moe_gemm1_fp8(dx, c.k, r.plan, dw13, h, buf, s);
    cuda::moe_gemm1_fp8_activation(dx, c.k, r.plan, dw13, act, buf, s);
    cuda::moe_gemm2_fp8(da, r.plan, dw2, dsw, o, buf, s);
  }
  s.synchronize();
  expect_rows(h, h_ref, r.ids, 1e-3, "gemm1");
  expect_rows(act, a_ref, r.ids, 1e-2, "gemm1 + fused activation");
  expect_rows(o, o_ref, r.ids, 1e-3, "gemm2");
}

TEST(CudaFp8Block, OpsMatchReferenceOverBatchSizes) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  // I = 208: gate/up boundary inside a 128-row scale block, partial K block in gemm2;
  // H = 384: three K blocks in gemm1.
  for (int64_t m : {1, 7, 64, 257, 1024}) run_ops({m, 16, 4, 384, 208}, rng, s);
}

TEST(CudaFp8Block, OpsEveryTileAndBlockSize) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (int rows : {32, 64, 128})
    for (int bm : {1, 8, 13, 32, 64, 100, 128}) run_ops({50, 5, 3, 272, 144, bm, rows}, rng, s);
}

TEST(CudaFp8Block, OpsModelShapes) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  run_ops({5, 128, 8, 2048, 768}, rng, s);              // qwen3-30b-a3b
  run_ops({6, 1, 1, 2048, 1408, 0, 0, false}, rng, s);  // a shared expert: G = 1, top_k = 1
}

// The activation quantization kernel equals quant::quantize_fp8_activation bit for bit:
// codes and scales, rows of very different magnitudes, all-zero rows and blocks, a partial last
// K block, K below one block.
TEST(CudaFp8Block, QuantizeActivationBitExact) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  std::uniform_real_distribution<float> u(-1.0f, 1.0f), mag(-30.0f, 12.0f);
  for (int64_t K : {16, 112, 128, 208, 384, 2048})
    for (int64_t M : {1, 7, 257}) {
      SCOPED_TRACE(::testing::Message() << "M=" << M << " K=" << K);
      Tensor x = Tensor::empty({M, K}, DType::bf16);
      bf16_t* p = x.data<bf16_t>();
      for (int64_t r = 0; r < M; ++r) {
        const float scale = std::exp2(mag(rng));  // 2^-30 .. 2^12 per row
        const bool zero_row = r % 5 == 3;
        for (int64_t c = 0; c < K; ++c) {
          const bool zero = zero_row || (r % 3 == 1 && c / 128 == 0);  // a zero first block
          p[r * K + c] = float_to_bf16(zero ? 0.0f : u(rng) * scale * (c % 17 == 0 ? 8.f : 1.f));
        }
      }
      const quant::Fp8Activation want = quant::quantize_fp8_activation(x, 128);
      cuda::Fp8ActBuffer buf = cuda::Fp8ActBuffer::allocate(M + 3, K, Device::cuda());
      buf.q.fill_bytes(0x55), buf.scale.fill_bytes(0xFF);
      cuda::fp8_quantize_act(to_gpu(x), buf, s);
      s.synchronize();
      const int64_t kb = (K + 127) / 128;
      const Tensor q = buf.q.to(Device::cpu()), sc = buf.scale.to(Device::cpu());
      EXPECT_EQ(std::memcmp(q.data(), want.q.data(), size_t(M * K)), 0) << "codes differ";
      EXPECT_EQ(std::memcmp(sc.data(), want.scale.data(), size_t(M * kb) * 4), 0)
          << "scales differ";
      // Nothing past the M rows written.
      const uint8_t* qb = static_cast<const uint8_t*>(q.data());
      int64_t past = 0;
      for (int64_t i = M * K; i < (M + 3) * K; ++i) past += qb[i] != 0x55;
      EXPECT_EQ(past, 0);
    }
  Tensor odd = to_gpu(test::random_tensor({2, 24}, DType::bf16, rng));
  cuda::Fp8ActBuffer buf = cuda::Fp8ActBuffer::allocate(2, 32, Device::cuda());
  test::expect_error([&] { cuda::fp8_quantize_act(odd, buf, s); }, "multiple of 16");
}

TEST(CudaFp8Block, OpsRejectBadInput) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  const Routed r = route(4, 4, 2, 8, false, rng, s);
  Tensor x = to_gpu(test::random_tensor({4, 256}, DType::bf16, rng));
  Tensor h = Tensor::empty({8, 256}, DType::f32, Device::cuda());
  cuda::Fp8ActBuffer buf = cuda::Fp8ActBuffer::allocate(8, 256, Device::cuda());
  // block_k 64: the kernels' K tile is 128.
  std::vector<std::vector<quant::Fp8BlockTensors>> parts(4);
  for (auto& g : parts)
    g.push_back(
        quant::quantize_fp8_block(test::random_tensor({256, 256}, DType::f32, rng), {128, 64}));
  const ExpertMatrices w64 =
      quant::pack_fp8_block_experts(parts, {128, 64}, "w").to(Device::cuda());
  test::expect_error([&] { cuda::moe_gemm1_fp8(x, 2, r.plan, w64, h, buf, s); }, "block_k = 64");
  // A bf16 stack.
  ExpertMatrices bf(Tensor::empty({4, 256, 256}, DType::bf16, Device::cuda()));
  test::expect_error([&] { cuda::moe_gemm1_fp8(x, 2, r.plan, bf, h, buf, s); }, "fp8_block");
  // Scales of the wrong shape.
  ExpertMatrices w = fp8_stack(4, {128, 128}, 256, rng).to(Device::cuda());
  w.scales = Tensor::empty({4, 1, 2, 1}, DType::f32, Device::cuda());
  test::expect_error([&] { cuda::moe_gemm1_fp8(x, 2, r.plan, w, h, buf, s); }, "scales");
  // An activation buffer too small for x (4 rows x 256).
  ExpertMatrices good = fp8_stack(4, {128, 128}, 256, rng).to(Device::cuda());
  cuda::Fp8ActBuffer small = cuda::Fp8ActBuffer::allocate(3, 256, Device::cuda());
  test::expect_error([&] { cuda::moe_gemm1_fp8(x, 2, r.plan, good, h, small, s); },
                     "fp8 activation buffer");
  // The backend says which block sizes it runs.
  std::string why;
  EXPECT_FALSE(cuda::moe_fp8_stack_supported(128, 64, 256, &why));
  EXPECT_NE(why.find("128"), std::string::npos) << why;
  MoeProblem p{MoeShape{"odd", 256, 200, 8, 2}, WeightFormat::fp8_block, DType::bf16,
               Device::cuda(), 16};
  test::expect_error([&] { make_moe_backend("cuda_fp8_block", p); }, "multiple of 16");
}

// --- the whole layer ---

// Slot 0: separate gate r8 / up r4 / down r16; slot 1: fused gate_up r16, no down.
void load_two_adapters(const MoeShape& s, std::mt19937_64& rng, MoeLoraPool& cpu_pool,
                       MoeLoraPool& gpu_pool) {
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  auto r = [&](const Shape& sh) { return test::random_tensor(sh, DType::f32, rng, -0.3f, 0.3f); };
  MoeLoraWeights a, b;
  a.gate_a = r({E, 8, H}), a.gate_b = r({E, I, 8}), a.up_a = r({E, 4, H}), a.up_b = r({E, I, 4});
  a.down_a = r({E, 16, I}), a.down_b = r({E, H, 16});
  b.gate_up_a = r({E, 16, H}), b.gate_up_b = r({E, 2 * I, 16});
  for (MoeLoraPool* p : {&cpu_pool, &gpu_pool}) {
    p->load(0, a);
    p->load(1, b);
  }
}

TEST(CudaFp8Block, LayerMatchesReferenceBackend) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (const Fp8LayerCase& c : fp8_layer_cases()) {
    const int64_t max_tokens = 1024, H = c.shape.hidden;
    MoeRunnerConfig rc;
    rc.shape = c.shape, rc.router = c.router, rc.max_tokens = max_tokens;
    rc.format = WeightFormat::fp8_block;
    rc.device = Device::cpu();
    MoeRunner ref(rc);
    rc.device = Device::cuda();
    MoeRunner gpu(rc);
    EXPECT_EQ(gpu.backend().name(), "cuda_fp8_block");
    const MoeWeights w = fp8_weights(c.shape, c.router.use_correction_bias, rng);
    const MoeWeights dw = on_gpu(w);
    for (bool lora : {false, true}) {
      MoeLoraPool pool_cpu(c.shape, 2, 16, Device::cpu()), pool_gpu(c.shape, 2, 16, Device::cuda());
      if (lora) load_two_adapters(c.shape, rng, pool_cpu, pool_gpu);
      auto hooks_cpu = MoeLoraHooks::create(pool_cpu, max_tokens);
      auto hooks_gpu = MoeLoraHooks::create(pool_gpu, max_tokens);
      for (int64_t m : {1, 7, 64, 257, 1024}) {
        if (m == 1024 && (lora || c.shape.shared_inter > 0)) continue;  // CPU time
        SCOPED_TRACE(::testing::Message() << c.shape.name << " lora=" << lora << " M=" << m);
        const Tensor x = test::random_tensor({m, H}, DType::bf16, rng);
        const Tensor logits =
            test::random_tensor({m, int64_t(c.shape.num_experts)}, DType::f32, rng, -3.0f, 3.0f);
        const Tensor gate =
            c.shape.shared_gate ? test::random_tensor({m}, DType::f32, rng, -2.0f, 2.0f) : Tensor();
        const Tensor slots = test::random_ints({m}, rng, -1, 1);  // base, adapter 0, adapter 1
        Tensor y_ref = Tensor::empty({m, H}, DType::bf16);
        if (lora) hooks_cpu->bind(LoraBatch{slots});
        ref.run({x, logits, gate}, w, lora ? hooks_cpu.get() : nullptr, y_ref, Stream());
        Tensor y = poisoned({m, H}, DType::bf16, Device::cuda(), test::kPoisonFloat);
        if (lora) hooks_gpu->bind(LoraBatch{to_gpu(slots)});
        gpu.run({to_gpu(x), to_gpu(logits), gate.defined() ? to_gpu(gate) : Tensor()}, dw,
                lora ? hooks_gpu.get() : nullptr, y, s);
        s.synchronize();
        EXPECT_EQ(test::to_ints(gpu.last_topk().ids), test::to_ints(ref.last_topk().ids));
        EXPECT_TRUE(test::allclose(test::to_floats(y), test::to_floats(y_ref), 2e-2, 2e-2));
      }
    }
  }
}

// Bisection aid (disabled): one op at a time on a shape from the environment, synchronizing
// after each, printing which op fails. MOELORA_FP8_DIAG="M E k H I".
TEST(CudaFp8BlockDiag, DISABLED_OneOpAtATime) {
  MOELORA_REQUIRE_GPU();
  const char* env = std::getenv("MOELORA_FP8_DIAG");
  long m = 5, e = 16, k = 4, hh = 2048, ii = 768;
  if (env) std::sscanf(env, "%ld %ld %ld %ld %ld", &m, &e, &k, &hh, &ii);
  std::mt19937_64 rng(1);
  Stream s = Stream::create(Device::cuda());
  MoeShape shape{"diag", int(hh), int(ii), int(e), int(k)};
  const ExpertMatrices w13 = fp8_stack(e, {ii, ii}, hh, rng).to(Device::cuda());
  const ExpertMatrices w2 = fp8_stack(e, {hh}, ii, rng).to(Device::cuda());
  const Routed r = route(m, int(e), int(k), cuda::moe_block_m(m, shape), false, rng, s);
  std::printf("diag M=%ld E=%ld k=%ld H=%ld I=%ld: routed\n", m, e, k, hh, ii);
  std::fflush(stdout);
  Tensor x = to_gpu(test::random_tensor({m, hh}, DType::bf16, rng));
  Tensor a = to_gpu(test::random_tensor({m * k, ii}, DType::bf16, rng));
  Tensor h = Tensor::empty({m * k, 2 * ii}, DType::f32, Device::cuda());
  Tensor o = Tensor::empty({m * k, hh}, DType::f32, Device::cuda());
  Tensor act = Tensor::empty({m * k, ii}, DType::bf16, Device::cuda());
  cuda::Fp8ActBuffer buf = cuda::Fp8ActBuffer::allocate(m * k, std::max(hh, ii), Device::cuda());
  cuda::moe_gemm1_fp8(x, int(k), r.plan, w13, h, buf, s);
  s.synchronize();
  std::printf("  gemm1 ok\n");
  std::fflush(stdout);
  cuda::moe_gemm1_fp8_activation(x, int(k), r.plan, w13, act, buf, s);
  s.synchronize();
  std::printf("  gemm1_activation ok\n");
  std::fflush(stdout);
  cuda::moe_gemm2_fp8(a, r.plan, w2, Tensor(), o, buf, s);
  s.synchronize();
  std::printf("  gemm2 ok\n");
}

// --- timings (disabled by default; --gtest_also_run_disabled_tests --gtest_filter='*Fp8*Perf*')

double graph_us(const Stream& s, int reps, const std::function<void()>& body) {
  const double ms = test::graph_replay_median_ms(
      s,
      [&] {
        for (int i = 0; i < reps; ++i) body();
      },
      /*warmup=*/3, /*timed=*/15);
  return 1000.0 * ms / reps;
}

TEST(CudaFp8BlockPerf, DISABLED_QwenShape) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  const MoeShape sh = MoeShape::by_name("qwen3-30b-a3b");
  const Device d = Device::cuda();
  const int k = sh.top_k, E = sh.num_experts;
  const int64_t H = sh.hidden, I = sh.inter;
  MoeWeights w;
  w.format = WeightFormat::fp8_block;
  w.w13 = quant::random_experts(WeightFormat::fp8_block, E, 2 * I, H, 128, 0.05f, 1, d, s);
  w.w2 = quant::random_experts(WeightFormat::fp8_block, E, H, I, 128, 0.05f, 2, d, s);
  MoeRunnerConfig rc;
  rc.shape = sh, rc.router = sh.default_router(), rc.device = d, rc.max_tokens = 256;
  rc.format = WeightFormat::fp8_block;
  MoeRunner runner(rc);
  MoeLoraPool pool(sh, 1, 16, d);
  // Codes plus f32 block scales of one expert (w13 and w2).
  const double expert_bytes =
      3.0 * double(H) * double(I) + 4.0 * double(((2 * I + 127) / 128) * ((H + 127) / 128) +
                                                 ((H + 127) / 128) * ((I + 127) / 128));
  std::printf("%-5s %7s %9s %9s %9s %9s %9s %7s %9s %9s\n", "M", "touched", "floor_us", "gemm1_us",
              "gemm1act", "gemm2_us", "mlp_us", "%roof", "layer_us", "lora_us");
  for (int64_t m : {1, 16, 64, 256}) {
    constexpr int kCalls = 8;  // different routings per graph: weights stream from HBM
    std::vector<MoeInputs> ins;
    std::vector<Tensor> ys;
    std::vector<TopK> tks;
    std::vector<Tensor> sws;  // slot weights [M*k]
    std::vector<MoeAlignment> plans;
    double touched = 0;
    for (int c = 0; c < kCalls; ++c) {
      ins.push_back({test::random_tensor({m, H}, DType::bf16, rng).to(d),
                     test::random_tensor({m, E}, DType::f32, rng, -3, 3).to(d), Tensor()});
      ys.push_back(Tensor::empty({m, H}, DType::bf16, d));
      TopK tk{Tensor::empty({m, k}, DType::i32, d), Tensor::empty({m, k}, DType::f32, d)};
      MoeAlignment plan = MoeAlignment::allocate(m * k, E, kMaxBlockM, d);
      plan.block_m = cuda::moe_block_m(m, sh);
      cuda::moe_route(ins.back().router_logits, Tensor(), rc.router, tk, s);
      cuda::moe_align(tk.ids, plan, s);
      s.synchronize();
      const auto ids = test::to_ints(tk.ids);
      touched += double(std::set<int32_t>(ids.begin(), ids.end()).size()) / kCalls;
      tks.push_back(tk);
      sws.push_back(tk.weights.view({m * k}));
      plans.push_back(plan);
    }
    Tensor h = Tensor::empty({m * k, 2 * I}, DType::f32, d);
    Tensor a = test::random_tensor({m * k, I}, DType::bf16, rng).to(d);
    Tensor o = Tensor::empty({m * k, H}, DType::f32, d);
    cuda::Fp8ActBuffer xb = cuda::Fp8ActBuffer::allocate(m, H, d);
    cuda::Fp8ActBuffer ab = cuda::Fp8ActBuffer::allocate(m * k, I, d);
    auto each = [&](const std::function<void(int)>& f) {
      return graph_us(s, 1,
                      [&] {
                        for (int c = 0; c < kCalls; ++c) f(c);
                      }) /
             kCalls;
    };
    const double tq = each([&](int c) { cuda::fp8_quantize_act(ins[c].x, xb, s); });
    const double t1 =
        each([&](int c) { cuda::moe_gemm1_fp8(ins[c].x, k, plans[c], w.w13, h, xb, s); });
    const double t1a = each(
        [&](int c) { cuda::moe_gemm1_fp8_activation(ins[c].x, k, plans[c], w.w13, a, xb, s); });
    const double t2 =
        each([&](int c) { cuda::moe_gemm2_fp8(a, plans[c], w.w2, sws[c], o, ab, s); });
    const double tm = each([&](int c) {
      cuda::moe_gemm1_fp8_activation(ins[c].x, k, plans[c], w.w13, a, xb, s);
      cuda::moe_gemm2_fp8(a, plans[c], w.w2, sws[c], o, ab, s);
    });
    const double tl =
        each([&](int c) { runner.run(ins[size_t(c)], w, nullptr, ys[size_t(c)], s); });
    // LoRA r16 x 1 adapter through the hooks.
    MoeLoraSlotMeta meta{32, 16, 0, 16, 16, 16};
    const int32_t mv[6] = {meta.shrink_rank, meta.gate_rank, meta.gate_col,
                           meta.up_rank,     meta.up_col,    meta.down_rank};
    Tensor meta_row = pool.slot_meta().narrow(0, 0, 1);
    meta_row.copy_from(test::from_ints(std::vector<int32_t>(mv, mv + 6), {1, 6}));
    auto hooks = MoeLoraHooks::create(pool, rc.max_tokens);
    Tensor ts = test::random_ints({m}, rng, 0, 0).to(d);
    hooks->bind(LoraBatch{ts});
    const double tlora =
        each([&](int c) { runner.run(ins[size_t(c)], w, hooks.get(), ys[size_t(c)], s); });
    // Row-tile sweep of the fused gemm1 and of gemm2 (heuristic grid order).
    std::printf("      rows:");
    for (int rows : {32, 64, 128}) {
      const cuda::MoeGemmConfig cfg{rows, true, false, plans[0].block_m >= 32};
      const double g1 = each([&](int c) {
        cuda::moe_gemm1_fp8_tiled(ins[c].x, k, plans[c], w.w13, a, true, xb, s, cfg);
      });
      const double g2 =
          each([&](int c) { cuda::moe_gemm2_fp8_tiled(a, plans[c], w.w2, sws[c], o, ab, s, cfg); });
      std::printf("  %d: g1act %.2f g2 %.2f", rows, g1, g2);
    }
    std::printf("  quantize x %.2f\n", tq);
    const double floor_us = touched * expert_bytes / 3.0e12 * 1e6;
    std::printf("%-5ld %7.1f %9.2f %9.2f %9.2f %9.2f %9.2f %6.1f%% %9.2f %9.2f\n", long(m), touched,
                floor_us, t1, t1a, t2, tm, 100.0 * floor_us / tm, tl, tlora);
  }
}

}  // namespace
}  // namespace moelora
