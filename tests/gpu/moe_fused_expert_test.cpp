// The fused no-seam expert path on CUDA: gemm1 with the activation in its epilogue must give
// exactly (bit for bit) what gemm1 -> moe_activation gives, and a LoRA batch's base tokens
// (staged path, hooks on) must equal a LoRA-off run (fused path) bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include <cuda_runtime_api.h>

#include "gpu_op_test_util.h"
#include "kernels/cpu/moe_ops.h"
#include "kernels/cuda/moe_gemm_config.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"

namespace moelora {
namespace {

using test::to_gpu;

std::vector<uint16_t> bits16(const Tensor& t) {
  Tensor h = t.to(Device::cpu());
  std::vector<uint16_t> v(h.numel());
  std::memcpy(v.data(), h.data(), v.size() * 2);
  return v;
}

struct FusedCase {
  int64_t m;
  int top_k, groups, hidden, inter;
  int block_m = 0;  // 0: heuristic
  int rows = 0;     // 0: heuristic tile
  bool holes = true;
};

void run_fused_case(const FusedCase& c) {
  SCOPED_TRACE(::testing::Message()
               << "M=" << c.m << " k=" << c.top_k << " G=" << c.groups << " H=" << c.hidden
               << " I=" << c.inter << " block_m=" << c.block_m << " rows=" << c.rows);
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t M = c.m, k = c.top_k, H = c.hidden, I = c.inter, S = M * k;
  MoeShape shape{"test", c.hidden, c.inter, c.groups, c.top_k};
  const int block_m = c.block_m ? c.block_m : cuda::moe_block_m(M, shape);
  // Distinct experts per token, some -1 (not here).
  Tensor ids = Tensor::empty({M, k}, DType::i32);
  std::vector<int32_t> perm(c.groups);
  for (int g = 0; g < c.groups; ++g) perm[g] = g;
  for (int64_t t = 0; t < M; ++t) {
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < k; ++j)
      ids.data<int32_t>()[t * k + j] = c.holes && rng() % 5 == 0 ? -1 : perm[j % c.groups];
  }
  const float a13 = 2.0f / std::sqrt(float(H));
  Tensor x = test::random_tensor({M, H}, DType::bf16, rng);
  Tensor w13 = test::random_tensor({c.groups, 2 * I, H}, DType::bf16, rng, -a13, a13);

  Stream s = Stream::create(Device::cuda());
  Tensor dids = to_gpu(ids), dx = to_gpu(x), dw13 = to_gpu(w13);
  MoeAlignment plan = test::poisoned_plan(S, c.groups, block_m, Device::cuda());
  cuda::moe_align(dids, plan, s);
  Tensor h = test::poisoned({S, 2 * I}, DType::f32, Device::cuda(), test::kPoisonFloat);
  Tensor a_staged = test::poisoned({S, I}, DType::bf16, Device::cuda(), test::kPoisonFloat);
  Tensor a_fused = test::poisoned({S, I}, DType::bf16, Device::cuda(), test::kPoisonFloat);
  cuda::MoeGemmConfig cfg{c.rows ? c.rows : 64, true};
  if (c.rows) {
    cuda::moe_gemm1_tiled(dx, c.top_k, plan, dw13, h, s, cfg);
    cuda::moe_gemm1_activation_tiled(dx, c.top_k, plan, dw13, a_fused, s, cfg);
  } else {
    cuda::moe_gemm1(dx, c.top_k, plan, dw13, h, s);
    cuda::moe_gemm1_activation(dx, c.top_k, plan, dw13, a_fused, s);
  }
  cuda::moe_activation(h, dids, a_staged, s);
  s.synchronize();

  // Bit-identical on every routed slot; untouched (still poison) on the others.
  const auto got = bits16(a_fused), want = bits16(a_staged);
  int64_t mismatches = 0, touched_dead = 0;
  for (int64_t slot = 0; slot < S; ++slot)
    for (int64_t col = 0; col < I; ++col) {
      const int64_t i = slot * I + col;
      if (ids.data<int32_t>()[slot] >= 0)
        mismatches += got[i] != want[i];
      else
        touched_dead += got[i] != 0xFFFF;
    }
  EXPECT_EQ(mismatches, 0) << "fused activation differs from gemm1 -> moe_activation";
  EXPECT_EQ(touched_dead, 0) << "rows of slots routed nowhere were written";

