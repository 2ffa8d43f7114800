// Qwen3-MoE (model_type qwen3_moe), as transformers' Qwen3MoeForCausalLM: the shared MoE
// decoder (moe_decoder.h) with per-head q/k RMSNorm, experts under mlp.experts
// (gate_proj/up_proj/down_proj), router mlp.gate, softmax top-k (renormalized when
// norm_topk_prob), dense SiLU MLPs on mlp_only_layers.
#include <nlohmann/json.hpp>

#include "model/models.h"
#include "model/moe_decoder.h"

namespace moelora {
namespace {

// Settings of config.json that HfModelConfig does not carry and that this model must refuse
// rather than ignore.
void check_unsupported_settings(const std::string& dir, const HfModelConfig& c) {
  const std::string path = dir + "/config.json";
  const nlohmann::json j = nlohmann::json::parse(read_text_file(path), nullptr, false);
  auto flag = [&](const char* key) {
    auto it = j.find(key);
    return it != j.end() && it->is_boolean() && it->get<bool>();
  };
  MOELORA_CHECK(!flag("use_sliding_window"),
                "{}: use_sliding_window=true is not supported by the qwen3_moe model yet", path);
  MOELORA_CHECK(!flag("attention_bias"),
                "{}: attention_bias=true is not supported by the qwen3_moe model (Qwen3 has no "
                "attention biases)",
                path);
  auto act = j.find("hidden_act");
  MOELORA_CHECK(act == j.end() || act->is_null() || *act == "silu",
                "{}: hidden_act {} is not supported (expected \"silu\")", path,
                act == j.end() ? "" : act->dump());
  MOELORA_CHECK(c.rope_type == "default" || c.rope_type == "yarn",
                "{}: rope_type '{}' is not supported (\"default\" and \"yarn\" are)", path,
                c.rope_type);
  MOELORA_CHECK(c.max_position_embeddings > 0, "{}: max_position_embeddings must be > 0", path);
}

}  // namespace

std::unique_ptr<Model> make_qwen3_moe(const std::string& dir, const HfModelConfig& config,
                                      const ModelOptions& options) {
  check_unsupported_settings(dir, config);
  MoeDecoderFamily f;
  f.model_type = "qwen3_moe";
  f.qk_norm = true;
  return make_moe_decoder(dir, config, options, f);
}

}  // namespace moelora
