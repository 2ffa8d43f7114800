#include "moelora/lora/peft_adapter.h"

#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "moelora/io/safetensors.h"

namespace moelora {
namespace {

// ordered_json keeps rank_pattern / alpha_pattern in file order, which peft's first-match rule
// depends on.
using json = nlohmann::ordered_json;

constexpr const char* kKeyPrefix = "base_model.model.";
constexpr const char* kBaseLayer = "base_layer";

std::vector<std::string> split_dots(const std::string& s) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    size_t dot = s.find('.', start);
    parts.push_back(s.substr(start, dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return parts;
}

std::string join_dots(const std::vector<std::string>& parts, size_t begin, size_t end) {
  std::string out;
  for (size_t i = begin; i < end; ++i) out += (i > begin ? "." : "") + parts[i];
  return out;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// `module` without trailing `.base_layer` components (peft nests one per extra wrapping).
std::string strip_base_layers(std::string module) {
  const std::string tail = std::string(".") + kBaseLayer;
  while (ends_with(module, tail)) module.resize(module.size() - tail.size());
  return module;
}

// `module` equals `name` or ends with "." + name.
bool dotted_suffix(const std::string& module, const std::string& name) {
  return module == name || ends_with(module, "." + name);
}

const json* field(const json& obj, const char* key) {
  auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

bool get_bool(const json& obj, const char* key, const std::string& src) {
  const json* v = field(obj, key);
  if (!v) return false;
  MOELORA_CHECK(v->is_boolean(), "{}: '{}': expected true or false, found {}", src, key, v->dump());
  return v->get<bool>();
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MOELORA_CHECK(in.good(), "{}: cannot open (expected a PEFT adapter_config.json)", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool is_float_dtype(const std::string& d) { return d == "F32" || d == "BF16" || d == "F16"; }

// Where one stored key belongs.
struct ParsedKey {
  enum Kind { lora_a, lora_b, embedding, other } kind = other;
  std::string module;
};

ParsedKey parse_key(const std::string& key) {
  ParsedKey out;
  if (key.rfind(kKeyPrefix, 0) != 0) return out;
  const std::vector<std::string> parts = split_dots(key.substr(std::string(kKeyPrefix).size()));
  const size_t n = parts.size();
  for (const std::string& p : parts)
    if (p == "lora_embedding_A" || p == "lora_embedding_B") {
      out.kind = ParsedKey::embedding;
      return out;
    }
  // <module>.lora_A.weight, or <module>.lora_A.<adapter name>.weight (older peft, or files
  // saved without stripping the adapter name).
  if (n < 3 || parts[n - 1] != "weight") return out;
  for (size_t at : {n - 2, n - 3}) {
    if (at < 1) continue;
    if (parts[at] == "lora_A" || parts[at] == "lora_B") {
      out.kind = parts[at] == "lora_A" ? ParsedKey::lora_a : ParsedKey::lora_b;
      out.module = join_dots(parts, 0, at);
      return out;
    }
  }
  return out;
}

std::string why_unsupported(const std::string& key) {
  if (key.find("lora_magnitude_vector") != std::string::npos)
    return "a DoRA magnitude vector (DoRA is not supported)";
  if (key.find("modules_to_save") != std::string::npos ||
      key.find("original_module") != std::string::npos)
    return "a modules_to_save weight (full replacement modules are not supported)";
  if (ends_with(key, ".bias")) return "a LoRA bias (lora_bias is not supported)";
  if (key.rfind(kKeyPrefix, 0) != 0) return fmt::format("not under '{}'", kKeyPrefix);
  return "not a lora_A / lora_B weight";
}

}  // namespace

std::optional<std::string> peft_pattern_key(const std::vector<std::string>& keys,
                                            const std::string& module) {
  for (const std::string& k : keys)
    if (k == module) return k;
  for (const std::string& k : keys) {
    try {
      if (std::regex_match(module, std::regex("(.*\\.)?(" + k + ")"))) return k;
    } catch (const std::regex_error& e) {
      MOELORA_THROW("pattern key '{}' is not a valid regex: {}", k, e.what());
    }
  }
  return std::nullopt;
}

PeftAdapterConfig PeftAdapterConfig::parse(const std::string& json_text, const std::string& src) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    MOELORA_THROW("{}: not valid JSON: {}", src, e.what());
  }
  MOELORA_CHECK(j.is_object(), "{}: expected a JSON object, found {}", src, j.type_name());
  PeftAdapterConfig c;
  c.source = src;

  const json* pt = field(j, "peft_type");
  MOELORA_CHECK(pt && pt->is_string(), "{}: 'peft_type': expected \"LORA\", found {}", src,
                pt ? pt->dump() : "nothing");
  c.peft_type = pt->get<std::string>();
  MOELORA_CHECK(c.peft_type == "LORA", "{}: 'peft_type': expected \"LORA\", found \"{}\"", src,
                c.peft_type);

  const json* r = field(j, "r");
  MOELORA_CHECK(r && r->is_number_integer() && r->get<int64_t>() > 0,
                "{}: 'r': expected a positive integer, found {}", src, r ? r->dump() : "nothing");
  c.r = r->get<int>();
  const json* alpha = field(j, "lora_alpha");
  if (alpha) {
    MOELORA_CHECK(alpha->is_number(), "{}: 'lora_alpha': expected a number, found {}", src,
                  alpha->dump());
    c.lora_alpha = alpha->get<float>();
  }  // peft's default lora_alpha is 8, as initialized above
  c.use_rslora = get_bool(j, "use_rslora", src);
  c.use_dora = get_bool(j, "use_dora", src);
  MOELORA_CHECK(!c.use_dora, "{}: 'use_dora': expected false, found true (DoRA adapters are not "
                "supported)", src);
  c.fan_in_fan_out = get_bool(j, "fan_in_fan_out", src);

  if (const json* tm = field(j, "target_modules")) {
    if (tm->is_string()) {
      c.target_modules_regex = tm->get<std::string>();
    } else {
      MOELORA_CHECK(tm->is_array(), "{}: 'target_modules': expected a list or a string, found {}",
                    src, tm->dump());
      for (const json& e : *tm) {
        MOELORA_CHECK(e.is_string(), "{}: 'target_modules': expected strings, found {}", src,
                      e.dump());
        c.target_modules.push_back(e.get<std::string>());
      }
    }
  }
  if (const json* tp = field(j, "target_parameters")) {
    MOELORA_CHECK(tp->is_array(), "{}: 'target_parameters': expected a list, found {}", src,
                  tp->dump());
    for (const json& e : *tp) {
      MOELORA_CHECK(e.is_string(), "{}: 'target_parameters': expected strings, found {}", src,
                    e.dump());
      c.target_parameters.push_back(e.get<std::string>());
    }
  }
  if (const json* rp = field(j, "rank_pattern")) {
    MOELORA_CHECK(rp->is_object(), "{}: 'rank_pattern': expected an object, found {}", src,
                  rp->dump());
    for (const auto& [k, v] : rp->items()) {
      MOELORA_CHECK(v.is_number_integer() && v.get<int64_t>() > 0,
                    "{}: 'rank_pattern.{}': expected a positive integer, found {}", src, k,
                    v.dump());
      c.rank_pattern.emplace_back(k, v.get<int>());
    }
  }
  if (const json* ap = field(j, "alpha_pattern")) {
    MOELORA_CHECK(ap->is_object(), "{}: 'alpha_pattern': expected an object, found {}", src,
                  ap->dump());
    for (const auto& [k, v] : ap->items()) {
      MOELORA_CHECK(v.is_number(), "{}: 'alpha_pattern.{}': expected a number, found {}", src, k,
                    v.dump());
      c.alpha_pattern.emplace_back(k, v.get<float>());
    }
  }
  if (const json* b = field(j, "base_model_name_or_path")) {
    MOELORA_CHECK(b->is_string(), "{}: 'base_model_name_or_path': expected a string, found {}",
                  src, b->dump());
    c.base_model_name_or_path = b->get<std::string>();
  }
  if (const json* l = field(j, "layers_to_transform")) {
    if (l->is_number_integer()) {
      c.layers_to_transform.push_back(l->get<int>());
    } else {
      MOELORA_CHECK(l->is_array(), "{}: 'layers_to_transform': expected an integer or a list, "
                    "found {}", src, l->dump());
      for (const json& e : *l) {
        MOELORA_CHECK(e.is_number_integer(), "{}: 'layers_to_transform': expected integers, "
                      "found {}", src, e.dump());
        c.layers_to_transform.push_back(e.get<int>());
      }
    }
  }
  // Validate the pattern keys now, so a bad regex names the config file.
  try {
    std::vector<std::string> keys;
    for (const auto& [k, v] : c.rank_pattern) keys.push_back(k);
    for (const auto& [k, v] : c.alpha_pattern) keys.push_back(k);
    peft_pattern_key(keys, "");
  } catch (const Error& e) {
    MOELORA_THROW("{}: rank_pattern / alpha_pattern: {}", src, e.message());
  }
  return c;
}

PeftAdapterConfig PeftAdapterConfig::load(const std::string& path) {
  return parse(read_text(path), path);
}

int PeftAdapterConfig::rank_for(const std::string& module) const {
  std::vector<std::string> keys;
  for (const auto& [k, v] : rank_pattern) keys.push_back(k);
  const auto key = peft_pattern_key(keys, module);
  if (!key) return r;
  for (const auto& [k, v] : rank_pattern)
    if (k == *key) return v;
  return r;
}

float PeftAdapterConfig::alpha_for(const std::string& module) const {
  std::vector<std::string> keys;
  for (const auto& [k, v] : alpha_pattern) keys.push_back(k);
  const auto key = peft_pattern_key(keys, module);
  if (!key) return lora_alpha;
  for (const auto& [k, v] : alpha_pattern)
    if (k == *key) return v;
  return lora_alpha;
}

bool PeftAdapterConfig::is_parameter_module(const std::string& module) const {
  const std::string m = strip_base_layers(module);
  for (const std::string& p : target_parameters) {
    const size_t dot = p.rfind('.');
    // A bare parameter name ("gate_up_proj") may sit on any module.
    if (dot == std::string::npos || dotted_suffix(m, p.substr(0, dot))) return true;
  }
  return false;
}

const PeftLoraModule* PeftAdapter::find(const std::string& module) const {
  auto it = modules_.find(module);
  return it == modules_.end() ? nullptr : &it->second;
}

PeftAdapter PeftAdapter::load(const std::string& dir) {
  PeftAdapter ad;
  ad.dir_ = dir;
  ad.config_ = PeftAdapterConfig::load(dir + "/adapter_config.json");
  const PeftAdapterConfig& cfg = ad.config_;
  SafetensorsFile file(dir + "/adapter_model.safetensors");
  const std::string& path = file.path();

  for (const std::string& key : file.names()) {
    const ParsedKey pk = parse_key(key);
    if (pk.kind == ParsedKey::embedding) {
      ad.unsupported_keys_.push_back(key);
      continue;
    }
    MOELORA_CHECK(pk.kind != ParsedKey::other, "{}: key '{}' is {}; expected "
                  "'{}<module>.lora_A.weight' or '.lora_B.weight'", path, key,
                  why_unsupported(key), kKeyPrefix);
    const SafetensorsEntry& e = file.entry(key);
    MOELORA_CHECK(is_float_dtype(e.dtype), "{}: '{}': expected dtype F32, BF16 or F16, found {}",
                  path, key, e.dtype);
    MOELORA_CHECK(e.shape.size() == 2, "{}: '{}': expected a 2-d LoRA matrix, found shape {}",
                  path, key, shape_str(e.shape));
    PeftLoraModule& m = ad.modules_[pk.module];
    m.name = pk.module;
    std::string& slot = pk.kind == ParsedKey::lora_a ? m.a_key : m.b_key;
    MOELORA_CHECK(slot.empty(), "{}: module '{}' has two {} weights: '{}' and '{}' (more than one "
                  "adapter in the file?)", path, pk.module,
                  pk.kind == ParsedKey::lora_a ? "lora_A" : "lora_B", slot, key);
    slot = key;
    (pk.kind == ParsedKey::lora_a ? m.a : m.b) = file.tensor(key);
  }

  for (auto& [name, m] : ad.modules_) {
    MOELORA_CHECK(!m.a_key.empty(), "{}: '{}' has no matching lora_A weight for module '{}'",
                  path, m.b_key, name);
    MOELORA_CHECK(!m.b_key.empty(), "{}: '{}' has no matching lora_B weight for module '{}'",
                  path, m.a_key, name);
    const int64_t rows = m.a.size(0), cols = m.b.size(1);
    MOELORA_CHECK(rows == cols, "{}: rank mismatch in module '{}': '{}' is {} ({} rows) but '{}' "
                  "is {} ({} columns)", path, name, m.a_key, shape_str(m.a.shape()), rows,
                  m.b_key, shape_str(m.b.shape()), cols);
    // Parameter (3D expert) modules: patterns are matched on the module that owns the
    // parameter, without peft's base_layer nesting.
    const bool param = cfg.is_parameter_module(name);
    const std::string pattern_name = param ? strip_base_layers(name) : name;
    m.r = cfg.rank_for(pattern_name);
    m.alpha = cfg.alpha_for(pattern_name);
    m.scaling = lora_scaling(m.alpha, m.r, cfg.use_rslora);
    if (param) {
      MOELORA_CHECK(rows % m.r == 0, "{}: '{}': a LoRA on a 3D expert parameter needs "
                    "num_experts * r rows with r = {} (config {}), found {}", path, m.a_key, m.r,
                    cfg.source, rows);
    } else {
      MOELORA_CHECK(rows == m.r, "{}: '{}': expected rank {} (r / rank_pattern of {}), found {} "
                    "rows", path, m.a_key, m.r, cfg.source, rows);
    }
  }

  if (!ad.unsupported_keys_.empty()) {
    fmt::print(stderr, "WARNING: adapter {}: {} key(s) are not applied (embedding LoRA is not "
               "supported yet):\n", dir, ad.unsupported_keys_.size());
    for (const std::string& k : ad.unsupported_keys_) fmt::print(stderr, "  {}\n", k);
  }
  return ad;
}

namespace {

// Host f32 copy of a 2-d tensor into `dst` (contiguous, numel elements).
void copy_floats(const Tensor& src, float* dst) {
  for (int64_t i = 0, n = src.numel(); i < n; ++i) dst[i] = float_at(src, i);
}

struct Stacked {
  Tensor a, b;
  float scale = 1.0f;
};

// Stacks one projection's per-expert LoRA into A [E, r, in], B [E, out, r].
Stacked stack_experts(const std::map<int, const PeftLoraModule*>& mods, int num_experts,
                      int64_t in, int64_t out, const std::string& what) {
  std::vector<int> missing;
  for (int e = 0; e < num_experts; ++e)
    if (!mods.count(e)) missing.push_back(e);
  MOELORA_CHECK(missing.empty(), "{}: targeted for some experts but not for experts [{}] (of {}); "
                "expected all experts", what, fmt::join(missing, ", "), num_experts);
  const PeftLoraModule& first = *mods.begin()->second;
  const int64_t r = first.a.size(0);
  Stacked s;
  s.scale = first.scaling;
  s.a = Tensor::empty({num_experts, r, in}, DType::f32);
  s.b = Tensor::empty({num_experts, out, r}, DType::f32);
  for (const auto& [e, m] : mods) {
    MOELORA_CHECK(m->a.size(0) == r && m->scaling == first.scaling,
                  "{}: expert {} has rank {} and scale {}, expert {} rank {} and scale {}; "
                  "expected one rank and scale for all experts", what, e, m->a.size(0),
                  m->scaling, mods.begin()->first, r, first.scaling);
    MOELORA_CHECK(m->a.size(1) == in, "'{}': expected [{}, {}], found {}", m->a_key, r, in,
                  shape_str(m->a.shape()));
    MOELORA_CHECK(m->b.size(0) == out, "'{}': expected [{}, {}], found {}", m->b_key, out, r,
                  shape_str(m->b.shape()));
    copy_floats(m->a, s.a.data<float>() + e * r * in);
    copy_floats(m->b, s.b.data<float>() + e * out * r);
  }
  return s;
}

}  // namespace

MoeLoraWeights moe_lora_from_peft(const PeftAdapter& adapter, const std::string& experts_module,
                                  int num_experts, int hidden, int inter) {
  MOELORA_CHECK(num_experts > 0 && hidden > 0 && inter > 0,
                "moe_lora_from_peft: expected positive sizes, found num_experts={} hidden={} "
                "inter={}", num_experts, hidden, inter);
  const std::string where = fmt::format("adapter {}, experts module '{}'", adapter.dir(),
                                        experts_module);
  enum Proj { kGate, kUp, kDown };
  // Per-expert names: peft's module names of transformers 4.x (and Mixtral's w1/w3/w2).
  static const std::map<std::string, Proj> kProjNames = {
      {"gate_proj", kGate}, {"up_proj", kUp}, {"down_proj", kDown},
      {"w1", kGate},        {"w3", kUp},      {"w2", kDown}};
  std::map<int, const PeftLoraModule*> per_expert[3];
  std::string proj_name[3];
  std::vector<const PeftLoraModule*> fused;

  const std::string prefix = experts_module + ".";
  for (const auto& [name, m] : adapter.modules()) {
    if (name == experts_module) {
      fused.push_back(&m);
      continue;
    }
    if (name.rfind(prefix, 0) != 0) continue;
    const std::vector<std::string> parts = split_dots(name.substr(prefix.size()));
    bool all_base = true;
    for (const std::string& p : parts) all_base = all_base && p == kBaseLayer;
    if (all_base) {
      fused.push_back(&m);
      continue;
    }
    const bool digits = parts.size() == 2 && !parts[0].empty() &&
                        parts[0].find_first_not_of("0123456789") == std::string::npos;
    auto proj = digits ? kProjNames.find(parts[1]) : kProjNames.end();
    MOELORA_CHECK(proj != kProjNames.end(), "{}: module '{}' fits neither expert layout; expected "
                  "'<experts>.<e>.{{gate_proj,up_proj,down_proj,w1,w3,w2}}' or "
                  "'<experts>[.base_layer...]'", where, name);
    const int e = std::stoi(parts[0]);
    MOELORA_CHECK(e < num_experts, "{}: module '{}': expert index {} out of range (num_experts "
                  "{})", where, name, e, num_experts);
    const Proj p = proj->second;
    MOELORA_CHECK(proj_name[p].empty() || proj_name[p] == parts[1], "{}: both '{}' and '{}' "
                  "modules found for the same projection", where, proj_name[p], parts[1]);
    proj_name[p] = parts[1];
    per_expert[p][e] = &m;
  }
  const bool any_per_expert = !per_expert[0].empty() || !per_expert[1].empty() ||
                              !per_expert[2].empty();
  MOELORA_CHECK(!(any_per_expert && !fused.empty()), "{}: both per-expert modules and fused 3D "
                "expert modules ('{}') found; expected one layout", where, fused[0]->name);

  MoeLoraWeights w;
  const int64_t H = hidden, I = inter;
  if (!per_expert[kGate].empty()) {
    Stacked s = stack_experts(per_expert[kGate], num_experts, H, I,
                              where + " " + proj_name[kGate]);
    w.gate_a = s.a, w.gate_b = s.b, w.gate_scale = s.scale;
  }
  if (!per_expert[kUp].empty()) {
    Stacked s = stack_experts(per_expert[kUp], num_experts, H, I, where + " " + proj_name[kUp]);
    w.up_a = s.a, w.up_b = s.b, w.up_scale = s.scale;
  }
  if (!per_expert[kDown].empty()) {
    Stacked s = stack_experts(per_expert[kDown], num_experts, I, H,
                              where + " " + proj_name[kDown]);
    w.down_a = s.a, w.down_b = s.b, w.down_scale = s.scale;
  }

  // Fused 3D: gate_up has A [E*r, H], B [2I, E*r]; down A [E*r, I], B [H, E*r]. The pair
  // (in, out) tells them apart for any H and I (equal pairs would need H == I and H == 2I), so
  // the base_layer nesting, which only records the order in which peft wrapped the parameters,
  // is not needed to identify them.
  const PeftLoraModule* gate_up = nullptr;
  const PeftLoraModule* down = nullptr;
  float gate_up_scale = 1.0f, down_scale = 1.0f;
  for (const PeftLoraModule* m : fused) {
    const int64_t in = m->a.size(1), out = m->b.size(0);
    const PeftLoraModule** slot = nullptr;
    if (in == H && out == 2 * I) slot = &gate_up;
    if (in == I && out == H) slot = &down;
    MOELORA_CHECK(slot != nullptr, "{}: module '{}': expected gate_up (lora_A [E*r, {}], lora_B "
                  "[{}, E*r]) or down (lora_A [E*r, {}], lora_B [{}, E*r]), found lora_A {} and "
                  "lora_B {}", where, m->name, H, 2 * I, I, H, shape_str(m->a.shape()),
                  shape_str(m->b.shape()));
    MOELORA_CHECK(*slot == nullptr, "{}: modules '{}' and '{}' both have the {} shapes", where,
                  (*slot ? (*slot)->name : ""), m->name, slot == &gate_up ? "gate_up" : "down");
    // peft matches rank_pattern / alpha_pattern of a parameter LoRA on "<module>.<parameter>"
    // too (peft 0.21 writes e.g. '.*\.gate_up_proj': 2r when it converts gate_proj/up_proj
    // targets): a key naming the parameter takes precedence over the module's r / alpha.
    const std::string param_name =
        strip_base_layers(m->name) + (slot == &gate_up ? ".gate_up_proj" : ".down_proj");
    const PeftAdapterConfig& cfg = adapter.config();
    int r = m->r;
    float alpha = m->alpha;
    std::vector<std::string> keys;
    for (const auto& [k, v] : cfg.rank_pattern) keys.push_back(k);
    if (peft_pattern_key(keys, param_name)) r = cfg.rank_for(param_name);
    keys.clear();
    for (const auto& [k, v] : cfg.alpha_pattern) keys.push_back(k);
    if (peft_pattern_key(keys, param_name)) alpha = cfg.alpha_for(param_name);
    MOELORA_CHECK(m->a.size(0) == int64_t(num_experts) * r,
                  "'{}': expected num_experts * r = {} * {} = {} rows, found {}", m->a_key,
                  num_experts, r, int64_t(num_experts) * r, m->a.size(0));
    (slot == &gate_up ? gate_up_scale : down_scale) = lora_scaling(alpha, r, cfg.use_rslora);
    *slot = m;
  }
  if (gate_up) {
    auto [a, b] = split_peft_expert_lora(gate_up->a, gate_up->b, num_experts, gate_up->a_key);
    w.gate_up_a = a, w.gate_up_b = b, w.gate_up_scale = gate_up_scale;
  }
  if (down) {
    auto [a, b] = split_peft_expert_lora(down->a, down->b, num_experts, down->a_key);
    w.down_a = a, w.down_b = b, w.down_scale = down_scale;
  }
  return w;
}

}  // namespace moelora
