// The whole MoE layer on CUDA (backend picked by capability) against the CPU reference runner
// on the same inputs: plain, with a shared expert (+ sigmoid gate), with LoRA hooks, and
// replayed from a captured CUDA graph with new inputs.
#include <cmath>
#include <vector>

#include <cuda_runtime_api.h>

#include "gpu_op_test_util.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"

namespace moelora {
namespace {

using test::to_gpu;

struct LayerCase {
  const char* name;
  MoeShape shape;
  RouterConfig router;
};

std::vector<LayerCase> layer_cases() {
  MoeShape base;
  base.name = "small", base.hidden = 256, base.inter = 128, base.num_experts = 16, base.top_k = 4;
  MoeShape v3 = base;
  v3.name = "small-v3", v3.num_experts = 32, v3.shared_inter = 128;
  MoeShape q2 = base;
  q2.name = "small-qwen2", q2.num_experts = 12, q2.top_k = 3, q2.shared_inter = 256;
  q2.shared_gate = true;
  return {{"softmax_renorm", base, RouterConfig::softmax_topk(16, 4, true)},
          {"v3_grouped_shared", v3, RouterConfig::deepseek_v3(32, 4, 4, 2, 2.5f)},
          {"qwen2_shared_gate", q2, RouterConfig::softmax_topk(12, 3, false)}};
}

// Random bf16 weights scaled so activations stay O(1).
MoeWeights random_weights(const MoeShape& s, const RouterConfig& r, std::mt19937_64& rng) {
  MoeWeights w;
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  const float a13 = 2.0f / std::sqrt(float(H)), a2 = 2.0f / std::sqrt(float(I));
  w.w13 = test::random_tensor({E, 2 * I, H}, DType::bf16, rng, -a13, a13);
  w.w2 = test::random_tensor({E, H, I}, DType::bf16, rng, -a2, a2);
  if (r.use_correction_bias) w.correction_bias = test::random_tensor({E}, DType::f32, rng, -0.1f, 0.1f);
  if (s.shared_inter > 0) {
    const int64_t Is = s.shared_inter;
    const float as = 2.0f / std::sqrt(float(Is));
    w.shared_w13 = test::random_tensor({1, 2 * Is, H}, DType::bf16, rng, -a13, a13);
    w.shared_w2 = test::random_tensor({1, H, Is}, DType::bf16, rng, -as, as);
  }
  return w;
}

MoeWeights on_gpu(const MoeWeights& w) {
  MoeWeights d = w;
  for (ExpertMatrices* m : {&d.w13, &d.w2, &d.shared_w13, &d.shared_w2})
    if (m->defined()) *m = m->to(Device::cuda());
  if (d.correction_bias.defined()) d.correction_bias = to_gpu(d.correction_bias);
  return d;
}

struct Inputs {
  Tensor x, logits, gate, token_slot;  // host
};

Inputs random_inputs(const MoeShape& s, int64_t m, int slots, std::mt19937_64& rng) {
  Inputs in;
  in.x = test::random_tensor({m, int64_t(s.hidden)}, DType::bf16, rng);
  in.logits = test::random_tensor({m, int64_t(s.num_experts)}, DType::f32, rng, -3.0f, 3.0f);
  if (s.shared_gate) in.gate = test::random_tensor({m}, DType::f32, rng, -2.0f, 2.0f);
  if (slots > 0) in.token_slot = test::random_ints({m}, rng, -1, slots - 1);
  return in;
}

MoeInputs as_moe_inputs(const Inputs& in) { return {in.x, in.logits, in.gate}; }

MoeRunnerConfig runner_config(const LayerCase& c, Device d, int64_t max_tokens) {
  MoeRunnerConfig cfg;
  cfg.shape = c.shape, cfg.router = c.router, cfg.device = d, cfg.max_tokens = max_tokens;
  return cfg;
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

void expect_layer_close(const Tensor& y_gpu, const Tensor& y_ref) {
  EXPECT_TRUE(test::allclose(test::to_floats(y_gpu), test::to_floats(y_ref), 1e-2, 1e-2));
}

TEST(CudaMoeLayer, MatchesReferenceRunner) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (const LayerCase& c : layer_cases()) {
    const int64_t max_tokens = 1024;
    MoeRunner ref(runner_config(c, Device::cpu(), max_tokens));
    MoeRunner gpu(runner_config(c, Device::cuda(), max_tokens));
    EXPECT_EQ(gpu.backend().name(), "cuda_bf16");
    const MoeWeights w = random_weights(c.shape, c.router, rng);
    const MoeWeights dw = on_gpu(w);
    for (bool lora : {false, true}) {
      MoeLoraPool pool_cpu(c.shape, 2, 64, Device::cpu()), pool_gpu(c.shape, 2, 64, Device::cuda());
      if (lora) load_adapters(c.shape, rng, pool_cpu, pool_gpu);
      auto hooks_cpu = MoeLoraHooks::create(pool_cpu, max_tokens);
      auto hooks_gpu = MoeLoraHooks::create(pool_gpu, max_tokens);
      for (int64_t m : {1, 7, 64, 257, 1024}) {
        if (m == 1024 && (lora || c.shape.shared_inter > 0)) continue;  // keep the CPU side fast
        SCOPED_TRACE(::testing::Message() << c.name << " lora=" << lora << " M=" << m);
        const Inputs in = random_inputs(c.shape, m, lora ? 2 : 0, rng);
        Tensor y_ref = Tensor::empty({m, int64_t(c.shape.hidden)}, DType::bf16);
        if (lora) hooks_cpu->bind(LoraBatch{in.token_slot});
        ref.run(as_moe_inputs(in), w, lora ? hooks_cpu.get() : nullptr, y_ref, Stream());

        MoeInputs din{to_gpu(in.x), to_gpu(in.logits),
                      in.gate.defined() ? to_gpu(in.gate) : Tensor()};
        Tensor y = test::poisoned({m, int64_t(c.shape.hidden)}, DType::bf16, Device::cuda(),
                                  test::kPoisonFloat);
        if (lora) hooks_gpu->bind(LoraBatch{to_gpu(in.token_slot)});
        gpu.run(din, dw, lora ? hooks_gpu.get() : nullptr, y, s);
        s.synchronize();
        EXPECT_EQ(test::to_ints(gpu.last_topk().ids), test::to_ints(ref.last_topk().ids));
        expect_layer_close(y, y_ref);
      }
    }
  }
}

// Captures run() once, then replays it with new inputs copied into the captured buffers.
TEST(CudaMoeLayer, GraphReplayWithNewInputs) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (const LayerCase& c : layer_cases()) {
    for (bool lora : {false, true}) {
      SCOPED_TRACE(::testing::Message() << c.name << " lora=" << lora);
      const int64_t m = 48;
      MoeRunner ref(runner_config(c, Device::cpu(), m));
      MoeRunner gpu(runner_config(c, Device::cuda(), m));
      const MoeWeights w = random_weights(c.shape, c.router, rng);
      const MoeWeights dw = on_gpu(w);
      MoeLoraPool pool_cpu(c.shape, 2, 64, Device::cpu()), pool_gpu(c.shape, 2, 64, Device::cuda());
      if (lora) load_adapters(c.shape, rng, pool_cpu, pool_gpu);
      auto hooks_cpu = MoeLoraHooks::create(pool_cpu, m);
      auto hooks_gpu = MoeLoraHooks::create(pool_gpu, m);

      Inputs in = random_inputs(c.shape, m, lora ? 2 : 0, rng);
      MoeInputs din{to_gpu(in.x), to_gpu(in.logits), in.gate.defined() ? to_gpu(in.gate) : Tensor()};
      Tensor dslots = lora ? to_gpu(in.token_slot) : Tensor();
      Tensor y = Tensor::empty({m, int64_t(c.shape.hidden)}, DType::bf16, Device::cuda());
      if (lora) hooks_gpu->bind(LoraBatch{dslots});
      MoeHooks* hg = lora ? hooks_gpu.get() : nullptr;
      gpu.run(din, dw, hg, y, s);  // warm-up (one-time kernel attributes)
      s.synchronize();
      const CudaGraph graph = CudaGraph::capture(s, [&] { gpu.run(din, dw, hg, y, s); });

      for (int rep = 0; rep < 3; ++rep) {
        in = random_inputs(c.shape, m, lora ? 2 : 0, rng);
        din.x.copy_from(in.x, &s);
        din.router_logits.copy_from(in.logits, &s);
        if (in.gate.defined()) din.shared_gate_logits.copy_from(in.gate, &s);
        if (lora) dslots.copy_from(in.token_slot, &s);
        y.fill_bytes(test::kPoisonFloat, &s);
        graph.replay(s);
        s.synchronize();
        Tensor y_ref = Tensor::empty({m, int64_t(c.shape.hidden)}, DType::bf16);
        if (lora) hooks_cpu->bind(LoraBatch{in.token_slot});
        ref.run(as_moe_inputs(in), w, lora ? hooks_cpu.get() : nullptr, y_ref, Stream());
        expect_layer_close(y, y_ref);
      }
    }
  }
}

// The fast LoRA path (expands folded into the activation and the reduction,
// MoeLoraHooksOptions::fused_max_tokens), the overlap path (deltas computed on the side
// stream, added in the activation and the reduction, overlap_max_tokens) and the direct path
// (as overlap, each delta one kernel from the routing, direct_max_tokens; cluster sizes 1, 2,
// 8 in turn): against the CPU reference, eager and under graph replay with new inputs and a
// new adapter mix each time; base tokens bit-identical to a LoRA-off run of the same GPU
// runner.
enum class FastVariant { fused, overlap, direct };

void fused_lora_layer(bool graph, FastVariant variant = FastVariant::fused) {
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (const LayerCase& c : layer_cases()) {
    for (int64_t m : {1, 7, 64, 257}) {
      const int cluster = 1 << (m % 4);  // direct: 2, 8, 1, 2 CTAs over M = 1, 7, 64, 257
      SCOPED_TRACE(::testing::Message() << c.name << " M=" << m << " graph=" << graph
                                        << " variant=" << int(variant) << " cluster=" << cluster);
      MoeRunner ref(runner_config(c, Device::cpu(), m));
      MoeRunner gpu(runner_config(c, Device::cuda(), m));
      const MoeWeights w = random_weights(c.shape, c.router, rng);
      const MoeWeights dw = on_gpu(w);
      MoeLoraPool pool_cpu(c.shape, 2, 64, Device::cpu()), pool_gpu(c.shape, 2, 64, Device::cuda());
      load_adapters(c.shape, rng, pool_cpu, pool_gpu);
      auto hooks_cpu = MoeLoraHooks::create(pool_cpu, m);
      MoeLoraHooksOptions fast;
      if (variant == FastVariant::fused) fast.fused_max_tokens = m;
      if (variant == FastVariant::overlap) fast.overlap_max_tokens = m;
      if (variant == FastVariant::direct) {
        fast.direct_max_tokens = m;
        fast.direct_cluster_size = cluster;
      }
      auto hooks_gpu = MoeLoraHooks::create(pool_gpu, m, fast);
      ASSERT_TRUE(hooks_gpu->fuses_activation(m) && hooks_gpu->fuses_reduce(m));

      Inputs in = random_inputs(c.shape, m, 2, rng);
      MoeInputs din{to_gpu(in.x), to_gpu(in.logits), in.gate.defined() ? to_gpu(in.gate) : Tensor()};
      Tensor dslots = to_gpu(in.token_slot);
      const int64_t H = c.shape.hidden;
      Tensor y = Tensor::empty({m, H}, DType::bf16, Device::cuda());
      Tensor y_base = Tensor::empty({m, H}, DType::bf16, Device::cuda());
      hooks_gpu->bind(LoraBatch{dslots});
      auto body = [&] {
        gpu.run(din, dw, hooks_gpu.get(), y, s);
        gpu.run(din, dw, nullptr, y_base, s);
      };
      body();  // warm-up (one-time kernel attributes); also the eager check below
      s.synchronize();
      CudaGraph g;
      if (graph) g = CudaGraph::capture(s, body);
      for (int rep = 0; rep < (graph ? 3 : 1); ++rep) {
        if (graph) {
          in = random_inputs(c.shape, m, 2, rng);
          din.x.copy_from(in.x, &s);
          din.router_logits.copy_from(in.logits, &s);
          if (in.gate.defined()) din.shared_gate_logits.copy_from(in.gate, &s);
          dslots.copy_from(in.token_slot, &s);
          y.fill_bytes(test::kPoisonFloat, &s);
          g.replay(s);
        }
        s.synchronize();
        Tensor y_ref = Tensor::empty({m, H}, DType::bf16);
        hooks_cpu->bind(LoraBatch{in.token_slot});
        ref.run(as_moe_inputs(in), w, hooks_cpu.get(), y_ref, Stream());
        expect_layer_close(y, y_ref);
        const auto yf = test::to_floats(y), yb = test::to_floats(y_base);
        const auto ts = test::to_ints(in.token_slot);
        for (int64_t t = 0; t < m; ++t)
          if (ts[size_t(t)] < 0)
            for (int64_t j = 0; j < H; ++j)
              ASSERT_EQ(yf[size_t(t * H + j)], yb[size_t(t * H + j)]) << "base token " << t;
      }
    }
  }
}

TEST(CudaMoeLayer, FusedLoraPathMatchesReference) {
  MOELORA_REQUIRE_GPU();
  fused_lora_layer(false);
}

TEST(CudaMoeLayer, FusedLoraPathInGraphMatchesReference) {
  MOELORA_REQUIRE_GPU();
  fused_lora_layer(true);
}

TEST(CudaMoeLayer, OverlapLoraPathMatchesReference) {
  MOELORA_REQUIRE_GPU();
  fused_lora_layer(false, FastVariant::overlap);
}

TEST(CudaMoeLayer, OverlapLoraPathInGraphMatchesReference) {
  MOELORA_REQUIRE_GPU();
  fused_lora_layer(true, FastVariant::overlap);
}

TEST(CudaMoeLayer, DirectLoraPathMatchesReference) {
  MOELORA_REQUIRE_GPU();
  fused_lora_layer(false, FastVariant::direct);
}

TEST(CudaMoeLayer, DirectLoraPathInGraphMatchesReference) {
  MOELORA_REQUIRE_GPU();
  fused_lora_layer(true, FastVariant::direct);
}

}  // namespace
}  // namespace moelora
