// The one-kernel decode MoE layer (cuda_bf16 small_batch_layer, moe_decode_layer.cu): bit for bit
// the staged CUDA path (route+align -> gemm1+act -> gemm2 -> reduce, shared expert included),
// close to the CPU reference, stable over graph replays (its cross-CTA counters reset
// themselves), and refused where it cannot match the staged path.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <vector>

#include <cuda_runtime_api.h>

#include "gpu_op_test_util.h"
#include "kernels/cuda/moe_decode_layer.h"
#include "moelora/core/random.h"
#include "moelora/moe/runner.h"

namespace moelora {
namespace {

using test::to_gpu;

struct DecodeCase {
  const char* name;
  MoeShape shape;
  RouterConfig router;
};

MoeShape small_shape(const char* name, int H, int I, int E, int k, int shared, bool gate) {
  MoeShape s;
  s.name = name, s.hidden = H, s.inter = I, s.num_experts = E, s.top_k = k;
  s.shared_inter = shared, s.shared_gate = gate;
  return s;
}

std::vector<DecodeCase> decode_cases() {
  const MoeShape qwen3 = MoeShape::by_name("qwen3-30b-a3b");
  const MoeShape v2 = MoeShape::by_name("deepseek-v2-lite");
  return {
      {"qwen3-30b-a3b", qwen3, qwen3.default_router()},
      {"deepseek-v2-lite", v2, v2.default_router()},
      // 256 experts (one 256-thread route team), grouped sigmoid routing with bias, shared.
      {"v3-small", small_shape("v3-small", 512, 256, 256, 8, 256, false),
       RouterConfig::deepseek_v3(256, 8, 8, 4, 2.5f)},
      // Odd sizes: H and I not multiples of 16, E not a power of two, top-1, gated shared.
      {"odd-k1", small_shape("odd-k1", 72, 40, 5, 1, 24, true), RouterConfig::softmax_topk(5, 1, false)},
      {"odd-k8", small_shape("odd-k8", 136, 56, 12, 8, 0, false), RouterConfig::softmax_topk(12, 8, true)},
  };
}

// Device weights (counter-based fill: fast for the real shapes), magnitudes ~ 1 / sqrt(fan_in).
MoeWeights device_weights(const DecodeCase& c, uint64_t seed, const Stream& st) {
  const MoeShape& s = c.shape;
  const Device d = Device::cuda();
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter, Is = s.shared_inter;
  const float a13 = 2.0f / std::sqrt(float(H)), a2 = 2.0f / std::sqrt(float(I));
  MoeWeights w;
  w.w13 = Tensor::empty({E, 2 * I, H}, DType::bf16, d);
  fill_uniform(w.w13.w, seed, -a13, a13, st);
  w.w2 = Tensor::empty({E, H, I}, DType::bf16, d);
  fill_uniform(w.w2.w, seed + 1, -a2, a2, st);
  if (Is > 0) {
    const float as = 2.0f / std::sqrt(float(Is));
    w.shared_w13 = Tensor::empty({1, 2 * Is, H}, DType::bf16, d);
    fill_uniform(w.shared_w13.w, seed + 2, -a13, a13, st);
    w.shared_w2 = Tensor::empty({1, H, Is}, DType::bf16, d);
    fill_uniform(w.shared_w2.w, seed + 3, -as, as, st);
  }
  if (c.router.use_correction_bias) {
    w.correction_bias = Tensor::empty({E}, DType::f32, d);
    fill_uniform(w.correction_bias, seed + 4, -0.1f, 0.1f, st);
  }
  st.synchronize();
  return w;
}

MoeWeights host_copy(const MoeWeights& w) {
  MoeWeights h = w;
  for (ExpertMatrices* m : {&h.w13, &h.w2, &h.shared_w13, &h.shared_w2})
    if (m->defined()) *m = m->to(Device::cpu());
  if (h.correction_bias.defined()) h.correction_bias = h.correction_bias.to(Device::cpu());
  return h;
}

struct HostInputs {
  Tensor x, logits, gate;
};

HostInputs random_inputs(const MoeShape& s, int64_t m, std::mt19937_64& rng) {
  HostInputs in;
  in.x = test::random_tensor({m, int64_t(s.hidden)}, DType::bf16, rng);
  in.logits = test::random_tensor({m, int64_t(s.num_experts)}, DType::f32, rng, -3.0f, 3.0f);
  if (s.shared_gate) in.gate = test::random_tensor({m}, DType::f32, rng, -2.0f, 2.0f);
  return in;
}

// Every token's top-k are the last k experts (distinct margins so the order is fixed).
HostInputs one_expert_set_inputs(const MoeShape& s, int64_t m, std::mt19937_64& rng) {
  HostInputs in = random_inputs(s, m, rng);
  std::vector<float> l = test::to_floats(in.logits);
  const int E = s.num_experts;
  for (int64_t t = 0; t < m; ++t)
    for (int j = 0; j < s.top_k; ++j) l[size_t(t * E + E - 1 - j)] = 12.0f - 0.25f * float(j);
  in.logits = test::from_floats(l, {m, int64_t(E)}, DType::f32);
  return in;
}

MoeInputs to_device(const HostInputs& in) {
  return {to_gpu(in.x), to_gpu(in.logits), in.gate.defined() ? to_gpu(in.gate) : Tensor()};
}

MoeRunnerConfig config(const DecodeCase& c, Device d, int64_t small_batch) {
  MoeRunnerConfig cfg;
  cfg.shape = c.shape, cfg.router = c.router, cfg.device = d;
  cfg.max_tokens = cuda::kMoeDecodeMaxTokens;
  cfg.small_batch_max_tokens = small_batch;
  return cfg;
}

TopK poisoned_topk(int64_t m, int k) {
  return {test::poisoned({m, k}, DType::i32, Device::cuda(), test::kPoisonInt),
          test::poisoned({m, k}, DType::f32, Device::cuda(), test::kPoisonFloat)};
}

cuda::MoeDecodeWorkspace poisoned_workspace(const MoeShape& s) {
  cuda::MoeDecodeWorkspace ws = cuda::MoeDecodeWorkspace::allocate(s, Device::cuda());
  for (Tensor* t : {&ws.act, &ws.part, &ws.shared_act, &ws.shared_part})
    if (t->defined()) t->fill_bytes(test::kPoisonFloat);
  test::device_sync();
  return ws;
}

// Bit equality with a short report (index and values of the first mismatch, count).
template <class T>
::testing::AssertionResult same_bits(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "sizes " << got.size() << " vs " << want.size();
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i] && bad++ == 0) first = i;
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " differ; first at "
                                       << first << ": 0x" << std::hex << uint64_t(got[first])
                                       << " vs 0x" << uint64_t(want[first]);
}

