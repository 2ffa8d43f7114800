#include "moelora/io/hf_config.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "moelora/core/error.h"

namespace moelora {
namespace {

using nlohmann::json;

// Families moelora has a model for. kimi_k2 is DeepSeek-V3's architecture under its own name.
const std::vector<std::string> kSupported = {"qwen3_moe",   "qwen2_moe",   "mixtral",
                                             "deepseek_v2", "deepseek_v3", "kimi_k2"};

// Typed field access; every error names the file and the field. A null value counts as absent,
// as transformers' config classes treat it.
class Fields {
 public:
  Fields(const json& j, const std::string& path) : j_(j), path_(path) {}

  const json* find(const char* key) const {
    auto it = j_.find(key);
    return it == j_.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(const char* key) const { return find(key) != nullptr; }

  int64_t i64(const char* key) const {
    const json* v = find(key);
    MOELORA_CHECK(v != nullptr, "{}: missing required field '{}'", path_, key);
    return as_int(*v, key);
  }
  int64_t i64(const char* key, int64_t dflt) const {
    const json* v = find(key);
    return v ? as_int(*v, key) : dflt;
  }
  int i32(const char* key) const { return narrow(i64(key), key); }
  int i32(const char* key, int dflt) const { return narrow(i64(key, dflt), key); }

  double f64(const char* key, double dflt) const {
    const json* v = find(key);
    if (!v) return dflt;
    MOELORA_CHECK(v->is_number(), "{}: field '{}': expected a number, found {}", path_, key,
                  v->dump());
    return v->get<double>();
  }
  bool boolean(const char* key, bool dflt) const {
    const json* v = find(key);
    if (!v) return dflt;
    MOELORA_CHECK(v->is_boolean(), "{}: field '{}': expected true or false, found {}", path_, key,
                  v->dump());
    return v->get<bool>();
  }
  std::string str(const char* key, const std::string& dflt) const {
    const json* v = find(key);
    if (!v) return dflt;
    MOELORA_CHECK(v->is_string(), "{}: field '{}': expected a string, found {}", path_, key,
                  v->dump());
    return v->get<std::string>();
  }
  std::vector<int> int_list(const char* key) const {
    std::vector<int> out;
    const json* v = find(key);
    if (!v) return out;
    MOELORA_CHECK(v->is_array(), "{}: field '{}': expected a list of integers, found {}", path_,
                  key, v->dump());
    for (const json& e : *v) out.push_back(narrow(as_int(e, key), key));
    return out;
  }

 private:
  int64_t as_int(const json& v, const char* key) const {
    // Integral floats (e.g. 1e4 written as 10000.0) are accepted; fractions are not.
    if (v.is_number_float()) {
      const double d = v.get<double>();
      MOELORA_CHECK(d == double(int64_t(d)), "{}: field '{}': expected an integer, found {}", path_,
                    key, v.dump());
      return int64_t(d);
    }
    MOELORA_CHECK(v.is_number_integer(), "{}: field '{}': expected an integer, found {}", path_,
                  key, v.dump());
    return v.get<int64_t>();
  }
  int narrow(int64_t v, const char* key) const {
    MOELORA_CHECK(v >= INT32_MIN && v <= INT32_MAX, "{}: field '{}': {} is out of range", path_,
                  key, v);
    return int(v);
  }

  const json& j_;
  const std::string& path_;
};

void check_positive(const std::string& path, const char* key, int64_t v) {
  MOELORA_CHECK(v > 0, "{}: field '{}': expected a positive value, found {}", path, key, v);
}

void parse_deepseek(const Fields& f, HfModelConfig& c) {
  const std::string& p = c.path;
  c.mla = true;
  c.q_lora_rank = f.i32("q_lora_rank", 0);  // null in V2-Lite: plain q_proj
  MOELORA_CHECK(c.q_lora_rank >= 0, "{}: field 'q_lora_rank': expected null or positive, found {}",
                p, c.q_lora_rank);
  c.kv_lora_rank = f.i32("kv_lora_rank");
  c.qk_nope_head_dim = f.i32("qk_nope_head_dim");
  c.qk_rope_head_dim = f.i32("qk_rope_head_dim");
  c.v_head_dim = f.i32("v_head_dim");
  check_positive(p, "kv_lora_rank", c.kv_lora_rank);
  check_positive(p, "qk_nope_head_dim", c.qk_nope_head_dim);
  check_positive(p, "qk_rope_head_dim", c.qk_rope_head_dim);
  check_positive(p, "v_head_dim", c.v_head_dim);
  c.head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim;

  c.intermediate_size = f.i32("intermediate_size");
  c.num_experts = f.i32("n_routed_experts");
  c.moe_intermediate_size = f.i32("moe_intermediate_size");
  c.n_shared_experts = f.i32("n_shared_experts", 0);
  MOELORA_CHECK(c.n_shared_experts >= 0, "{}: field 'n_shared_experts': expected >= 0, found {}", p,
                c.n_shared_experts);
  c.shared_expert_intermediate_size = c.n_shared_experts * c.moe_intermediate_size;
  c.first_k_dense_replace = f.i32("first_k_dense_replace", 0);
  c.num_nextn_predict_layers = f.i32("num_nextn_predict_layers", 0);
  MOELORA_CHECK(c.num_nextn_predict_layers >= 0,
                "{}: field 'num_nextn_predict_layers': expected >= 0, found {}", p,
                c.num_nextn_predict_layers);
  c.moe_layer_freq = f.i32("moe_layer_freq", 1);
  MOELORA_CHECK(c.first_k_dense_replace >= 0,
                "{}: field 'first_k_dense_replace': expected >= 0, found {}", p,
                c.first_k_dense_replace);
  // DeepSeek's own modeling code makes only every moe_layer_freq-th layer sparse; transformers'
  // native port (our conformance reference) ignores the field. Every published checkpoint has
  // 1, so refuse anything else rather than pick a meaning.
  MOELORA_CHECK(c.moe_layer_freq == 1,
                "{}: field 'moe_layer_freq': only 1 is supported (DeepSeek's code and "
                "transformers disagree on other values), found {}",
                p, c.moe_layer_freq);

  const bool v3 = c.model_type != "deepseek_v2";
  const std::string scoring = f.str("scoring_func", v3 ? "sigmoid" : "softmax");
  if (scoring == "softmax") {
    c.scoring_func = ScoringFunc::softmax;
  } else if (scoring == "sigmoid") {
    c.scoring_func = ScoringFunc::sigmoid;
  } else {
    MOELORA_THROW("{}: field 'scoring_func': expected \"softmax\" or \"sigmoid\", found \"{}\"", p,
                  scoring);
  }
  const std::string method = f.str("topk_method", v3 ? "noaux_tc" : "greedy");
  if (method == "greedy") {
    c.topk_method = TopkMethod::greedy;
  } else if (method == "group_limited_greedy") {
    c.topk_method = TopkMethod::group_limited_greedy;
  } else if (method == "noaux_tc") {
    c.topk_method = TopkMethod::noaux_tc;
  } else {
    MOELORA_THROW(
        "{}: field 'topk_method': expected \"greedy\", \"group_limited_greedy\" or \"noaux_tc\", "
        "found \"{}\"",
        p, method);
  }
  // The combinations transformers implements: V2 scores with softmax (greedy or group-limited),
  // V3's noaux_tc with sigmoid + correction bias.
  if (c.topk_method == TopkMethod::noaux_tc) {
    MOELORA_CHECK(c.scoring_func == ScoringFunc::sigmoid,
                  "{}: topk_method \"noaux_tc\" needs scoring_func \"sigmoid\", found \"{}\"", p,
                  scoring);
  } else {
    MOELORA_CHECK(c.scoring_func == ScoringFunc::softmax,
                  "{}: topk_method \"{}\" needs scoring_func \"softmax\", found \"{}\"", p, method,
                  scoring);
  }
  c.n_group = f.i32("n_group", 1);
  c.topk_group = f.i32("topk_group", 1);
  c.norm_topk_prob = f.boolean("norm_topk_prob", v3);
  c.routed_scaling_factor = f.f64("routed_scaling_factor", 1.0);
  // V2 with norm_topk_prob: DeepSeek's gate renormalizes and skips the scaling factor, while
  // transformers' native DeepseekV2Moe ignores norm_topk_prob and always scales. Published V2
  // configs all say false, where both agree; refuse the ambiguous case.
  MOELORA_CHECK(v3 || !c.norm_topk_prob || c.num_experts_per_tok <= 1,
                "{}: field 'norm_topk_prob': true is not supported for deepseek_v2 (DeepSeek's "
                "code and transformers route differently), found true",
                p);
}

void parse_qwen(const Fields& f, HfModelConfig& c) {
  c.intermediate_size = f.i32("intermediate_size", 0);
  // transformers 5 saves Qwen3-MoE's expert count as num_local_experts.
  c.num_experts = f.has("num_local_experts") && !f.has("num_experts")
                      ? f.i32("num_local_experts")
                      : f.i32("num_experts");
  c.moe_intermediate_size = f.i32("moe_intermediate_size");
  c.decoder_sparse_step = f.i32("decoder_sparse_step", 1);
  check_positive(c.path, "decoder_sparse_step", c.decoder_sparse_step);
  c.mlp_only_layers = f.int_list("mlp_only_layers");
  for (int l : c.mlp_only_layers)
    MOELORA_CHECK(l >= 0 && l < c.num_hidden_layers,
                  "{}: field 'mlp_only_layers': layer {} is outside [0, {})", c.path, l,
                  c.num_hidden_layers);
  c.norm_topk_prob = f.boolean("norm_topk_prob", false);
  if (c.model_type == "qwen2_moe") {
    c.shared_expert_intermediate_size = f.i32("shared_expert_intermediate_size");
    MOELORA_CHECK(c.shared_expert_intermediate_size >= 0,
                  "{}: field 'shared_expert_intermediate_size': expected >= 0, found {}", c.path,
                  c.shared_expert_intermediate_size);
    c.shared_expert_gate = c.shared_expert_intermediate_size > 0;
  }
}

// rope_parameters / rope_scaling of rope_type "yarn" (`key` names the object in errors).
// transformers reads beta_fast / beta_slow with `or` (0 means the default) and tests mscale /
// mscale_all_dim for truthiness; the same here.
void parse_yarn(const Fields& r, const char* key, const std::string& path, YarnRope& y) {
  y.factor = r.f64("factor", 0.0);
  MOELORA_CHECK(!r.has("factor") || y.factor > 0.0,
                "{}: field '{}.factor' must be > 0 for YaRN, found {}", path, key, y.factor);
  y.original_max_position = r.i64("original_max_position_embeddings", 0);
  MOELORA_CHECK(!r.has("original_max_position_embeddings") || y.original_max_position > 0,
                "{}: field '{}.original_max_position_embeddings' must be > 0, found {}", path, key,
                y.original_max_position);
  const double bf = r.f64("beta_fast", 0.0), bs = r.f64("beta_slow", 0.0);
  y.beta_fast = bf != 0.0 ? bf : 32.0;
  y.beta_slow = bs != 0.0 ? bs : 1.0;
  MOELORA_CHECK(y.beta_fast > 0.0 && y.beta_slow > 0.0,
                "{}: fields '{}.beta_fast' / 'beta_slow' must be > 0, found {} / {}", path, key,
                y.beta_fast, y.beta_slow);
  y.mscale = r.f64("mscale", 0.0);
  y.mscale_all_dim = r.f64("mscale_all_dim", 0.0);
  y.attention_factor = r.f64("attention_factor", 0.0);
  MOELORA_CHECK(!r.has("attention_factor") || y.attention_factor > 0.0,
                "{}: field '{}.attention_factor' must be > 0, found {}", path, key,
                y.attention_factor);
  y.truncate = r.boolean("truncate", true);
}

}  // namespace

std::vector<std::string> HfModelConfig::supported_model_types() {
  return kSupported;
}

HfModelConfig HfModelConfig::load(const std::string& dir) {
  const std::string path = dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  MOELORA_CHECK(in.good(), "{}: cannot open the model config (expected config.json in {})", path,
                dir);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), path);
}

