// MoeDecoder: PEFT adapters into the per-layer LoRA pools. Every adapter module must land on a
// module of the model (or be one the engine deliberately does not apply: embedding and
// lm_head LoRA, warned about loudly); anything else is an error naming it.
#include <cctype>
#include <cstdio>

#include <fmt/format.h>

#include "model/moe_decoder_impl.h"
#include "moelora/lora/peft_adapter.h"

namespace moelora {
namespace {

// "model.layers.<L>.<rest>" -> (L, rest); L = -1 when `module` is not under a layer.
std::pair<int, std::string> split_layer(const std::string& module) {
  const std::string head = "model.layers.";
  if (module.rfind(head, 0) != 0) return {-1, ""};
  size_t i = head.size(), j = i;
  while (j < module.size() && std::isdigit(static_cast<unsigned char>(module[j]))) ++j;
  if (j == i || j - i > 6 || j >= module.size() || module[j] != '.') return {-1, ""};
  return {std::stoi(module.substr(i, j - i)), module.substr(j + 1)};
}

bool under(const std::string& rest, const std::string& prefix) {
  return rest == prefix ||
         (rest.size() > prefix.size() && rest.compare(0, prefix.size(), prefix) == 0 &&
          rest[prefix.size()] == '.');
}

bool is_embedding_or_head(const std::string& module) {
  return module == "lm_head" || module == "model.embed_tokens" ||
         module.find("embed_tokens") != std::string::npos;
}

}  // namespace

void MoeDecoder::unload_adapter(int slot) {
  check_slot(slot);
  for (DecoderLayer& L : layers_) {
    for (DenseLoraPool* p :
         {L.qkv_lora.get(), L.o_lora.get(), L.gate_up_lora.get(), L.down_lora.get()})
      if (p) p->unload(slot);
    if (L.lora_pool) L.lora_pool->unload(slot);
  }
  adapter_loaded_[size_t(slot)] = false;
}

void MoeDecoder::load_adapter(int slot, const PeftAdapter& adapter) {
  check_slot(slot);
  const HfModelConfig& c = config_;
  const int r_max = options_.lora_r_max;
  static const char* kAttn[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.o_proj"};
  static const char* kMlp[] = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
  // Per layer: the experts module name the adapter uses ("" = none).
  std::vector<std::string> experts_module(layers_.size());
  std::vector<std::string> ignored;
  for (const auto& [name, mod] : adapter.modules()) {
    if (is_embedding_or_head(name)) {
      ignored.push_back(name);
      continue;
    }
    const auto [layer, rest] = split_layer(name);
    MOELORA_CHECK(layer >= 0 && layer < c.num_hidden_layers,
                  "adapter {}: module '{}' matches no module of the {} model ({} layers)",
                  adapter.dir(), name, family_.model_type, c.num_hidden_layers);
    const DecoderLayer& L = layers_[size_t(layer)];
    bool known = false;
    for (const char* a : kAttn) known = known || rest == a;
    if (!L.moe)
      for (const char* m : kMlp) known = known || rest == m;
    if (!known && L.moe) {
      for (const std::string& em : family_.lora_expert_modules) {
        if (!under(rest, em)) continue;
        const std::string full = fmt::format("model.layers.{}.{}", layer, em);
        MOELORA_CHECK(
            experts_module[size_t(layer)].empty() || experts_module[size_t(layer)] == full,
            "adapter {}: layer {} has expert LoRA under both '{}' and '{}'", adapter.dir(), layer,
            experts_module[size_t(layer)], full);
        experts_module[size_t(layer)] = full;
        known = true;
        break;
      }
    }
    MOELORA_CHECK(known,
                  "adapter {}: module '{}' matches no module of the {} model (layer {} is a {} "
                  "layer: LoRA applies to self_attn.{{q,k,v,o}}_proj and {})",
                  adapter.dir(), name, family_.model_type, layer, L.moe ? "MoE" : "dense MLP",
                  L.moe ? "the experts" : "mlp.{gate,up,down}_proj");
    MOELORA_CHECK(mod.r <= r_max,
                  "adapter {}: module '{}' has rank {}, over the engine's maximum LoRA rank {} "
                  "(ModelOptions::lora_r_max / --max-lora-rank)",
                  adapter.dir(), name, mod.r, r_max);
  }
  for (const std::string& k : adapter.unsupported_keys()) ignored.push_back(k);
  if (!ignored.empty()) {
    fmt::print(stderr,
               "WARNING: adapter {}: {} LoRA module(s)/key(s) on embeddings or lm_head are NOT "
               "applied (not supported yet):\n",
               adapter.dir(), ignored.size());
    for (const std::string& k : ignored) fmt::print(stderr, "  {}\n", k);
  }

  auto slice = [&](const std::string& module) {
    DenseLoraSlice s;
    if (const PeftLoraModule* m = adapter.find(module)) {
      s.a = m->a;
      s.b = m->b;
      s.scale = m->scaling;
    }
    return s;
  };
  // Build every layer's expert weights first (they validate shapes) so that a bad layer leaves
  // the slot untouched; the dense pools validate on load, and a failure there unloads the slot.
  const MoeShape shape = c.moe_shape();
  std::vector<MoeLoraWeights> experts(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (!layers_[l].moe) continue;
    const std::string em =
        experts_module[l].empty()
            ? fmt::format("model.layers.{}.{}", l, family_.lora_expert_modules.front())
            : experts_module[l];
    experts[l] = moe_lora_from_peft(adapter, em, shape.num_experts, shape.hidden, shape.inter);
  }
  try {
    for (size_t l = 0; l < layers_.size(); ++l) {
      DecoderLayer& L = layers_[l];
      const std::string p = fmt::format("model.layers.{}.", l);
      L.qkv_lora->load(slot, {slice(p + kAttn[0]), slice(p + kAttn[1]), slice(p + kAttn[2])});
      L.o_lora->load(slot, {slice(p + kAttn[3])});
      if (L.moe) {
        L.lora_pool->load(slot, experts[l]);
      } else {
        L.gate_up_lora->load(slot, {slice(p + kMlp[0]), slice(p + kMlp[1])});
        L.down_lora->load(slot, {slice(p + kMlp[2])});
      }
    }
  } catch (...) {
    unload_adapter(slot);
    throw;
  }
  adapter_loaded_[size_t(slot)] = true;
}

}  // namespace moelora
