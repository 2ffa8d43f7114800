// cuda_fp8_block's inline LoRA (MoeLoraHooksOptions::inline_max_tokens: the seams' deltas
// computed by extra CTAs of the fp8 expert GEMM grids): the whole layer against the reference
// backend and the staged hooks, eager and under graph replay, and the op's argument checks.
#include <utility>
#include <vector>

#include "fp8_test_util.h"
#include "gpu_op_test_util.h"
#include "kernels/cuda/moe_fp8_ops.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"

namespace moelora {
namespace {

using test::fp8_layer_cases;
using test::fp8_stack;
using test::fp8_weights;
using test::Fp8LayerCase;
using test::on_gpu;
using test::route;
using test::Routed;
using test::to_gpu;

// The inline LoRA path (MoeLoraHooksOptions::inline_max_tokens: both deltas computed by extra
// CTAs of the fp8 expert GEMM grids, added in the activation and the reduction): against the
// reference backend, against the staged hooks on the same GPU runner, eager and replayed from a
// graph with new inputs and a new adapter mix; base tokens bit-identical to a LoRA-off run.
// Four adapters of ranks 8 / 16 / 32 / 64 (separate and fused gate_up, one without down, one
// rank 64 past one 32-rank pass), r_max 64, base rows mixed in; column splits 1-3 and K
// splits (partial deltas) 1 (by batch size here), 2 and 4.
void load_four_adapters(const MoeShape& s, std::mt19937_64& rng, MoeLoraPool& cpu_pool,
                        MoeLoraPool& gpu_pool) {
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  auto r = [&](const Shape& sh) { return test::random_tensor(sh, DType::f32, rng, -0.3f, 0.3f); };
  MoeLoraWeights w8, w16, w32, w64;
  w8.gate_a = r({E, 8, H}), w8.gate_b = r({E, I, 8}), w8.up_a = r({E, 8, H}),
  w8.up_b = r({E, I, 8});
  w8.down_a = r({E, 8, I}), w8.down_b = r({E, H, 8});
  w16.gate_up_a = r({E, 16, H}), w16.gate_up_b = r({E, 2 * I, 16});  // no down
  w32.gate_a = r({E, 32, H}), w32.gate_b = r({E, I, 32}), w32.up_a = r({E, 24, H});
  w32.up_b = r({E, I, 24}), w32.down_a = r({E, 32, I}), w32.down_b = r({E, H, 32});
  w64.gate_up_a = r({E, 64, H}), w64.gate_up_b = r({E, 2 * I, 64});
  w64.down_a = r({E, 64, I}), w64.down_b = r({E, H, 64});
  w32.gate_scale = w32.up_scale = w32.down_scale = 0.5f;
  w64.gate_up_scale = w64.down_scale = lora_scaling(16, 64, false);
  int slot = 0;
  for (const MoeLoraWeights* w : {&w8, &w16, &w32, &w64}) {
    cpu_pool.load(slot, *w);
    gpu_pool.load(slot, *w);
    ++slot;
  }
}

// direct: the direct variant (MoeLoraHooksOptions::direct_max_tokens: each delta one kernel on
// the side stream, straight from the routing) in place of inline, cluster sizes 4 / 8 / 1 for
// the three split settings.
void inline_lora_layer(bool graph, bool direct = false) {
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (const Fp8LayerCase& c : fp8_layer_cases()) {
    for (int64_t m : {1, 7, 64, 257}) {
      for (const auto& [splits, k_splits] : {std::pair{1, 0}, std::pair{3, 4}, std::pair{2, 2}}) {
        SCOPED_TRACE(::testing::Message()
                     << c.shape.name << " M=" << m << " splits=" << splits
                     << " k_splits=" << k_splits << " graph=" << graph << " direct=" << direct);
        const int64_t H = c.shape.hidden;
        MoeRunnerConfig rc;
        rc.shape = c.shape, rc.router = c.router, rc.max_tokens = m;
        rc.format = WeightFormat::fp8_block;
        rc.device = Device::cpu();
        MoeRunner ref(rc);
        rc.device = Device::cuda();
        MoeRunner gpu(rc);
        const MoeWeights w = fp8_weights(c.shape, c.router.use_correction_bias, rng);
        const MoeWeights dw = on_gpu(w);
        MoeLoraPool pool_cpu(c.shape, 4, 64, Device::cpu());
        MoeLoraPool pool_gpu(c.shape, 4, 64, Device::cuda());
        load_four_adapters(c.shape, rng, pool_cpu, pool_gpu);
        auto hooks_cpu = MoeLoraHooks::create(pool_cpu, m);
        auto staged = MoeLoraHooks::create(pool_gpu, m);
        MoeLoraHooksOptions opt;
        if (direct) {
          opt.direct_max_tokens = m;
          opt.direct_cluster_size = splits == 1 ? 4 : splits == 3 ? 8 : 1;
        } else {
          opt.inline_max_tokens = m;
          opt.inline_column_splits = splits;
          opt.inline_k_splits = k_splits;
        }
        auto inl = MoeLoraHooks::create(pool_gpu, m, opt);

        auto draw = [&](Tensor& x, Tensor& logits, Tensor& gate, Tensor& slots) {
          x = test::random_tensor({m, H}, DType::bf16, rng);
          logits = test::random_tensor({m, int64_t(c.shape.num_experts)}, DType::f32, rng, -3, 3);
          gate = c.shape.shared_gate ? test::random_tensor({m}, DType::f32, rng, -2, 2) : Tensor();
          slots = test::random_ints({m}, rng, -1, 3);
        };
        Tensor x, logits, gate, slots;
        draw(x, logits, gate, slots);
        MoeInputs din{to_gpu(x), to_gpu(logits), gate.defined() ? to_gpu(gate) : Tensor()};
        Tensor dslots = to_gpu(slots);
        Tensor y = Tensor::empty({m, H}, DType::bf16, Device::cuda());
        Tensor y_base = Tensor::empty({m, H}, DType::bf16, Device::cuda());
        Tensor y_staged = Tensor::empty({m, H}, DType::bf16, Device::cuda());
        inl->bind(LoraBatch{dslots});
        staged->bind(LoraBatch{dslots});
        auto body = [&] {
          gpu.run(din, dw, inl.get(), y, s);
          gpu.run(din, dw, nullptr, y_base, s);
        };
        body();  // warm-up (one-time kernel attributes); also the eager check
        s.synchronize();
        CudaGraph g;
        if (graph) g = CudaGraph::capture(s, body);
        for (int rep = 0; rep < (graph ? 3 : 1); ++rep) {
          if (graph) {
            draw(x, logits, gate, slots);
            din.x.copy_from(x, &s);
            din.router_logits.copy_from(logits, &s);
            if (gate.defined()) din.shared_gate_logits.copy_from(gate, &s);
            dslots.copy_from(slots, &s);
            y.fill_bytes(test::kPoisonFloat, &s);
            g.replay(s);
          }
          gpu.run(din, dw, staged.get(), y_staged, s);
          s.synchronize();
          Tensor y_ref = Tensor::empty({m, H}, DType::bf16);
          hooks_cpu->bind(LoraBatch{slots});
          ref.run({x, logits, gate}, w, hooks_cpu.get(), y_ref, Stream());
          const auto yf = test::to_floats(y), yb = test::to_floats(y_base);
          EXPECT_TRUE(test::allclose(yf, test::to_floats(y_ref), 2e-2, 2e-2)) << "vs reference";
          // Same GPU GEMMs; only the LoRA delta's summation order and its one extra rounding
          // (added before SiLU / the top-k sum rather than into h / o) differ.
          EXPECT_TRUE(test::allclose(yf, test::to_floats(y_staged), 1e-2, 1e-2)) << "vs staged";
          const auto ts = test::to_ints(slots);
          for (int64_t t = 0; t < m; ++t)
            if (ts[size_t(t)] < 0)
              for (int64_t j = 0; j < H; ++j)
                ASSERT_EQ(yf[size_t(t * H + j)], yb[size_t(t * H + j)]) << "base token " << t;
        }
      }
    }
  }
}

TEST(CudaFp8Block, InlineLoraMatchesReference) {
  MOELORA_REQUIRE_GPU();
  inline_lora_layer(false);
}

TEST(CudaFp8Block, InlineLoraInGraphMatchesReference) {
  MOELORA_REQUIRE_GPU();
  inline_lora_layer(true);
}

TEST(CudaFp8Block, DirectLoraMatchesReference) {
  MOELORA_REQUIRE_GPU();
  inline_lora_layer(false, true);
}

TEST(CudaFp8Block, DirectLoraInGraphMatchesReference) {
  MOELORA_REQUIRE_GPU();
  inline_lora_layer(true, true);
}

// Bad inline LoRA seams are refused with the field named (the backend op's checks).
TEST(CudaFp8Block, InlineLoraRejectsBadSeams) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  const MoeShape sh{"t", 256, 128, 4, 2};
  const Routed r = route(4, 4, 2, 8, false, rng, s);
  const ExpertMatrices w13 = fp8_stack(4, {128, 128}, 256, rng).to(Device::cuda());
  const Tensor x = to_gpu(test::random_tensor({4, 256}, DType::bf16, rng));
  Tensor h = Tensor::empty({8, 256}, DType::f32, Device::cuda());
  cuda::Fp8ActBuffer buf = cuda::Fp8ActBuffer::allocate(8, 256, Device::cuda());
  MoeLoraPool pool(sh, 2, 16, Device::cuda());
  MoeLoraInline l;
  l.token_slot = to_gpu(test::random_ints({4}, rng, -1, 1));
  l.top_k = 2;
  l.a = pool.a13(), l.b = pool.b13(), l.meta = pool.slot_meta();
  l.delta = Tensor::empty({8, 256}, DType::f32, Device::cuda());
  cuda::moe_gemm1_fp8(x, 2, r.plan, w13, h, buf, s, &l);  // fine
  s.synchronize();
  MoeLoraInline bad = l;
  bad.delta = Tensor::empty({7, 256}, DType::f32, Device::cuda());
  test::expect_error([&] { cuda::moe_gemm1_fp8(x, 2, r.plan, w13, h, buf, s, &bad); }, "delta");
  bad = l;
  bad.a = pool.a2();
  test::expect_error([&] { cuda::moe_gemm1_fp8(x, 2, r.plan, w13, h, buf, s, &bad); }, " A");
  bad = l;
  bad.token_slot = to_gpu(test::random_ints({3}, rng, -1, 1));
  test::expect_error([&] { cuda::moe_gemm1_fp8(x, 2, r.plan, w13, h, buf, s, &bad); },
                     "token_slot");
  bad = l;
  bad.column_splits = 0;
  test::expect_error([&] { cuda::moe_gemm1_fp8(x, 2, r.plan, w13, h, buf, s, &bad); },
                     "column_splits");
  Tensor act = Tensor::empty({8, 128}, DType::bf16, Device::cuda());
  test::expect_error(
      [&] {
        cuda::moe_gemm1_fp8_tiled(x, 2, r.plan, w13, act, true, buf, s,
                                  cuda::MoeGemmConfig{64, true, false, true}, &l);
      },
      "inline LoRA needs the unfused h");
}

}  // namespace
}  // namespace moelora
