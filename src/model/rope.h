// The rotary-embedding frequencies a model applies, from its config (internal): plain RoPE and
// YaRN (DeepSeek-V2/V3, Kimi-K2), computed as transformers 5 does (modeling_rope_utils'
// _compute_default_rope_parameters / _compute_yarn_parameters: f32 tensors, double scalars).
#pragma once

#include <vector>

#include "moelora/core/tensor.h"
#include "moelora/io/hf_config.h"

namespace moelora {

struct RopeFrequencies {
  std::vector<float> inv_freq;     // [dim / 2], f32
  float attention_scaling = 1.0f;  // cos and sin are multiplied by it (transformers' name)
  bool plain = true;               // theta^(-2i/dim), scaling 1: the ops compute it themselves
};

// rope_type "default" or "yarn" over `dim` rotated values (the other types: an error naming
// the config). dim must be even and > 0.
RopeFrequencies rope_frequencies(const HfModelConfig& c, int dim);

// What the rope ops take (mla_rope, rope, attention_prologue): the frequency table on `device`
// and the cos / sin factor; undefined and 1 for plain RoPE (the ops compute theta's).
struct RopeTable {
  Tensor inv_freq;
  float cos_sin_scale = 1.0f;
};
RopeTable rope_table(const HfModelConfig& c, int dim, Device device);

// The factor DeepSeek's attention multiplies its softmax scale qk_head_dim^-0.5 by
// (transformers' DeepseekV2 / V3 attention: yarn_get_mscale(factor, mscale_all_dim)^2 when the
// rope type is not "default" and mscale_all_dim is set); 1 otherwise.
double deepseek_softmax_mscale2(const HfModelConfig& c);

}  // namespace moelora
