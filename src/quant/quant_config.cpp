#include "moelora/quant/quant_config.h"

#include <algorithm>
#include <cctype>

#include <nlohmann/json.hpp>

#include "moelora/quant/nvfp4.h"

namespace moelora::quant {
namespace {

using nlohmann::json;

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// The value of the first of `keys` present (null counts as absent), or nullptr.
const json* find(const json& obj, std::initializer_list<const char*> keys) {
  for (const char* k : keys) {
    auto it = obj.find(k);
    if (it != obj.end() && !it->is_null()) return &*it;
  }
  return nullptr;
}

int64_t get_int(const json& obj, std::initializer_list<const char*> keys, const std::string& src,
                const std::string& where) {
  const json* v = find(obj, keys);
  MOELORA_CHECK(v != nullptr, "{}: {}: missing '{}'", src, where, *keys.begin());
  MOELORA_CHECK(v->is_number_integer(), "{}: {}.{}: expected an integer, found {}", src, where,
                *keys.begin(), v->dump());
  return v->get<int64_t>();
}

bool get_bool(const json& obj, const char* key, bool dflt, const std::string& src,
              const std::string& where) {
  const json* v = find(obj, {key});
  if (!v) return dflt;
  MOELORA_CHECK(v->is_boolean(), "{}: {}.{}: expected true or false, found {}", src, where, key,
                v->dump());
  return v->get<bool>();
}

std::string get_string(const json& obj, std::initializer_list<const char*> keys,
                       const std::string& dflt, const std::string& src, const std::string& where) {
  const json* v = find(obj, keys);
  if (!v) return dflt;
  MOELORA_CHECK(v->is_string(), "{}: {}.{}: expected a string, found {}", src, where, *keys.begin(),
                v->dump());
  return v->get<std::string>();
}

std::vector<std::string> get_strings(const json& obj, const char* key) {
  std::vector<std::string> out;
  const json* v = find(obj, {key});
  if (v && v->is_array())
    for (const json& e : *v)
      if (e.is_string()) out.push_back(e.get<std::string>());
  return out;
}

// Runs a dims check for a representative shape so unsupported settings fail at parse time,
// with the config file named.
template <class F>
void check_settings(const std::string& src, F&& f) {
  try {
    f();
  } catch (const Error& e) {
    MOELORA_THROW("{}: {}", src, e.message());
  }
}

void parse_gptq(const json& q, const std::string& src, QuantScheme& s) {
  s.method = QuantMethod::gptq;
  s.gptq.bits = int(get_int(q, {"bits"}, src, "gptq"));
  s.gptq.group_size = get_int(q, {"group_size"}, src, "gptq");
  s.gptq.desc_act = get_bool(q, "desc_act", false, src, "gptq");
  s.gptq.sym = get_bool(q, "sym", true, src, "gptq");
  const std::string fmt =
      lower(get_string(q, {"checkpoint_format", "format"}, "gptq", src, "gptq"));
  if (fmt == "gptq") {
    s.gptq.zero_format = GptqZeroFormat::v1_minus_one;
  } else if (fmt == "gptq_v2") {
    s.gptq.zero_format = GptqZeroFormat::v2_true;
  } else {
    MOELORA_THROW("{}: gptq checkpoint_format: supported \"gptq\" and \"gptq_v2\", found \"{}\"",
                  src, fmt);
  }
  check_settings(src, [&] { gptq_dims(s.gptq, 256, 1024); });
}

void parse_awq(const json& q, const std::string& src, QuantScheme& s) {
  s.method = QuantMethod::awq;
  s.awq.bits = int(get_int(q, {"bits", "w_bit"}, src, "awq"));
  s.awq.group_size = get_int(q, {"group_size", "q_group_size"}, src, "awq");
  const std::string version = lower(get_string(q, {"version"}, "gemm", src, "awq"));
  MOELORA_CHECK(version == "gemm",
                "{}: awq version: only \"gemm\" (qweight [K, N/8]) is supported, found \"{}\"", src,
                version);
  MOELORA_CHECK(get_bool(q, "zero_point", true, src, "awq"),
                "{}: awq zero_point: false is not supported (the GEMM format has zero points)",
                src);
  check_settings(src, [&] { awq_dims(s.awq, 256, 1024); });
  s.unquantized_modules = get_strings(q, "modules_to_not_convert");
}

void parse_ct(const json& q, const std::string& src, QuantScheme& s) {
  s.method = QuantMethod::ct_pack;
  const json* groups = find(q, {"config_groups"});
  MOELORA_CHECK(groups && groups->is_object() && !groups->empty(),
                "{}: compressed-tensors: missing config_groups", src);
  const json* weights = nullptr;
  std::string group_name, format = get_string(q, {"format"}, "", src, "quantization_config");
  for (const auto& [name, g] : groups->items()) {
    const json* w = find(g, {"weights"});
    if (!w) continue;
    MOELORA_CHECK(weights == nullptr,
                  "{}: compressed-tensors: config groups '{}' and '{}' both quantize weights; one "
                  "scheme per checkpoint is supported",
                  src, group_name, name);
    weights = w;
    group_name = name;
    if (format.empty()) format = get_string(g, {"format"}, "", src, name);
    MOELORA_CHECK(find(g, {"input_activations"}) == nullptr,
                  "{}: config_groups.{}: input_activations are quantized; only weight-only "
                  "(wNa16) pack-quantized schemes are supported",
                  src, name);
  }
  MOELORA_CHECK(weights != nullptr, "{}: compressed-tensors: no config group quantizes weights",
                src);
  MOELORA_CHECK(format == "pack-quantized",
                "{}: compressed-tensors format: supported \"pack-quantized\", found \"{}\"", src,
                format);
  const std::string where = "config_groups." + group_name + ".weights";
  const std::string type = get_string(*weights, {"type"}, "int", src, where);
  MOELORA_CHECK(type == "int", "{}: {}.type: supported \"int\", found \"{}\"", src, where, type);
  s.ct.bits = int(get_int(*weights, {"num_bits"}, src, where));
  s.ct.symmetric = get_bool(*weights, "symmetric", true, src, where);
  MOELORA_CHECK(!get_bool(*weights, "dynamic", false, src, where),
                "{}: {}.dynamic: dynamic weight quantization is not a stored format", src, where);
  const std::string strategy = get_string(*weights, {"strategy"}, "", src, where);
  if (strategy == "group") {
    s.ct.strategy = CtStrategy::group;
    s.ct.group_size = get_int(*weights, {"group_size"}, src, where);
  } else if (strategy == "channel") {
    s.ct.strategy = CtStrategy::channel;
  } else {
    MOELORA_THROW("{}: {}.strategy: supported \"group\" and \"channel\", found \"{}\"", src, where,
                  strategy);
  }
  if (const json* ao = find(*weights, {"actorder"})) {
    // "group" / "dynamic" store weight_g_idx; "weight" / "static" reorder without one.
    s.ct_actorder = (ao->is_boolean() && ao->get<bool>()) ||
                    (ao->is_string() && (*ao == "group" || *ao == "dynamic"));
  }
  check_settings(src, [&] { ct_pack_dims(s.ct, 256, 1024); });
  s.unquantized_modules = get_strings(q, "ignore");
}

void parse_fp8(const json& q, const std::string& src, QuantScheme& s) {
  s.method = QuantMethod::fp8_block;
  const json* block = find(q, {"weight_block_size"});
  MOELORA_CHECK(block != nullptr,
                "{}: fp8 without weight_block_size is per-tensor fp8; only block-scale fp8 "
                "(weight_block_size [128, 128]) is supported",
                src);
  MOELORA_CHECK(block->is_array() && block->size() == 2 && (*block)[0].is_number_integer() &&
                    (*block)[1].is_number_integer(),
                "{}: fp8 weight_block_size: expected [rows, cols], found {}", src, block->dump());
  s.fp8.block_n = (*block)[0].get<int64_t>();
  s.fp8.block_k = (*block)[1].get<int64_t>();
  MOELORA_CHECK(s.fp8.block_n > 0 && s.fp8.block_k > 0,
                "{}: fp8 weight_block_size: expected positive sizes, found {}", src, block->dump());
  const std::string fmt = lower(get_string(q, {"fmt"}, "e4m3", src, "fp8"));
  MOELORA_CHECK(fmt == "e4m3", "{}: fp8 fmt: supported \"e4m3\", found \"{}\"", src, fmt);
  const std::string act = get_string(q, {"activation_scheme"}, "dynamic", src, "fp8");
  MOELORA_CHECK(act == "dynamic",
                "{}: fp8 activation_scheme: supported \"dynamic\" (1x128 per-token groups), found "
                "\"{}\"",
                src, act);
  s.unquantized_modules = get_strings(q, "modules_to_not_convert");
}

void parse_modelopt(const json& q, const std::string& src, QuantScheme& s) {
  s.method = QuantMethod::nvfp4;
  const std::string algo = get_string(q, {"quant_algo"}, "", src, "modelopt");
  MOELORA_CHECK(algo == "NVFP4", "{}: modelopt quant_algo: supported \"NVFP4\", found \"{}\"", src,
                algo);
  const json* g = find(q, {"group_size"});
  MOELORA_CHECK(!g || (g->is_number_integer() && g->get<int64_t>() == kNvfp4GroupSize),
                "{}: NVFP4 group_size: expected 16, found {}", src, g ? g->dump() : "");
  s.unquantized_modules = get_strings(q, "exclude_modules");
  if (s.unquantized_modules.empty()) s.unquantized_modules = get_strings(q, "ignore");
}

QuantScheme parse_object(const json& j, const std::string& src) {
  MOELORA_CHECK(j.is_object(), "{}: expected a JSON object, found {}", src, j.type_name());
  if (const json* qc = find(j, {"quantization_config"})) return parse_object(*qc, src);
  QuantScheme s;
  if (const json* q = find(j, {"quantization"})) {  // hf_quant_config.json
    MOELORA_CHECK(q->is_object(), "{}: quantization: expected an object", src);
    parse_modelopt(*q, src, s);
    return s;
  }
  const std::string method = lower(get_string(j, {"quant_method"}, "", src, "config"));
  if (method == "gptq" || (method.empty() && j.contains("bits") && j.contains("group_size"))) {
    parse_gptq(j, src, s);
  } else if (method == "awq") {
    parse_awq(j, src, s);
  } else if (method == "compressed-tensors") {
    parse_ct(j, src, s);
  } else if (method == "fp8") {
    parse_fp8(j, src, s);
  } else if (method == "modelopt") {
    parse_modelopt(j, src, s);
  } else {
    MOELORA_THROW(
        "{}: quant_method \"{}\": supported gptq, awq, compressed-tensors "
        "(pack-quantized), fp8 (block-scale) and modelopt (NVFP4)",
        src, method);
  }
  return s;
}

}  // namespace

const char* quant_method_name(QuantMethod m) {
  switch (m) {
    case QuantMethod::gptq:
      return "gptq";
    case QuantMethod::awq:
      return "awq";
    case QuantMethod::ct_pack:
      return "compressed-tensors pack-quantized";
    case QuantMethod::fp8_block:
      return "fp8 block-scale";
    case QuantMethod::nvfp4:
      return "nvfp4";
  }
  return "?";
}

QuantScheme parse_quant_config(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    MOELORA_THROW("{}: not valid JSON: {}", source, e.what());
  }
  return parse_object(j, source);
}

}  // namespace moelora::quant