bool all_zero(const Tensor& counters) {
  const std::vector<int32_t> v = test::to_ints(counters);
  return std::all_of(v.begin(), v.end(), [](int32_t x) { return x == 0; });
}

// One case at one batch: the staged runner (kernel off), both kernel variants, the
// runner with the kernel on, and the CPU reference.
void check_case(const DecodeCase& c, MoeRunner& staged, MoeRunner& fast, MoeRunner& ref,
                const MoeWeights& dw, const MoeWeights& hw, cuda::MoeDecodeWorkspace& ws,
                const HostInputs& in, const Stream& s) {
  const int64_t m = in.x.size(0), H = c.shape.hidden;
  const int k = c.shape.top_k;
  ASSERT_TRUE(cuda::moe_decode_layer_supported(c.shape, c.router, m, nullptr));
  const MoeInputs din = to_device(in);

  Tensor y_staged = test::poisoned({m, H}, DType::bf16, Device::cuda(), test::kPoisonFloat);
  staged.run(din, dw, nullptr, y_staged, s);
  s.synchronize();
  const auto want = test::raw_bits16(y_staged);
  const auto want_ids = test::to_ints(staged.last_topk().ids);
  const auto want_w = test::raw_bits32(staged.last_topk().weights);

  for (bool deep : {true, false}) {
    SCOPED_TRACE(::testing::Message() << "deep_prefetch=" << deep);
    Tensor y = test::poisoned({m, H}, DType::bf16, Device::cuda(), test::kPoisonFloat);
    TopK topk = poisoned_topk(m, k);
    cuda::moe_decode_layer(din, dw, c.shape, c.router, topk, ws, y, s, deep);
    s.synchronize();
    EXPECT_TRUE(same_bits(test::raw_bits16(y), want));
    EXPECT_EQ(test::to_ints(topk.ids), want_ids);
    EXPECT_TRUE(same_bits(test::raw_bits32(topk.weights), want_w));
    EXPECT_TRUE(all_zero(ws.counters)) << "counters not reset after the launch";
  }

  // Through the runner (the dispatch), kernel on.
  Tensor y_fast = test::poisoned({m, H}, DType::bf16, Device::cuda(), test::kPoisonFloat);
  fast.run(din, dw, nullptr, y_fast, s);
  s.synchronize();
  EXPECT_TRUE(same_bits(test::raw_bits16(y_fast), want));
  EXPECT_EQ(test::to_ints(fast.last_topk().ids), want_ids);

  Tensor y_ref = Tensor::empty({m, H}, DType::bf16);
  ref.run({in.x, in.logits, in.gate}, hw, nullptr, y_ref, Stream());
  EXPECT_EQ(test::to_ints(ref.last_topk().ids), want_ids);
  EXPECT_TRUE(test::allclose(test::to_floats(y_fast), test::to_floats(y_ref), 1e-2, 1e-2));
}

