// Shared by the fp8 expert GPU tests (moe_fp8_gpu_test.cpp, moe_fp8_inline_lora_gpu_test.cpp):
// random fp8 block-scale stacks and layer weights, a routed and aligned batch, the layer shapes.
#pragma once

#include <cmath>
#include <random>
#include <vector>

#include "gpu_op_test_util.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/moe/types.h"
#include "moelora/quant/experts.h"
#include "moelora/quant/fp8_block.h"

namespace moelora::test {

// A stack of G experts, each the given parts ([rows, K] each) quantized and packed; host side.
inline ExpertMatrices fp8_stack(int64_t G, const std::vector<int64_t>& part_rows, int64_t K,
                                std::mt19937_64& rng, int64_t block_n = 128) {
  const quant::Fp8BlockConfig cfg{block_n, 128};
  const float amax = 2.0f / std::sqrt(float(K));
  std::vector<std::vector<quant::Fp8BlockTensors>> parts(static_cast<size_t>(G));
  for (auto& g : parts)
    for (int64_t n : part_rows)
      g.push_back(quant::quantize_fp8_block(
          test::random_tensor({n, K}, DType::f32, rng, -amax, amax), cfg));
  return quant::pack_fp8_block_experts(parts, cfg, "test stack");
}

// Routing on the GPU (softmax top-k; some slots dropped to -1 when `holes`), aligned with
// `block_m`: ids (host) and the device plan.
struct Routed {
  Tensor ids;  // host i32 [M, k]
  MoeAlignment plan;
};
inline Routed route(int64_t m, int E, int k, int block_m, bool holes, std::mt19937_64& rng,
                    const Stream& s) {
  const Device d = Device::cuda();
  Tensor logits = test::to_gpu(test::random_tensor({m, E}, DType::f32, rng, -3.0f, 3.0f));
  TopK topk{Tensor::empty({m, k}, DType::i32, d), Tensor::empty({m, k}, DType::f32, d)};
  cuda::moe_route(logits, Tensor(), RouterConfig::softmax_topk(E, k, true), topk, s);
  s.synchronize();
  Routed r;
  r.ids = topk.ids.to(Device::cpu());
  if (holes) {
    int32_t* p = r.ids.data<int32_t>();
    for (int64_t i = 0; i < r.ids.numel(); ++i)
      if (rng() % 5 == 0) p[i] = -1;
  }
  r.plan = test::poisoned_plan(m * k, E, block_m, d);
  cuda::moe_align(test::to_gpu(r.ids), r.plan, s);
  s.synchronize();
  return r;
}

inline MoeWeights fp8_weights(const MoeShape& sh, bool bias, std::mt19937_64& rng) {
  MoeWeights w;
  w.format = WeightFormat::fp8_block;
  const int64_t E = sh.num_experts, H = sh.hidden, I = sh.inter;
  w.w13 = fp8_stack(E, {I, I}, H, rng);
  w.w2 = fp8_stack(E, {H}, I, rng);
  if (bias) w.correction_bias = test::random_tensor({E}, DType::f32, rng, -0.1f, 0.1f);
  if (sh.shared_inter > 0) {
    w.shared_w13 = fp8_stack(1, {sh.shared_inter, sh.shared_inter}, H, rng);
    w.shared_w2 = fp8_stack(1, {H}, sh.shared_inter, rng);
  }
  return w;
}

inline MoeWeights on_gpu(const MoeWeights& w) {
  MoeWeights d = w;
  for (ExpertMatrices* m : {&d.w13, &d.w2, &d.shared_w13, &d.shared_w2})
    if (m->defined()) *m = m->to(Device::cuda());
  if (d.correction_bias.defined()) d.correction_bias = test::to_gpu(d.correction_bias);
  return d;
}

// The layer shapes: plain softmax top-k, DeepSeek-V3 grouped routing with a shared expert,
// Qwen2-style gated shared expert (I = 208: gate/up parts not a multiple of the scale block).
struct Fp8LayerCase {
  MoeShape shape;
  RouterConfig router;
};
inline std::vector<Fp8LayerCase> fp8_layer_cases() {
  MoeShape base{"fp8-small", 256, 208, 16, 4};
  MoeShape v3 = base;
  v3.name = "fp8-v3-shared", v3.num_experts = 32, v3.shared_inter = 144;
  MoeShape q2 = base;
  q2.name = "fp8-qwen2-shared-gate", q2.num_experts = 12, q2.top_k = 3, q2.shared_inter = 256;
  q2.shared_gate = true;
  return {{base, RouterConfig::softmax_topk(16, 4, true)},
          {v3, RouterConfig::deepseek_v3(32, 4, 4, 2, 2.5f)},
          {q2, RouterConfig::softmax_topk(12, 3, false)}};
}

}  // namespace moelora::test
