// Loading a layer's expert weights for MoeRunner (internal): bf16 or packed quantized stacks,
// whatever the checkpoint holds, in the layout moe/types.h describes (gate and up stacked
// along N: w13 [E, 2I, H], w2 [E, H, I]).
//
// Layouts read, tried in this order:
//  - fused 3-D tensors (transformers 5's in-memory layout saved as is):
//      <prefix>.gate_up_proj [E, 2I, H], <prefix>.down_proj [E, H, I]  (float only)
//    under `experts_prefix` or any of ExpertNames::fused_prefixes;
//  - one Linear per expert (Hub checkpoints):
//      <experts_prefix>.<e>.<proj>.weight, proj = gate, up, down names (Qwen / DeepSeek
//      gate_proj / up_proj / down_proj, Mixtral w1 / w3 / w2), each in float or in the
//      checkpoint's quantized format (WeightLoader::quantized); all experts of a layer must
//      agree (MoeWeights holds one format).
// Random weights (WeightLoader::random()): random stacks in the random format, on its device.
#pragma once

#include <array>
#include <string>
#include <vector>

#include "model/weight_loader.h"
#include "moelora/moe/config.h"
#include "moelora/moe/types.h"

namespace moelora {

struct ExpertNames {
  // Per-expert Linear modules: gate, up, down.
  std::array<std::string, 3> proj = {"gate_proj", "up_proj", "down_proj"};
  // Other module prefixes under which the fused 3-D tensors may have been saved (Mixtral:
  // transformers 5 names the experts "model.layers.L.mlp.experts", its Hub checkpoints
  // "model.layers.L.block_sparse_moe.experts").
  std::vector<std::string> fused_prefixes;
};

// The routed experts of one layer on `device`, validated against `shape` (format: bf16 or the
// checkpoint's quantized format). `experts_prefix` is the experts module without a trailing
// dot, e.g. "model.layers.0.mlp.experts".
MoeWeights load_routed_experts(WeightLoader& wl, const std::string& experts_prefix,
                               const ExpertNames& names, const MoeShape& shape, Device device);

// The shared expert(s) of one layer (DeepSeek "mlp.shared_experts", one Linear per
// projection, intermediate size `shape.shared_inter`) into w.shared_w13 [1, 2 Is, H] and
// w.shared_w2 [1, H, Is], in w.format (MoeWeights holds one format: a float shared expert next
// to quantized routed experts is an error naming it). Call after load_routed_experts.
void load_shared_experts(WeightLoader& wl, const std::string& module_prefix,
                         const ExpertNames& names, const MoeShape& shape, Device device,
                         MoeWeights& w);

}  // namespace moelora
