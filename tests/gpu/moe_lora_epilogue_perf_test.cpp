// Timings (not assertions) of the LoRA fast path's kernels at the qwen3-30b-a3b shape: graphs
// of 8 layers with distinct expert weights, LoRA pools and routings (weights stream from HBM),
// per-layer µs, one stream:
//   none   gemm1+activation -> gemm2                                  (the LoRA-off kernels)
//   fast   shrink13 -> gemm1+activation+LoRA -> shrink2 -> gemm2+LoRA  (moe_lora_epilogue.h)
//   hooks  shrink13 -> gemm1 -> expand13 -> activation -> shrink2 -> gemm2 -> expand2 (the hook
//          path's kernels serialized; the hooks hide part of the shrinks on a side stream)
// and each piece alone. Run with
//   moelora_gpu_tests --gtest_also_run_disabled_tests --gtest_filter='*EpiloguePerf*'
#include <cstdio>
#include <functional>
#include <memory>
#include <vector>

#include "gpu_op_test_util.h"
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_lora_epilogue.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/lora/moe_lora.h"

namespace moelora {
namespace {

constexpr int kLayers = 8;

double graph_us(const Stream& s, const std::function<void()>& body) {
  return 1000.0 * test::graph_replay_median_ms(s, body, /*warmup=*/3, /*timed=*/15) / kLayers;
}

void set_meta(const MoeLoraPool& pool, int slot, const MoeLoraSlotMeta& m) {
  const int32_t v[6] = {m.shrink_rank, m.gate_rank, m.gate_col, m.up_rank, m.up_col, m.down_rank};
  pool.slot_meta().narrow(0, slot, 1).copy_from(
      test::from_ints(std::vector<int32_t>(v, v + 6), {1, 6}));
}

struct Layer {
  Tensor w13, w2, x, ts, h, a, o, u13s, u2s, u13h, u2h;
  TopK topk;
  MoeAlignment plan, vplan_s, vplan_h;
  std::unique_ptr<MoeLoraPool> pool;
};

TEST(CudaMoeLoraEpiloguePerf, DISABLED_EpiloguePerf) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  const Device d = Device::cuda();
  Stream s = Stream::create(d);
  const MoeShape sh = MoeShape::by_name("qwen3-30b-a3b");
  const RouterConfig rcfg = sh.default_router();
  const int k = sh.top_k, E = sh.num_experts;
  const int64_t H = sh.hidden, I = sh.inter;
  std::vector<Layer> L(kLayers);
  for (Layer& l : L) {
    l.w13 = Tensor::empty({E, 2 * I, H}, DType::bf16, d);
    l.w2 = Tensor::empty({E, H, I}, DType::bf16, d);
    l.w13.fill_bytes(0x3C);
    l.w2.fill_bytes(0x3C);
  }
  struct Setting {
    const char* name;
    int rank, adapters;
  };
  const Setting settings[] = {{"r16x1", 16, 1}, {"r16x4", 16, 4}, {"r64x1", 64, 1}};
  std::printf("%-5s %-6s %8s %8s %8s | %7s %7s %7s %7s | %7s %7s %7s %7s | %5s %5s\n", "M",
              "lora", "none", "fast", "hooks", "s13old", "s13new", "s2old", "s2new", "g1", "g1lora",
              "g2", "g2lora", "fast%", "hook%");
  for (int64_t m : {int64_t(1), int64_t(16), int64_t(64), int64_t(256)}) {
    const int64_t n = m * k;
    for (Layer& l : L) {
      l.x = test::random_tensor({m, H}, DType::bf16, rng).to(d);
      const Tensor logits = test::random_tensor({m, E}, DType::f32, rng, -3, 3).to(d);
      l.topk = {Tensor::empty({m, k}, DType::i32, d), Tensor::empty({m, k}, DType::f32, d)};
      l.plan = MoeAlignment::allocate(n, E, kMaxBlockM, d);
      l.plan.block_m = cuda::moe_block_m(m, sh);
      cuda::moe_route_align(logits, Tensor(), rcfg, l.topk, l.plan, s);
      l.h = Tensor::empty({n, 2 * I}, DType::f32, d);
      l.a = Tensor::empty({n, I}, DType::bf16, d);
      l.o = Tensor::empty({n, H}, DType::f32, d);
    }
    s.synchronize();
    auto gemm1 = [&](Layer& l) { cuda::moe_gemm1_activation(l.x, k, l.plan, l.w13, l.a, s); };
    auto gemm2 = [&](Layer& l) {
      cuda::moe_gemm2_plan_ready(l.a, l.plan, l.w2, l.topk.weights.view({n}), l.o, s);
    };
    const double t_none = graph_us(s, [&] {
      for (Layer& l : L) gemm1(l), gemm2(l);
    });
    const double t_g1 = graph_us(s, [&] { for (Layer& l : L) gemm1(l); });
    const double t_g2 = graph_us(s, [&] { for (Layer& l : L) gemm2(l); });

    for (const Setting& st : settings) {
      const int r = st.rank;
      const int splits_s = cuda::moe_lora_stream_splits(m, k, E);
      const int splits_h = cuda::moe_lora_shrink_splits(n);
      for (Layer& l : L) {
        l.pool = std::make_unique<MoeLoraPool>(sh, st.adapters, r, d);
        for (int i = 0; i < st.adapters; ++i) set_meta(*l.pool, i, {2 * r, r, 0, r, r, r});
        l.ts = test::random_ints({m}, rng, 0, st.adapters - 1).to(d);
        l.vplan_s = MoeAlignment::allocate(n, st.adapters * E, kMaxBlockM, d);
        l.vplan_s.block_m = cuda::moe_lora_stream_block_m(m, k, E);
        l.vplan_h = MoeAlignment::allocate(n, st.adapters * E, kMaxBlockM, d);
        l.vplan_h.block_m = cuda::moe_lora_block_m(m, k);
        cuda::moe_lora_align(l.topk.ids, l.ts, E, l.vplan_s, s);
        cuda::moe_lora_align(l.topk.ids, l.ts, E, l.vplan_h, s);
        l.u13s = Tensor::zeros({8 * n, 2 * r}, DType::f32, d);
        l.u2s = Tensor::zeros({8 * n, r}, DType::f32, d);
        l.u13h = Tensor::zeros({splits_h * n, 2 * r}, DType::f32, d);
        l.u2h = Tensor::zeros({splits_h * n, r}, DType::f32, d);
      }
      s.synchronize();
      auto s13_with = [&](Layer& l, int splits) {
        Tensor u = l.u13s.first_rows(splits * n);
        cuda::moe_lora_shrink_stream(l.x, k, l.vplan_s, l.pool->a13(), l.pool->slot_meta(),
                                     LoraSeam::gate_up, splits, u, s);
      };
      auto s2_with = [&](Layer& l, int splits) {
        Tensor u = l.u2s.first_rows(splits * n);
        cuda::moe_lora_shrink_stream(l.a, 1, l.vplan_s, l.pool->a2(), l.pool->slot_meta(),
                                     LoraSeam::down, splits, u, s);
      };
      auto s13_new = [&](Layer& l) { s13_with(l, splits_s); };
      auto s2_new = [&](Layer& l) { s2_with(l, splits_s); };
      auto s13_old = [&](Layer& l) {
        cuda::moe_lora_shrink_split(l.x, k, l.vplan_h, l.pool->a13(), l.pool->slot_meta(),
                                    LoraSeam::gate_up, splits_h, l.u13h, s);
      };
      auto s2_old = [&](Layer& l) {
        cuda::moe_lora_shrink_split(l.a, 1, l.vplan_h, l.pool->a2(), l.pool->slot_meta(),
                                    LoraSeam::down, splits_h, l.u2h, s);
      };
      auto g1_lora = [&](Layer& l) {
        cuda::moe_gemm1_activation_lora(l.x, k, l.plan, l.w13,
                                        {l.ts, l.u13s.first_rows(splits_s * n), splits_s,
                                         l.pool->b13(), l.pool->slot_meta()},
                                        l.a, s);
      };
      auto g2_lora = [&](Layer& l) {
        cuda::moe_gemm2_lora(
            l.a, k, l.plan, l.w2, l.topk.weights.view({n}),
            {l.ts, l.u2s.first_rows(splits_s * n), splits_s, l.pool->b2(), l.pool->slot_meta()},
            l.o, s, /*plan_ready=*/true);
      };
      const double t_fast = graph_us(s, [&] {
        for (Layer& l : L) s13_new(l), g1_lora(l), s2_new(l), g2_lora(l);
      });
      const double t_hooks = graph_us(s, [&] {
        for (Layer& l : L) {
          s13_old(l);
          cuda::moe_gemm1(l.x, k, l.plan, l.w13, l.h, s);
          cuda::moe_lora_expand_split(l.u13h, splits_h, l.vplan_h, l.pool->b13(),
                                      l.pool->slot_meta(), LoraSeam::gate_up, Tensor(), l.h, s);
          cuda::moe_activation(l.h, l.topk.ids, l.a, s);
          s2_old(l);
          cuda::moe_gemm2(l.a, l.plan, l.w2, l.topk.weights.view({n}), l.o, s);
          cuda::moe_lora_expand_split(l.u2h, splits_h, l.vplan_h, l.pool->b2(),
                                      l.pool->slot_meta(), LoraSeam::down,
                                      l.topk.weights.view({n}), l.o, s);
        }
      });
      const double t_s13o = graph_us(s, [&] { for (Layer& l : L) s13_old(l); });
      const double t_s13n = graph_us(s, [&] { for (Layer& l : L) s13_new(l); });
      const double t_s2o = graph_us(s, [&] { for (Layer& l : L) s2_old(l); });
      const double t_s2n = graph_us(s, [&] { for (Layer& l : L) s2_new(l); });
      const double t_g1l = graph_us(s, [&] { for (Layer& l : L) g1_lora(l); });
      const double t_g2l = graph_us(s, [&] { for (Layer& l : L) g2_lora(l); });
      std::printf(
          "%-5ld %-6s %8.2f %8.2f %8.2f | %7.2f %7.2f %7.2f %7.2f | %7.2f %7.2f %7.2f %7.2f | "
          "%5.3f %5.3f\n",
          long(m), st.name, t_none, t_fast, t_hooks, t_s13o, t_s13n, t_s2o, t_s2n, t_g1, t_g1l,
          t_g2, t_g2l, t_none / t_fast, t_none / t_hooks);
      // The stream shrink's K splits, and the hook kernel on the stream plan (block_m effect).
      std::printf("      sweep (splits 1/2/4/8) s13 ");
      for (int sp : {1, 2, 4, 8}) std::printf("%7.2f", graph_us(s, [&] { for (Layer& l : L) s13_with(l, sp); }));
      std::printf("  s2 ");
      for (int sp : {1, 2, 4, 8}) std::printf("%7.2f", graph_us(s, [&] { for (Layer& l : L) s2_with(l, sp); }));
      const double t_old_on_s = graph_us(s, [&] {
        for (Layer& l : L) {
          Tensor u = l.u13s.first_rows(splits_h * n);
          cuda::moe_lora_shrink_split(l.x, k, l.vplan_s, l.pool->a13(), l.pool->slot_meta(),
                                      LoraSeam::gate_up, splits_h, u, s);
        }
      });
      std::printf("  s13 hook kernel on stream plan %7.2f (splits %d, stream splits %d)\n",
                  t_old_on_s, splits_h, splits_s);
      std::fflush(stdout);
    }
    for (Layer& l : L) l.pool.reset();
  }
}

}  // namespace
}  // namespace moelora
