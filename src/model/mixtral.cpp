// Mixtral (model_type mixtral), as transformers' MixtralForCausalLM: the shared MoE decoder
// (moe_decoder.h) without q/k norm; every layer is MoE, experts under
// block_sparse_moe.experts.<e>.{w1 (gate), w3 (up), w2 (down)}, router block_sparse_moe.gate,
// softmax top-k renormalized. Sliding-window attention is not implemented: a window smaller
// than the context is refused.
#include <nlohmann/json.hpp>

#include "model/models.h"
#include "model/moe_decoder.h"

namespace moelora {
namespace {

void check_unsupported_settings(const std::string& dir, const HfModelConfig& c) {
  const std::string path = dir + "/config.json";
  const nlohmann::json j = nlohmann::json::parse(read_text_file(path), nullptr, false);
  auto sw = j.find("sliding_window");
  if (sw != j.end() && !sw->is_null()) {
    MOELORA_CHECK(sw->is_number_integer(),
                  "{}: sliding_window must be null or an integer, "
                  "found {}",
                  path, sw->dump());
    MOELORA_CHECK(sw->get<int64_t>() >= c.max_position_embeddings,
                  "{}: sliding_window {} is smaller than the context (max_position_embeddings "
                  "{}); sliding-window attention is not supported by the mixtral model (null or "
                  "a window >= the context is)",
                  path, sw->get<int64_t>(), c.max_position_embeddings);
  }
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

std::unique_ptr<Model> make_mixtral(const std::string& dir, const HfModelConfig& config,
                                    const ModelOptions& options) {
  check_unsupported_settings(dir, config);
  MoeDecoderFamily f;
  f.model_type = "mixtral";
  f.qk_norm = false;
  f.moe_module = "block_sparse_moe";
  f.expert_proj = {"w1", "w3", "w2"};
  // Per-expert adapters (hub / transformers 4 names) and peft's 3D-parameter adapters on
  // transformers 5's fused experts (in memory under mlp.experts).
  f.lora_expert_modules = {"block_sparse_moe.experts", "mlp.experts"};
  return make_moe_decoder(dir, config, options, f);
}

}  // namespace moelora
