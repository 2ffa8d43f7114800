#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "model/models.h"

namespace moelora {
namespace {

using Factory = std::function<std::unique_ptr<Model>(const std::string&, const HfModelConfig&,
                                                     const ModelOptions&)>;

struct Entry {
  Factory make;
  bool cuda = false;  // has a CUDA backend
};

const std::map<std::string, Entry>& registry() {
  static const std::map<std::string, Entry> r = {{"deepseek_v2", {make_deepseek, true}},
                                                 {"deepseek_v3", {make_deepseek, true}},
                                                 {"kimi_k2", {make_deepseek, true}},
                                                 {"qwen3_moe", {make_qwen3_moe, true}},
                                                 {"mixtral", {make_mixtral, true}}};
  return r;
}

// model_type as written in <dir>/config.json (read before HfModelConfig so that a type the
// config parser knows but no model implements gets the models' own list).
std::string read_model_type(const std::string& dir) {
  const std::string path = dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  MOELORA_CHECK(in.good(), "{}: cannot open the model config (expected config.json in {})", path,
                dir);
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  MOELORA_CHECK(!j.is_discarded() && j.is_object(), "{}: not a valid JSON object", path);
  auto it = j.find("model_type");
  MOELORA_CHECK(it != j.end() && it->is_string(), "{}: missing required field 'model_type'", path);
  return it->get<std::string>();
}

}  // namespace

std::vector<std::string> Model::supported_model_types() {
  std::vector<std::string> out;
  for (const auto& [name, f] : registry()) out.push_back(name);
  return out;
}

std::unique_ptr<Model> Model::load(const std::string& dir, const ModelOptions& options) {
  const std::string type = read_model_type(dir);
  auto it = registry().find(type);
  MOELORA_CHECK(it != registry().end(),
                "{}/config.json: model_type '{}' has no model in moelora; supported: {}", dir, type,
                fmt::join(supported_model_types(), ", "));
  if (options.device.is_cuda()) {
    MOELORA_CHECK(built_with_cuda(),
                  "Model::load: device {} asked for, but moelora was built without CUDA",
                  options.device.str());
    MOELORA_CHECK(it->second.cuda,
                  "Model::load: model_type '{}' runs on the CPU only so far (asked for {})", type,
                  options.device.str());
  }
  return it->second.make(dir, HfModelConfig::load(dir), options);
}

bool Model::runs_on(const std::string& dir, Device device) {
  auto it = registry().find(read_model_type(dir));
  if (it == registry().end()) return false;
  return device.is_cpu() || (built_with_cuda() && it->second.cuda);
}

}  // namespace moelora

namespace moelora {

const char* decode_path_name(DecodePath path) {
  return path == DecodePath::fast ? "fast" : "hooks";
}

DecodePath parse_decode_path(const std::string& name) {
  if (name == "hooks") return DecodePath::hooks;
  if (name == "fast") return DecodePath::fast;
  MOELORA_THROW("decode path '{}': expected 'hooks' or 'fast'", name);
}

const char* moe_lora_variant_name(MoeLoraVariant v) {
  switch (v) {
    case MoeLoraVariant::staged:
      return "staged";
    case MoeLoraVariant::overlap:
      return "overlap";
    case MoeLoraVariant::direct:
      return "direct";
    case MoeLoraVariant::inline_ctas:
      return "inline";
    default:
      return "best";
  }
}

MoeLoraVariant parse_moe_lora_variant(const std::string& name) {
  for (MoeLoraVariant v : {MoeLoraVariant::best, MoeLoraVariant::staged, MoeLoraVariant::overlap,
                           MoeLoraVariant::direct, MoeLoraVariant::inline_ctas})
    if (name == moe_lora_variant_name(v)) return v;
  MOELORA_THROW("MoE LoRA variant '{}': expected best, staged, overlap, direct or inline", name);
}

void Model::set_decode_options(const DecodeOptions& options) {
  MOELORA_CHECK(options.path == DecodePath::hooks,
                "{}: no fast decode path for this model family yet (use DecodePath::hooks)",
                config().model_type);
  decode_options_ = options;
  decode_stats_ = {};
}

}  // namespace moelora