TEST(CudaMoeDecodeKernel, BitIdenticalToStagedPath) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (const DecodeCase& c : decode_cases()) {
    const MoeWeights dw = device_weights(c, rng(), s);
    const MoeWeights hw = host_copy(dw);
    MoeRunner staged(config(c, Device::cuda(), 0)), fast(config(c, Device::cuda(), 8));
    MoeRunner ref(config(c, Device::cpu(), 0));
    cuda::MoeDecodeWorkspace ws = poisoned_workspace(c.shape);
    for (int64_t m : {1, 2, 3, 4, 8}) {
      SCOPED_TRACE(::testing::Message() << c.name << " M=" << m);
      check_case(c, staged, fast, ref, dw, hw, ws, random_inputs(c.shape, m, rng), s);
    }
  }
}

TEST(CudaMoeDecodeKernel, AllTokensOnTheSameExperts) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (const DecodeCase& c : decode_cases()) {
    if (c.shape.hidden > 1024) continue;  // the small shapes cover it; keeps the test quick
    const MoeWeights dw = device_weights(c, rng(), s);
    const MoeWeights hw = host_copy(dw);
    MoeRunner staged(config(c, Device::cuda(), 0)), fast(config(c, Device::cuda(), 8));
    MoeRunner ref(config(c, Device::cpu(), 0));
    cuda::MoeDecodeWorkspace ws = poisoned_workspace(c.shape);
    for (int64_t m : {1, 4, 8}) {
      SCOPED_TRACE(::testing::Message() << c.name << " M=" << m);
      const HostInputs in = one_expert_set_inputs(c.shape, m, rng);
      check_case(c, staged, fast, ref, dw, hw, ws, in, s);
      // Softmax routers pick exactly the boosted experts (sigmoid + bias may reorder them).
      if (c.router.scoring == ScoringFunc::softmax) {
        std::vector<int32_t> ids = test::to_ints(fast.last_topk().ids);
        for (int64_t t = 0; t < m; ++t)
          EXPECT_EQ(ids[size_t(t * c.shape.top_k)], c.shape.num_experts - 1);
      }
    }
  }
}