HfModelConfig HfModelConfig::parse(std::string_view json_text, const std::string& path) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    MOELORA_THROW("{}: not valid JSON: {}", path, e.what());
  }
  MOELORA_CHECK(j.is_object(), "{}: expected a JSON object at the top level, found {}", path,
                j.type_name());
  HfModelConfig c;
  c.path = path;
  const Fields f(j, path);
  MOELORA_CHECK(f.has("model_type"), "{}: missing required field 'model_type' (supported: {})",
                path, fmt::join(kSupported, ", "));
  c.model_type = f.str("model_type", "");
  MOELORA_CHECK(std::find(kSupported.begin(), kSupported.end(), c.model_type) != kSupported.end(),
                "{}: unsupported model_type \"{}\" (supported: {})", path, c.model_type,
                fmt::join(kSupported, ", "));

  c.hidden_size = f.i32("hidden_size");
  c.num_hidden_layers = f.i32("num_hidden_layers");
  c.vocab_size = f.i32("vocab_size");
  check_positive(path, "hidden_size", c.hidden_size);
  check_positive(path, "num_hidden_layers", c.num_hidden_layers);
  check_positive(path, "vocab_size", c.vocab_size);
  c.num_attention_heads = f.i32("num_attention_heads");
  check_positive(path, "num_attention_heads", c.num_attention_heads);
  c.num_key_value_heads = f.i32("num_key_value_heads", c.num_attention_heads);
  check_positive(path, "num_key_value_heads", c.num_key_value_heads);
  MOELORA_CHECK(c.num_attention_heads % c.num_key_value_heads == 0,
                "{}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", path,
                c.num_attention_heads, c.num_key_value_heads);
  c.rope_theta = f.f64("rope_theta", 10000.0);
  // transformers 5 writes rope settings as rope_parameters {rope_theta, rope_type}; older
  // configs have top-level rope_theta and an optional rope_scaling {type | rope_type}.
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    const json* rp = f.find(key);
    if (!rp) continue;
    MOELORA_CHECK(rp->is_object(), "{}: field '{}': expected an object, found {}", path, key,
                  rp->dump());
    Fields r(*rp, path);
    if (r.has("rope_theta")) c.rope_theta = r.f64("rope_theta", c.rope_theta);
    c.rope_type = r.str("rope_type", r.str("type", c.rope_type));
    if (c.rope_type == "yarn") parse_yarn(r, key, path, c.yarn);
    MOELORA_CHECK(r.f64("partial_rotary_factor", 1.0) == 1.0,
                  "{}: field '{}.partial_rotary_factor': only 1 (every head dim rotated) is "
                  "supported, found {}",
                  path, key, r.f64("partial_rotary_factor", 1.0));
  }
  MOELORA_CHECK(f.f64("partial_rotary_factor", 1.0) == 1.0,
                "{}: field 'partial_rotary_factor': only 1 (every head dim rotated) is supported, "
                "found {}",
                path, f.f64("partial_rotary_factor", 1.0));
  c.rms_norm_eps = f.f64("rms_norm_eps", 1e-6);
  c.max_position_embeddings = f.i64("max_position_embeddings", 0);
  c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
  c.num_experts_per_tok = f.i32("num_experts_per_tok");

  if (const json* q = f.find("quantization_config")) {
    MOELORA_CHECK(q->is_object(), "{}: field 'quantization_config': expected an object, found {}",
                  path, q->dump());
    c.has_quantization_config = true;
    c.quant_method = Fields(*q, path).str("quant_method", "");
  }

  if (c.model_type == "deepseek_v2" || c.model_type == "deepseek_v3" || c.model_type == "kimi_k2") {
    parse_deepseek(f, c);
  } else {
    // Most configs leave head_dim out (or null) and mean hidden / heads.
    if (f.has("head_dim")) {
      c.head_dim = f.i32("head_dim");
    } else {
      MOELORA_CHECK(c.hidden_size % c.num_attention_heads == 0,
                    "{}: no head_dim and hidden_size ({}) is not a multiple of "
                    "num_attention_heads ({})",
                    path, c.hidden_size, c.num_attention_heads);
      c.head_dim = c.hidden_size / c.num_attention_heads;
    }
    check_positive(path, "head_dim", c.head_dim);
    if (c.model_type == "mixtral") {
      c.num_experts = f.i32("num_local_experts");
      c.moe_intermediate_size = f.i32("intermediate_size");
      c.intermediate_size = c.moe_intermediate_size;
      c.norm_topk_prob = true;  // Mixtral always renormalizes its top-k
    } else {
      parse_qwen(f, c);
    }
  }

  check_positive(path,
                 c.model_type == "mixtral" ? "num_local_experts"
                 : c.mla                   ? "n_routed_experts"
                                           : "num_experts",
                 c.num_experts);
  check_positive(path, "num_experts_per_tok", c.num_experts_per_tok);
  check_positive(path, c.model_type == "mixtral" ? "intermediate_size" : "moe_intermediate_size",
                 c.moe_intermediate_size);
  MOELORA_CHECK(c.num_experts_per_tok <= c.num_experts,
                "{}: num_experts_per_tok ({}) exceeds the number of experts ({})", path,
                c.num_experts_per_tok, c.num_experts);
  check_positive(path, "n_group", c.n_group);
  check_positive(path, "topk_group", c.topk_group);
  MOELORA_CHECK(c.num_experts % c.n_group == 0,
                "{}: n_group ({}) must divide the number of experts ({})", path, c.n_group,
                c.num_experts);
  MOELORA_CHECK(c.topk_group <= c.n_group, "{}: topk_group ({}) exceeds n_group ({})", path,
                c.topk_group, c.n_group);
  MOELORA_CHECK(c.routed_scaling_factor > 0,
                "{}: field 'routed_scaling_factor': expected a positive value, found {}", path,
                c.routed_scaling_factor);
  if (c.topk_method != TopkMethod::greedy) {
    // Enough experts in the kept groups to fill top_k.
    MOELORA_CHECK(int64_t(c.topk_group) * (c.num_experts / c.n_group) >= c.num_experts_per_tok,
                  "{}: topk_group ({}) groups of {} experts cannot hold num_experts_per_tok ({})",
                  path, c.topk_group, c.num_experts / c.n_group, c.num_experts_per_tok);
  }
  // Fail now, naming the file, rather than when the layer is built.
  try {
    c.moe_shape().validate();
    c.router().validate();
  } catch (const Error& e) {
    MOELORA_THROW("{}: {}", path, e.message());
  }
  return c;
}

