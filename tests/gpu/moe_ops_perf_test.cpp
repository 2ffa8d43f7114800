// Timings (not assertions) of the routing/alignment/elementwise/LoRA kernels and of the whole
// layer, graph-captured, at the qwen3-30b-a3b shape. Disabled by default; run with
//   moelora_gpu_tests --gtest_also_run_disabled_tests --gtest_filter='*Perf*'
#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

#include <cuda_runtime_api.h>

#include "gpu_op_test_util.h"
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"

namespace moelora {
namespace {

// Median microseconds of one `body` call: `reps` calls captured in one graph, replayed.
double graph_us(const Stream& s, int reps, const std::function<void()>& body) {
  const double ms = test::graph_replay_median_ms(
      s, [&] { for (int i = 0; i < reps; ++i) body(); }, /*warmup=*/2, /*timed=*/10);
  return 1000.0 * ms / reps;
}

// Writes slot meta directly (pool tensors stay zero: values do not matter for timing).
void set_meta(const MoeLoraPool& pool, int slot, const MoeLoraSlotMeta& m) {
  Tensor dst = pool.slot_meta().narrow(0, slot, 1);
  const int32_t v[6] = {m.shrink_rank, m.gate_rank, m.gate_col, m.up_rank, m.up_col, m.down_rank};
  dst.copy_from(test::from_ints(std::vector<int32_t>(v, v + 6), {1, 6}));
}

MoeLoraSlotMeta separate_meta(int r) { return {2 * r, r, 0, r, r, r}; }

constexpr int64_t kBatches[] = {1, 4, 16, 64, 256};

TEST(CudaMoeOpsPerf, DISABLED_Kernels) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  const MoeShape sh = MoeShape::by_name("qwen3-30b-a3b");
  const RouterConfig cfg = sh.default_router();
  const Device d = Device::cuda();
  const int k = sh.top_k, E = sh.num_experts;
  const int64_t H = sh.hidden, I = sh.inter;
  MoeLoraPool pool(sh, 4, 64, d);
  for (int i = 0; i < 4; ++i) set_meta(pool, i, separate_meta(16));
  std::printf("%-6s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s\n", "M", "route", "align",
              "rt+alg", "act", "reduce", "lora_al", "shr_gu", "exp_gu", "shr_dn", "exp_dn");
  for (int64_t m : kBatches) {
    const int64_t n = m * k;
    Tensor logits = test::random_tensor({m, E}, DType::f32, rng, -3, 3).to(d);
    TopK topk{Tensor::empty({m, k}, DType::i32, d), Tensor::empty({m, k}, DType::f32, d)};
    MoeAlignment plan = MoeAlignment::allocate(n, E, kMaxBlockM, d);
    plan.block_m = cuda::moe_block_m(m, sh);
    cuda::moe_route(logits, Tensor(), cfg, topk, s);
    Tensor h = test::random_tensor({n, 2 * I}, DType::f32, rng).to(d);
    Tensor a = Tensor::empty({n, I}, DType::bf16, d);
    Tensor o = test::random_tensor({n, H}, DType::f32, rng).to(d);
    Tensor y = Tensor::empty({m, H}, DType::bf16, d);
    Tensor x = test::random_tensor({m, H}, DType::bf16, rng).to(d);
    Tensor ts = test::random_ints({m}, rng, 0, 0).to(d);  // one adapter
    MoeAlignment vplan = MoeAlignment::allocate(n, 4 * E, kMaxBlockM, d);
    vplan.block_m = cuda::moe_lora_block_m(m, k);
    Tensor u13 = Tensor::empty({n, 128}, DType::f32, d), u2 = Tensor::empty({n, 64}, DType::f32, d);
    const int reps = 20;
    const double t_route = graph_us(s, reps, [&] { cuda::moe_route(logits, Tensor(), cfg, topk, s); });
    const double t_align = graph_us(s, reps, [&] { cuda::moe_align(topk.ids, plan, s); });
    const double t_fused =
        graph_us(s, reps, [&] { cuda::moe_route_align(logits, Tensor(), cfg, topk, plan, s); });
    const double t_act = graph_us(s, reps, [&] { cuda::moe_activation(h, topk.ids, a, s); });
    const double t_red =
        graph_us(s, reps, [&] { cuda::moe_reduce(o, topk.ids, Tensor(), Tensor(), y, s); });
    const double t_lal =
        graph_us(s, reps, [&] { cuda::moe_lora_align(topk.ids, ts, E, vplan, s); });
    const double t_sgu = graph_us(s, reps, [&] {
      cuda::moe_lora_shrink(x, k, vplan, pool.a13(), pool.slot_meta(), LoraSeam::gate_up, u13, s);
    });
    const double t_egu = graph_us(s, reps, [&] {
      cuda::moe_lora_expand(u13, vplan, pool.b13(), pool.slot_meta(), LoraSeam::gate_up, Tensor(), h, s);
    });
    const double t_sdn = graph_us(s, reps, [&] {
      cuda::moe_lora_shrink(a, 1, vplan, pool.a2(), pool.slot_meta(), LoraSeam::down, u2, s);
    });
    const double t_edn = graph_us(s, reps, [&] {
      cuda::moe_lora_expand(u2, vplan, pool.b2(), pool.slot_meta(), LoraSeam::down,
                            topk.weights.view({n}), o, s);
    });
    std::printf("%-6ld %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f\n", long(m),
                t_route, t_align, t_fused, t_act, t_red, t_lal, t_sgu, t_egu, t_sdn, t_edn);
  }
}

// The whole layer, 8 calls on different tokens and routings per graph (weights stream from
// HBM, not L2), per-layer µs; LoRA settings as the benchmark names them.
TEST(CudaMoeOpsPerf, DISABLED_Layer) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  const MoeShape sh = MoeShape::by_name("qwen3-30b-a3b");
  const Device d = Device::cuda();
  const int64_t E = sh.num_experts, H = sh.hidden, I = sh.inter;
  MoeWeights w;
  w.w13 = Tensor::empty({E, 2 * I, H}, DType::bf16, d);
  w.w2 = Tensor::empty({E, H, I}, DType::bf16, d);
  w.w13.w.fill_bytes(0x3C);
  w.w2.w.fill_bytes(0x3C);
  MoeRunnerConfig rc;
  rc.shape = sh, rc.router = sh.default_router(), rc.device = d, rc.max_tokens = 256;
  MoeRunner runner(rc);
  MoeLoraPool pool(sh, 4, 64, d);
  struct Setting {
    const char* name;
    int rank, adapters;
  };
  const Setting settings[] = {{"none", 0, 0}, {"r16x1", 16, 1}, {"r16x4", 16, 4}, {"r64x1", 64, 1}};
  std::printf("%-6s %10s %10s %10s %10s   ratios\n", "M", "none", "r16x1", "r16x4", "r64x1");
  for (int64_t m : kBatches) {
    constexpr int kCalls = 8;
    std::vector<MoeInputs> ins;
    std::vector<Tensor> ys, slots;
    for (int c = 0; c < kCalls; ++c) {
      ins.push_back({test::random_tensor({m, H}, DType::bf16, rng).to(d),
                     test::random_tensor({m, E}, DType::f32, rng, -3, 3).to(d), Tensor()});
      ys.push_back(Tensor::empty({m, H}, DType::bf16, d));
    }
    double t[4];
    for (int si = 0; si < 4; ++si) {
      const Setting& st = settings[si];
      std::unique_ptr<MoeLoraHooks> hooks;
      Tensor ts;
      if (st.rank > 0) {
        for (int i = 0; i < 4; ++i) set_meta(pool, i, separate_meta(st.rank));
        hooks = MoeLoraHooks::create(pool, rc.max_tokens);
        ts = test::random_ints({m}, rng, 0, st.adapters - 1).to(d);
        hooks->bind(LoraBatch{ts});
      }
      t[si] = graph_us(s, 1, [&] {
                for (int c = 0; c < kCalls; ++c) runner.run(ins[size_t(c)], w, hooks.get(), ys[size_t(c)], s);
              }) / kCalls;
    }
    std::printf("%-6ld %10.2f %10.2f %10.2f %10.2f   %.2f %.2f %.2f\n", long(m), t[0], t[1], t[2],
                t[3], t[0] / t[1], t[0] / t[2], t[0] / t[3]);
  }
}

}  // namespace
}  // namespace moelora