  // And against the CPU reference ops.
  if (S * I * H <= (int64_t(1) << 26)) {
    MoeAlignment hplan = MoeAlignment::allocate(S, c.groups, kMaxBlockM, Device::cpu());
    hplan.block_m = block_m;
    cpu::moe_align(ids, hplan, Stream());
    Tensor hr = Tensor::empty({S, 2 * I}, DType::f32), ar = Tensor::empty({S, I}, DType::bf16);
    cpu::moe_gemm1(x, c.top_k, hplan, w13, hr, Stream());
    cpu::moe_activation(hr, ids, ar, Stream());
    std::vector<float> g, r;
    const auto gf = test::to_floats(a_fused), rf = test::to_floats(ar);
    for (int64_t slot = 0; slot < S; ++slot)
      if (ids.data<int32_t>()[slot] >= 0)
        for (int64_t col = 0; col < I; ++col) {
          g.push_back(gf[slot * I + col]);
          r.push_back(rf[slot * I + col]);
        }
    EXPECT_TRUE(test::allclose(g, r, 1e-2, 1e-2));
  }
}

TEST(CudaMoeFusedExpert, ActivationEpilogueIsBitIdentical) {
  MOELORA_REQUIRE_GPU();
  for (int64_t m : {1, 7, 64, 257, 1024}) run_fused_case({m, 4, 16, 128, 64});
  // I = 72: partial column tiles; H = 200: a K tail; every tile and odd block sizes.
  for (int rows : {32, 64, 128})
    for (int bm : {1, 8, 13, 32, 64, 128}) run_fused_case({50, 3, 5, 200, 72, bm, rows});
  run_fused_case({5, 8, 128, 2048, 768});  // qwen3-30b-a3b
  run_fused_case({256, 8, 128, 2048, 768});
  run_fused_case({6, 1, 1, 2048, 1408, 0, 0, false});  // a shared expert: G = 1, k = 1
}

TEST(CudaMoeFusedExpert, RejectsBadOutput) {
  MOELORA_REQUIRE_GPU();
  Stream s = Stream::create(Device::cuda());
  MoeAlignment plan = test::poisoned_plan(8, 4, 8, Device::cuda());
  Tensor x = Tensor::zeros({4, 64}, DType::bf16, Device::cuda());
  Tensor w13 = Tensor::zeros({4, 32, 64}, DType::bf16, Device::cuda());
  Tensor a_f32 = Tensor::zeros({8, 16}, DType::f32, Device::cuda());
  Tensor a_wide = Tensor::zeros({8, 32}, DType::bf16, Device::cuda());
  EXPECT_THROW(cuda::moe_gemm1_activation(x, 2, plan, w13, a_f32, s), Error);
  EXPECT_THROW(cuda::moe_gemm1_activation(x, 2, plan, w13, a_wide, s), Error);
}

// Base tokens of a mixed LoRA batch (hooks: staged gemm1 -> seam -> activation -> gemm2 ->
// seam) equal a LoRA-off run (no hooks: the fused path) bit for bit, shared expert included.
TEST(CudaMoeFusedExpert, BaseTokensMatchLoraOffRun) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  MoeShape sh;
  sh.name = "small-shared", sh.hidden = 256, sh.inter = 128, sh.num_experts = 16, sh.top_k = 4;
  sh.shared_inter = 128;
  const int64_t E = sh.num_experts, H = sh.hidden, I = sh.inter;
  MoeRunnerConfig cfg;
  cfg.shape = sh, cfg.router = RouterConfig::softmax_topk(16, 4, true);
  cfg.device = Device::cuda(), cfg.max_tokens = 300;
  MoeRunner runner(cfg);
  MoeWeights w;
  w.w13 = to_gpu(test::random_tensor({E, 2 * I, H}, DType::bf16, rng, -0.1f, 0.1f));
  w.w2 = to_gpu(test::random_tensor({E, H, I}, DType::bf16, rng, -0.1f, 0.1f));
  w.shared_w13 = to_gpu(test::random_tensor({1, 2 * I, H}, DType::bf16, rng, -0.1f, 0.1f));
  w.shared_w2 = to_gpu(test::random_tensor({1, H, I}, DType::bf16, rng, -0.1f, 0.1f));
  MoeLoraPool pool(sh, 2, 16, Device::cuda());
  auto r = [&](const Shape& shp) { return test::random_tensor(shp, DType::f32, rng, -0.5f, 0.5f); };
  MoeLoraWeights lw;
  lw.gate_up_a = r({E, 16, H}), lw.gate_up_b = r({E, 2 * I, 16});
  lw.down_a = r({E, 8, I}), lw.down_b = r({E, H, 8});
  pool.load(0, lw);
  auto hooks = MoeLoraHooks::create(pool, cfg.max_tokens);
  for (int64_t m : {1, 7, 64, 257}) {
    SCOPED_TRACE(::testing::Message() << "M=" << m);
    Tensor x = to_gpu(test::random_tensor({m, H}, DType::bf16, rng));
    Tensor logits = to_gpu(test::random_tensor({m, E}, DType::f32, rng, -3.0f, 3.0f));
    Tensor slots = test::random_ints({m}, rng, -1, 0);
    Tensor y_off = test::poisoned({m, H}, DType::bf16, Device::cuda(), test::kPoisonFloat);
    Tensor y_on = test::poisoned({m, H}, DType::bf16, Device::cuda(), test::kPoisonFloat);
    runner.run({x, logits, Tensor()}, w, nullptr, y_off, s);
    hooks->bind(LoraBatch{to_gpu(slots)});
    runner.run({x, logits, Tensor()}, w, hooks.get(), y_on, s);
    s.synchronize();
    const auto off = bits16(y_off), on = bits16(y_on);
    int64_t base = 0, mismatches = 0;
    for (int64_t t = 0; t < m; ++t) {
      if (slots.data<int32_t>()[t] >= 0) continue;
      ++base;
      for (int64_t c = 0; c < H; ++c) mismatches += off[t * H + c] != on[t * H + c];
    }
    EXPECT_EQ(mismatches, 0) << "base tokens differ between LoRA-on and LoRA-off (" << base
                             << " base tokens)";
  }
}

