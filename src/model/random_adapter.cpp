#include "model/random_adapter.h"

#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "moelora/core/random.h"
#include "moelora/io/safetensors.h"

namespace moelora {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

bool is_deepseek(const std::string& model_type) {
  return model_type == "deepseek_v2" || model_type == "deepseek_v3" || model_type == "kimi_k2";
}

}  // namespace

void write_random_adapter(const std::string& dir, const HfModelConfig& c, int r, uint64_t seed,
                          const std::string& targets) {
  MOELORA_CHECK(targets == "all" || targets == "attention" || targets == "experts",
                "write_random_adapter: targets must be all, attention or experts, found '{}'",
                targets);
  const bool attention = targets != "experts", experts_on = targets != "attention";
  const bool deepseek = is_deepseek(c.model_type);
  MOELORA_CHECK(c.model_type == "qwen3_moe" || c.model_type == "mixtral" || deepseek,
                "write_random_adapter: knows Qwen3-MoE, Mixtral and DeepSeek-V2/V3/Kimi-K2 "
                "module names, not '{}'",
                c.model_type);
  MOELORA_CHECK(r >= 1, "write_random_adapter: rank must be >= 1, found {}", r);
  fs::create_directories(dir);
  const bool mixtral = c.model_type == "mixtral";
  const std::string experts = mixtral ? "block_sparse_moe.experts" : "mlp.experts";
  const std::array<std::string, 3> proj =
      mixtral ? std::array<std::string, 3>{"w1", "w3", "w2"}
              : std::array<std::string, 3>{"gate_proj", "up_proj", "down_proj"};
  const int64_t H = c.hidden_size, D = c.head_dim, I = c.moe_intermediate_size;
  const int64_t nq = int64_t(c.num_attention_heads) * D, nkv = int64_t(c.num_key_value_heads) * D;
  const Stream cpu;
  uint64_t sd = seed;
  auto make = [&](int64_t rows, int64_t cols, float a) {
    Tensor t = Tensor::empty({rows, cols}, DType::bf16);
    fill_uniform(t, sd++, -a, a, cpu);
    return t;
  };
  std::map<std::string, Tensor> t;
  // lora_A [r, in] ~ 1/sqrt(in), lora_B [out, r] small: deltas of a few percent.
  auto add = [&](const std::string& module, int64_t out, int64_t in) {
    const std::string k = "base_model.model." + module;
    t[k + ".lora_A.weight"] = make(r, in, 1.0f / std::sqrt(float(in)));
    t[k + ".lora_B.weight"] = make(out, r, 0.02f);
  };
  // DeepSeek's MLA projections (what deepseek.cpp takes LoRA on besides the routed experts;
  // it refuses dense MLP and shared-expert LoRA, so none is written for them).
  auto add_mla = [&](const std::string& p) {
    const int64_t nh = c.num_attention_heads, qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
    const int64_t L = c.kv_lora_rank;
    if (c.q_lora_rank > 0) {
      add(p + "self_attn.q_a_proj", c.q_lora_rank, H);
      add(p + "self_attn.q_b_proj", nh * qk, c.q_lora_rank);
    } else {
      add(p + "self_attn.q_proj", nh * qk, H);
    }
    add(p + "self_attn.kv_a_proj_with_mqa", L + c.qk_rope_head_dim, H);
    add(p + "self_attn.kv_b_proj", nh * (c.qk_nope_head_dim + c.v_head_dim), L);
    add(p + "self_attn.o_proj", H, nh * c.v_head_dim);
  };
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    if (deepseek) {
      if (attention) add_mla(p);
      if (!c.is_moe_layer(l)) continue;
    } else if (attention) {
      add(p + "self_attn.q_proj", nq, H);
      add(p + "self_attn.k_proj", nkv, H);
      add(p + "self_attn.v_proj", nkv, H);
      add(p + "self_attn.o_proj", H, nq);
    }
    if (!c.is_moe_layer(l)) {
      if (targets != "all") continue;  // dense MLP LoRA only in "all" adapters
      const int64_t Id = c.intermediate_size;
      add(p + "mlp.gate_proj", Id, H);
      add(p + "mlp.up_proj", Id, H);
      add(p + "mlp.down_proj", H, Id);
      continue;
    }
    if (!experts_on) continue;
    const std::array<Tensor, 6> ab = {make(r, H, 1.0f / std::sqrt(float(H))), make(I, r, 0.02f),
                                      make(r, H, 1.0f / std::sqrt(float(H))), make(I, r, 0.02f),
                                      make(r, I, 1.0f / std::sqrt(float(I))), make(H, r, 0.02f)};
    for (int e = 0; e < c.num_experts; ++e)
      for (int j = 0; j < 3; ++j) {
        const std::string k =
            fmt::format("base_model.model.{}{}.{}.{}", p, experts, e, proj[size_t(j)]);
        t[k + ".lora_A.weight"] = ab[size_t(2 * j)];
        t[k + ".lora_B.weight"] = ab[size_t(2 * j + 1)];
      }
  }
  save_safetensors(dir + "/adapter_model.safetensors", t);
  json cfg;
  cfg["peft_type"] = "LORA";
  cfg["r"] = r;
  cfg["lora_alpha"] = 2 * r;
  cfg["use_rslora"] = false;
  cfg["use_dora"] = false;
  cfg["fan_in_fan_out"] = false;
  cfg["bias"] = "none";
  cfg["base_model_name_or_path"] = nullptr;
  cfg["target_modules"] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                           "gate_proj", "up_proj", "down_proj"};
  if (mixtral) cfg["target_modules"] = {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"};
  if (deepseek) {
    cfg["target_modules"] = {"kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                             "gate_proj",          "up_proj",   "down_proj"};
    if (c.q_lora_rank > 0) {
      cfg["target_modules"].push_back("q_a_proj");
      cfg["target_modules"].push_back("q_b_proj");
    } else {
      cfg["target_modules"].push_back("q_proj");
    }
  }
  // Only the modules written (an "attention" adapter lists no expert projections, and the
  // reverse), so the loader's target check sees what the file holds.
  json kept = json::array();
  for (const auto& m : cfg["target_modules"]) {
    const std::string name = m.get<std::string>();
    const bool expert = name == "gate_proj" || name == "up_proj" || name == "down_proj" ||
                        name == "w1" || name == "w2" || name == "w3";
    if (expert ? experts_on : attention) kept.push_back(name);
  }
  cfg["target_modules"] = kept;
  std::ofstream(dir + "/adapter_config.json") << cfg.dump(2) << "\n";
}

}  // namespace moelora