// One captured launch replayed many times: the counters' reset (last CTA out) must leave every
// replay identical; then new inputs copied into the captured buffers.
TEST(CudaMoeDecodeKernel, GraphReplaysAreStable) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  const std::vector<DecodeCase> cases = decode_cases();
  for (const DecodeCase& c : {cases[0], cases[1], cases[3]}) {
    const MoeWeights dw = device_weights(c, rng(), s);
    MoeRunner staged(config(c, Device::cuda(), 0)), fast(config(c, Device::cuda(), 8));
    for (int64_t m : {1, 4}) {
      SCOPED_TRACE(::testing::Message() << c.name << " M=" << m);
      const int64_t H = c.shape.hidden;
      HostInputs in = random_inputs(c.shape, m, rng);
      MoeInputs din = to_device(in);
      Tensor y = Tensor::empty({m, H}, DType::bf16, Device::cuda());
      Tensor y_staged = Tensor::empty({m, H}, DType::bf16, Device::cuda());
      fast.run(din, dw, nullptr, y, s);  // eager first (one-time kernel attributes)
      s.synchronize();
      const CudaGraph graph = CudaGraph::capture(s, [&] { fast.run(din, dw, nullptr, y, s); });
      staged.run(din, dw, nullptr, y_staged, s);
      s.synchronize();
      const auto want = test::raw_bits16(y_staged);
      int mismatches = 0;
      for (int rep = 0; rep < 128; ++rep) {
        y.fill_bytes(test::kPoisonFloat, &s);
        graph.replay(s);
        s.synchronize();
        mismatches += test::raw_bits16(y) != want;
      }
      EXPECT_EQ(mismatches, 0) << "of 128 replays";
      for (int rep = 0; rep < 3; ++rep) {
        in = random_inputs(c.shape, m, rng);
        din.x.copy_from(in.x, &s);
        din.router_logits.copy_from(in.logits, &s);
        if (in.gate.defined()) din.shared_gate_logits.copy_from(in.gate, &s);
        y.fill_bytes(test::kPoisonFloat, &s);
        graph.replay(s);
        staged.run(din, dw, nullptr, y_staged, s);
        s.synchronize();
        EXPECT_TRUE(same_bits(test::raw_bits16(y), test::raw_bits16(y_staged))) << "new inputs " << rep;
      }
    }
  }
}

TEST(CudaMoeDecodeKernel, RefusedWhereItCannotMatch) {
  MOELORA_REQUIRE_GPU();
  const DecodeCase c = decode_cases()[4];  // odd-k8
  EXPECT_TRUE(cuda::moe_decode_layer_supported(c.shape, c.router, 8, nullptr));
  std::string why;
  EXPECT_FALSE(cuda::moe_decode_layer_supported(c.shape, c.router, 9, &why));
  EXPECT_NE(why.find("1..8"), std::string::npos) << why;
  MoeShape many = small_shape("e300", 64, 64, 300, 2, 0, false);
  EXPECT_FALSE(cuda::moe_decode_shape_supported(many, &why));
  EXPECT_NE(why.find("at most 256"), std::string::npos) << why;
  // Two experts, top-2, 8 tokens: the staged path aligns 32-token blocks (64-wide K stages).
  const DecodeCase wide{"wide", small_shape("wide", 64, 72, 2, 2, 0, false),
                        RouterConfig::softmax_topk(2, 2, true)};
  EXPECT_FALSE(cuda::moe_decode_layer_supported(wide.shape, wide.router, 8, &why));
  EXPECT_NE(why.find("blocks of"), std::string::npos) << why;

  // The runner falls back to the stages there (same bits as the kernel-off runner).
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  for (const DecodeCase& dc : {c, wide}) {
    const MoeWeights dw = device_weights(dc, rng(), s);
    MoeRunner staged(config(dc, Device::cuda(), 0)), fast(config(dc, Device::cuda(), 8));
    const int64_t m = 8, H = dc.shape.hidden;
    const MoeInputs din = to_device(random_inputs(dc.shape, m, rng));
    Tensor y0 = test::poisoned({m, H}, DType::bf16, Device::cuda(), test::kPoisonFloat);
    Tensor y1 = test::poisoned({m, H}, DType::bf16, Device::cuda(), test::kPoisonFloat);
    staged.run(din, dw, nullptr, y0, s);
    fast.run(din, dw, nullptr, y1, s);
    s.synchronize();
    EXPECT_TRUE(same_bits(test::raw_bits16(y1), test::raw_bits16(y0))) << dc.name;
  }
  cuda::MoeDecodeWorkspace ws = cuda::MoeDecodeWorkspace::allocate(c.shape, Device::cuda());
  const MoeWeights dw = device_weights(c, 7, s);
  const MoeInputs din = to_device(random_inputs(c.shape, 9, rng));
  Tensor y = Tensor::empty({9, int64_t(c.shape.hidden)}, DType::bf16, Device::cuda());
  TopK topk = poisoned_topk(9, c.shape.top_k);
  test::expect_error([&] { cuda::moe_decode_layer(din, dw, c.shape, c.router, topk, ws, y, s); },
                     "not supported");
}