// Median µs per layer of `body(l)` for l = 0..7 captured in one graph and replayed.
double layer_graph_us(const Stream& s, const std::function<void(int)>& body) {
  const double ms = test::graph_replay_median_ms(
      s, [&] { for (int l = 0; l < 8; ++l) body(l); }, /*warmup=*/3, /*timed=*/12);
  return 1000.0 * ms / 8;
}

// gemm1 -> activation -> gemm2 of qwen3-30b-a3b, 8 layers with their own weights and routings
// per graph: staged vs fused activation, each grid order, gemm2 with and without plan_ready.
TEST(CudaMoeFusedExpertPerf, DISABLED_ExpertMlpVariants) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  const MoeShape sh = MoeShape::by_name("qwen3-30b-a3b");
  const RouterConfig rc = sh.default_router();
  const Device d = Device::cuda();
  const int64_t E = sh.num_experts, H = sh.hidden, I = sh.inter, k = sh.top_k, maxm = 256;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  std::vector<Tensor> w13, w2, x, h, a, o;
  for (int l = 0; l < 8; ++l) {
    w13.push_back(Tensor::empty({E, 2 * I, H}, DType::bf16, d));
    w2.push_back(Tensor::empty({E, H, I}, DType::bf16, d));
    w13.back().fill_bytes(0x3C);
    w2.back().fill_bytes(0x3C);
    x.push_back(test::random_tensor({maxm, H}, DType::bf16, rng).to(d));
    h.push_back(Tensor::empty({maxm * k, 2 * I}, DType::f32, d));
    a.push_back(Tensor::empty({maxm * k, I}, DType::bf16, d));
    o.push_back(Tensor::empty({maxm * k, H}, DType::f32, d));
  }
  test::device_sync();
  std::printf("%-5s %9s %9s %9s %9s %9s %9s\n", "M", "staged", "f/x/-", "f/x/pr", "f/y/-", "f/y/pr",
              "staged/y");
  for (int64_t m : {1, 4, 16, 64, 128, 256}) {
    const int64_t n = m * k;
    std::vector<TopK> topk;
    std::vector<MoeAlignment> plan;
    for (int l = 0; l < 8; ++l) {
      Tensor logits = test::random_tensor({m, E}, DType::f32, rng, -3, 3).to(d);
      topk.push_back({Tensor::empty({m, k}, DType::i32, d), Tensor::empty({m, k}, DType::f32, d)});
      plan.push_back(MoeAlignment::allocate(n, int(E), kMaxBlockM, d));
      plan.back().block_m = cuda::moe_block_m(m, sh);
      cuda::moe_route(logits, Tensor(), rc, topk.back(), s);
      cuda::moe_align(topk.back().ids, plan.back(), s);
      s.synchronize();
    }
    const cuda::MoeGemmConfig base =
        cuda::moe_gemm_config(2 * I, H, plan[0].block_m, n, int(E), sms);
    auto run = [&](bool fused, bool y_order, bool ready) {
      cuda::MoeGemmConfig c1 = base,
                          c2 = cuda::moe_gemm_config(H, I, plan[0].block_m, n, int(E), sms);
      c1.row_tiles_fastest = c2.row_tiles_fastest = y_order;
      c2.plan_ready = ready;
      return layer_graph_us(s, [&](int l) {
        Tensor hl = h[l].first_rows(n), al = a[l].first_rows(n), ol = o[l].first_rows(n);
        const Tensor xl = x[l].first_rows(m);
        if (fused) {
          cuda::moe_gemm1_activation_tiled(xl, int(k), plan[l], w13[l], al, s, c1);
        } else {
          cuda::moe_gemm1_tiled(xl, int(k), plan[l], w13[l], hl, s, c1);
          cuda::moe_activation(hl, topk[l].ids, al, s);
        }
        cuda::moe_gemm2_tiled(al, plan[l], w2[l], topk[l].weights.view({n}), ol, s, c2);
      });
    };
    std::printf("%-5ld %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f\n", long(m), run(false, false, false),
                run(true, false, false), run(true, false, true), run(true, true, false),
                run(true, true, true), run(false, true, false));
  }
}

}  // namespace
}  // namespace moelora
