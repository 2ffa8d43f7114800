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

void write_random_adapter(const std::string& dir, const HfModelConfig& c, int r, uint64_t seed) {
  MOELORA_CHECK(c.model_type == "qwen3_moe" || c.model_type == "mixtral",
                "write_random_adapter: knows Qwen3-MoE and Mixtral module names, not '{}'",
                c.model_type);
  MOELORA_CHECK(r >= 1, "write_random_adapter: rank must be >= 1, found {}", r);
  fs::create_directories(dir);
  const bool mixtral = c.model_type == "mixtral";
  const std::string experts = mixtral ? "block_sparse_moe.experts" : "mlp.experts";
  const std::array<std::string, 3> proj = mixtral ? std::array<std::string, 3>{"w1", "w3", "w2"}
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
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    add(p + "self_attn.q_proj", nq, H);
    add(p + "self_attn.k_proj", nkv, H);
    add(p + "self_attn.v_proj", nkv, H);
    add(p + "self_attn.o_proj", H, nq);
    if (!c.is_moe_layer(l)) {
      const int64_t Id = c.intermediate_size;
      add(p + "mlp.gate_proj", Id, H);
      add(p + "mlp.up_proj", Id, H);
      add(p + "mlp.down_proj", H, Id);
      continue;
    }
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
  cfg["target_modules"] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"};
  if (mixtral) cfg["target_modules"] = {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"};
  std::ofstream(dir + "/adapter_config.json") << cfg.dump(2) << "\n";
}

}  // namespace moelora