// Timings (not assertions): the layer at decode batches, kernel (both variants) vs the staged
// path, graph of 8 layer calls with distinct weights as in `moelora bench moe`. Run with
//   moelora_gpu_tests --gtest_also_run_disabled_tests --gtest_filter='*DecodeKernelPerf*'
TEST(CudaMoeDecodeKernelPerf, DISABLED_Layer) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Stream s = Stream::create(Device::cuda());
  constexpr int kLayers = 8;
  for (const char* name : {"qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b"}) {
    const MoeShape sh = MoeShape::by_name(name);
    const DecodeCase c{name, sh, sh.default_router()};
    std::vector<MoeWeights> ws;
    for (int l = 0; l < kLayers; ++l) ws.push_back(device_weights(c, 100 + uint64_t(l) * 10, s));
    MoeRunner staged(config(c, Device::cuda(), 0));
    cuda::MoeDecodeWorkspace work = cuda::MoeDecodeWorkspace::allocate(sh, Device::cuda());
    std::printf("%-18s %3s %9s %10s %10s   (us per layer)\n", name, "M", "staged", "kern/deep",
                "kern/1ahead");
    for (int64_t m : {1, 2, 4, 8}) {
      if (!cuda::moe_decode_layer_supported(sh, c.router, m, nullptr)) continue;
      std::vector<MoeInputs> ins;
      std::vector<Tensor> ys;
      for (int l = 0; l < kLayers; ++l) {
        ins.push_back(to_device(random_inputs(sh, m, rng)));
        ys.push_back(Tensor::empty({m, int64_t(sh.hidden)}, DType::bf16, Device::cuda()));
      }
      TopK topk{Tensor::empty({m, sh.top_k}, DType::i32, Device::cuda()),
                Tensor::empty({m, sh.top_k}, DType::f32, Device::cuda())};
      auto time = [&](const std::function<void(int)>& layer) {
        const double ms = test::graph_replay_median_ms(
            s, [&] { for (int l = 0; l < kLayers; ++l) layer(l); }, 3, 30);
        return 1000.0 * ms / kLayers;
      };
      std::printf("%-18s %3lld %9.1f", "", static_cast<long long>(m), time([&](int l) {
                    staged.run(ins[size_t(l)], ws[size_t(l)], nullptr, ys[size_t(l)], s);
                  }));
      for (bool deep : {true, false})
        std::printf(" %10.1f", time([&](int l) {
                      cuda::moe_decode_layer(ins[size_t(l)], ws[size_t(l)], sh, c.router, topk,
                                             work, ys[size_t(l)], s, deep);
                    }));
      std::printf("\n");
      std::fflush(stdout);
    }
  }
}

}  // namespace
}  // namespace moelora
