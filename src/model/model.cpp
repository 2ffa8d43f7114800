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

const std::map<std::string, Factory>& registry() {
  static const std::map<std::string, Factory> r = {{"deepseek_v2", make_deepseek},
                                                      {"deepseek_v3", make_deepseek},
                                                      {"kimi_k2", make_deepseek},
                                                      {"qwen3_moe", make_qwen3_moe},
                                                      {"mixtral", make_mixtral}};
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
  MOELORA_CHECK(options.device.is_cpu(),
                "Model::load: only the CPU backend exists so far, "
                "asked for {}",
                options.device.str());
  return it->second(dir, HfModelConfig::load(dir), options);
}

}  // namespace moelora