MoeShape HfModelConfig::moe_shape() const {
  MoeShape s;
  s.name = model_type;
  s.hidden = hidden_size;
  s.inter = moe_intermediate_size;
  s.num_experts = num_experts;
  s.top_k = num_experts_per_tok;
  s.shared_inter = shared_expert_intermediate_size;
  s.shared_gate = shared_expert_gate;
  return s;
}

RouterConfig HfModelConfig::router() const {
  if (model_type == "mixtral")
    return RouterConfig::softmax_topk(num_experts, num_experts_per_tok, true);
  if (model_type == "qwen3_moe" || model_type == "qwen2_moe")
    return RouterConfig::softmax_topk(num_experts, num_experts_per_tok, norm_topk_prob);
  if (topk_method == TopkMethod::noaux_tc) {
    // V3 / Kimi-K2: sigmoid, bias-corrected selection, groups scored by their top-2 sum.
    return RouterConfig::deepseek_v3(num_experts, num_experts_per_tok, n_group, topk_group,
                                     float(routed_scaling_factor), norm_topk_prob);
  }
  // DeepSeek-V2: softmax, weights times routed_scaling_factor, no renormalization (parse()
  // refuses norm_topk_prob with top_k > 1; for top-1 both references skip it).
  RouterConfig r = RouterConfig::softmax_topk(num_experts, num_experts_per_tok, false);
  if (topk_method == TopkMethod::group_limited_greedy) {
    r.n_group = n_group;
    r.topk_group = topk_group;
    r.group_score = GroupScore::max;
  }
  r.routed_scaling_factor = float(routed_scaling_factor);
  return r;
}

bool HfModelConfig::is_moe_layer(int layer) const {
  MOELORA_CHECK(layer >= 0 && layer < num_hidden_layers, "{}: layer {} is outside [0, {})", path,
                layer, num_hidden_layers);
  if (model_type == "mixtral") return true;
  if (mla) return layer >= first_k_dense_replace;  // moe_layer_freq is 1 (checked in parse)
  // Qwen: mlp_only_layers win, then every decoder_sparse_step-th layer (1-based) is sparse.
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end())
    return false;
  return (layer + 1) % decoder_sparse_step == 0;
}

}  // namespace moelora
