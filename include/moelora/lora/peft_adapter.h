// PEFT LoRA adapters on disk (adapter_config.json + adapter_model.safetensors): the config, the
// per-module A/B tensors as stored, and the MoE LoRA weights of one layer built from either of
// the two expert layouts PEFT writes (per-expert Linear modules, or peft >= 0.17's LoRA on the
// 3D expert parameters). Nothing is dropped silently: an unknown key is an error, a key the
// engine deliberately does not support yet (embeddings) is listed in unsupported_keys().
#pragma once

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "moelora/core/tensor.h"
#include "moelora/lora/moe_lora.h"

namespace moelora {

// The fields of adapter_config.json moelora reads; unknown fields are ignored.
struct PeftAdapterConfig {
  std::string source;  // the file it came from, for messages
  std::string peft_type;
  int r = 8;
  float lora_alpha = 8.0f;
  bool use_rslora = false;
  bool use_dora = false;  // always false after parsing (DoRA is refused)
  bool fan_in_fan_out = false;
  // target_modules as a list (suffix match) or, when the file gives a string, a regex that
  // peft matches against the full module name.
  std::vector<std::string> target_modules;
  std::optional<std::string> target_modules_regex;
  std::vector<std::string> target_parameters;
  // In file order: peft takes the first key that matches.
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, float>> alpha_pattern;
  std::string base_model_name_or_path;  // empty when null
  std::vector<int> layers_to_transform;  // empty when null

  // Parses the JSON text of an adapter_config.json; errors name `source` and the field.
  static PeftAdapterConfig parse(const std::string& json_text, const std::string& source);
  static PeftAdapterConfig load(const std::string& path);

  // r and alpha of `module` (name without the `base_model.model.` prefix) after rank_pattern /
  // alpha_pattern.
  int rank_for(const std::string& module) const;
  float alpha_for(const std::string& module) const;
  // True when `module` (trailing `.base_layer`s stripped) holds one of target_parameters, i.e.
  // its LoRA is on a 3D expert parameter and lora_A has num_experts * r rows.
  bool is_parameter_module(const std::string& module) const;
};

// peft's get_pattern_key: the key of `keys` (in order) that names `module`: an exact match, or
// a key that matches the whole of `module` as the regex `(.*\.)?(key)$`, i.e. a dotted suffix
// or a regex over the tail. nullopt when none does.
std::optional<std::string> peft_pattern_key(const std::vector<std::string>& keys,
                                            const std::string& module);

// One LoRA-wrapped module: delta W = scaling * B . A.
struct PeftLoraModule {
  std::string name;  // e.g. "model.layers.0.self_attn.q_proj" (no base_model.model. prefix)
  std::string a_key, b_key;  // the safetensors keys, for messages
  int r = 0;                 // configured rank (rank_pattern applied)
  float alpha = 0.0f;        // configured alpha (alpha_pattern applied)
  float scaling = 1.0f;      // lora_scaling(alpha, r, use_rslora)
  Tensor a, b;               // host, as stored: A [rows, in], B [out, cols]
};

class PeftAdapter {
 public:
  // Reads <dir>/adapter_config.json and <dir>/adapter_model.safetensors. Validates every key:
  // A and B paired, float dtypes, 2-d, A rows == B cols, rank as configured.
  static PeftAdapter load(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const PeftAdapterConfig& config() const { return config_; }
  const std::map<std::string, PeftLoraModule>& modules() const { return modules_; }
  const PeftLoraModule* find(const std::string& module) const;
  // Keys the engine does not apply (embedding LoRA, for now). load() also prints them to
  // stderr; callers should surface them to the user again.
  const std::vector<std::string>& unsupported_keys() const { return unsupported_keys_; }

 private:
  std::string dir_;
  PeftAdapterConfig config_;
  std::map<std::string, PeftLoraModule> modules_;
  std::vector<std::string> unsupported_keys_;
};

// The MoE LoRA of the layer whose experts module is `experts_module` (in-memory name, e.g.
// "model.layers.0.mlp.experts"), from either layout:
//  - per expert: `<experts_module>.<e>.{gate_proj,up_proj,down_proj}` (or Mixtral's w1 gate,
//    w3 up, w2 down) -> separate gate/up and down, stacked to A [E, r, in], B [E, out, r];
//    a targeted projection must be present for every expert, at one rank and scale;
//  - fused 3D (peft >= 0.17 target_parameters): `<experts_module>` and
//    `<experts_module>.base_layer...` -> gate_up_a/b and down_a/b via split_peft_expert_lora.
// Tensors are f32. Shapes are checked against hidden / inter (expected vs found). A module
// under `<experts_module>` that fits neither layout is an error.
MoeLoraWeights moe_lora_from_peft(const PeftAdapter& adapter, const std::string& experts_module,
                                  int num_experts, int hidden, int inter);

}  // namespace moelora
