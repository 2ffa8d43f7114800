#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "moelora/io/safetensors.h"
#include "moelora/lora/peft_adapter.h"
#include "test_util.h"

namespace moelora {
namespace {

namespace fs = std::filesystem;

// A fresh adapter directory with `config` as adapter_config.json and `tensors` as
// adapter_model.safetensors.
std::string write_adapter(const std::string& name, const std::string& config,
                          const std::map<std::string, Tensor>& tensors) {
  const fs::path dir = fs::temp_directory_path() /
                       ("moelora_peft_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(dir);  // no files left from an earlier case of the same name
  fs::create_directories(dir);
  std::ofstream(dir / "adapter_config.json") << config;
  save_safetensors((dir / "adapter_model.safetensors").string(), tensors);
  return dir.string();
}

std::string config_json(const std::string& extra = "") {
  return R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": false,
             "target_modules": ["gate_proj", "up_proj", "down_proj"], "unknown_field": {"x": 1})" +
         extra + "}";
}

void expect_same(const Tensor& actual, const Tensor& expected, const std::string& what) {
  ASSERT_TRUE(actual.defined()) << what;
  EXPECT_EQ(actual.shape(), expected.shape()) << what;
  EXPECT_EQ(test::to_floats(actual), test::to_floats(expected)) << what;
}

// Fused 3D (peft 0.21) fixtures against the per-expert matrices peft's forward used.
void check_fixture(const std::string& tag, float expected_scale) {
  const PeftAdapter ad =
      PeftAdapter::load(test::fixture_path("moe_block/qwen3_moe_adapter_" + tag));
  EXPECT_EQ(ad.modules().size(), 2u);
  EXPECT_TRUE(ad.unsupported_keys().empty());
  const MoeLoraWeights w = moe_lora_from_peft(ad, "block.experts", 8, 192, 64);
  SafetensorsFile block(test::fixture_path("moe_block/qwen3_moe_block.safetensors"));
  EXPECT_TRUE(w.has_gate_up_fused());
  EXPECT_FALSE(w.gate_a.defined());
  EXPECT_FALSE(w.up_a.defined());
  expect_same(w.gate_up_a, block.tensor(tag + ".gate_up_a"), tag + ".gate_up_a");
  expect_same(w.gate_up_b, block.tensor(tag + ".gate_up_b"), tag + ".gate_up_b");
  expect_same(w.down_a, block.tensor(tag + ".down_a"), tag + ".down_a");
  expect_same(w.down_b, block.tensor(tag + ".down_b"), tag + ".down_b");
  const float scale = test::to_floats(block.tensor(tag + ".scale"))[0];
  EXPECT_FLOAT_EQ(scale, expected_scale);
  EXPECT_EQ(w.gate_up_scale, scale);
  EXPECT_EQ(w.down_scale, scale);
}

TEST(PeftAdapter, FixtureFusedExperts) {
  check_fixture("a", 8.0f / 4.0f);
  check_fixture("b", 16.0f / std::sqrt(8.0f));  // rsLoRA
  const PeftAdapter b = PeftAdapter::load(test::fixture_path("moe_block/qwen3_moe_adapter_b"));
  EXPECT_TRUE(b.config().use_rslora);
  EXPECT_EQ(b.config().r, 8);
  EXPECT_EQ(b.config().target_parameters,
            (std::vector<std::string>{"block.experts.gate_up_proj", "block.experts.down_proj"}));
  EXPECT_TRUE(b.config().is_parameter_module("block.experts.base_layer"));
  EXPECT_NE(b.find("block.experts.base_layer"), nullptr);
  // An adapter that does not touch this layer's experts gives empty weights.
  const MoeLoraWeights none = moe_lora_from_peft(b, "model.layers.3.mlp.experts", 8, 192, 64);
  EXPECT_FALSE(none.gate_up_a.defined() || none.down_a.defined());
}

TEST(PeftAdapter, PatternKey) {
  const std::vector<std::string> keys = {"up_proj", R"(layers\.1\..*q_proj)"};
  EXPECT_EQ(peft_pattern_key(keys, "model.layers.0.mlp.experts.3.up_proj"), "up_proj");
  EXPECT_EQ(peft_pattern_key(keys, "up_proj"), "up_proj");
  EXPECT_EQ(peft_pattern_key(keys, "model.layers.1.self_attn.q_proj"), keys[1]);
  EXPECT_EQ(peft_pattern_key(keys, "model.layers.2.self_attn.q_proj"), std::nullopt);
  EXPECT_EQ(peft_pattern_key(keys, "model.layers.0.mlp.experts.3.gate_up_proj"), std::nullopt);
}

struct Synthetic {
  static constexpr int kE = 4, kH = 16, kI = 8;
  std::map<std::string, Tensor> tensors;
  std::mt19937_64 rng{test::fresh_seed()};

  void add(const std::string& module, int r, int64_t in, int64_t out,
           const std::string& infix = "", DType dtype = DType::f32) {
    tensors["base_model.model." + module + ".lora_A" + infix + ".weight"] =
        test::random_tensor({r, in}, dtype, rng);
    tensors["base_model.model." + module + ".lora_B" + infix + ".weight"] =
        test::random_tensor({out, r}, dtype, rng);
  }
  // gate/up/down of every expert, Qwen-style or Mixtral-style names.
  void add_experts(const std::string& experts, bool mixtral, int r_up = 4,
                   const std::string& infix = "") {
    for (int e = 0; e < kE; ++e) {
      const std::string p = experts + "." + std::to_string(e) + ".";
      add(p + (mixtral ? "w1" : "gate_proj"), 4, kH, kI, infix);
      add(p + (mixtral ? "w3" : "up_proj"), r_up, kH, kI, infix);
      add(p + (mixtral ? "w2" : "down_proj"), 4, kI, kH, infix);
    }
  }
  const Tensor& get(const std::string& module, const char* ab, const std::string& infix = "") {
    return tensors.at("base_model.model." + module + ".lora_" + ab + infix + ".weight");
  }
};

// Expert e's slice of a stacked [E, x, y] tensor equals `t`.
void expect_slice(const Tensor& stacked, int e, const Tensor& t, const std::string& what) {
  ASSERT_TRUE(stacked.defined()) << what;
  const auto all = test::to_floats(stacked);
  const auto one = test::to_floats(t);
  ASSERT_EQ(stacked.size(1) * stacked.size(2), int64_t(one.size())) << what;
  const std::vector<float> got(all.begin() + e * one.size(), all.begin() + (e + 1) * one.size());
  EXPECT_EQ(got, one) << what << " expert " << e;
}

TEST(PeftAdapter, PerExpertWithPatterns) {
  Synthetic s;
  const std::string ex = "model.layers.0.mlp.experts";
  s.add_experts(ex, false, /*r_up=*/6);
  s.add("model.layers.0.self_attn.q_proj", 4, Synthetic::kH, Synthetic::kH);
  const std::string dir = write_adapter(
      "per_expert", config_json(R"(, "rank_pattern": {"up_proj": 6},
      "alpha_pattern": {"layers\\.0\\.mlp\\.experts\\.\\d+\\.down_proj": 32, "down_proj": 2},
      "layers_to_transform": [0], "base_model_name_or_path": "Qwen/Qwen3-30B-A3B")"),
      s.tensors);
  const PeftAdapter ad = PeftAdapter::load(dir);
  EXPECT_EQ(ad.config().base_model_name_or_path, "Qwen/Qwen3-30B-A3B");
  EXPECT_EQ(ad.config().layers_to_transform, std::vector<int>{0});
  EXPECT_EQ(ad.modules().size(), 3u * Synthetic::kE + 1);
  const PeftLoraModule* q = ad.find("model.layers.0.self_attn.q_proj");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->r, 4);
  EXPECT_FLOAT_EQ(q->scaling, 2.0f);

  const MoeLoraWeights w =
      moe_lora_from_peft(ad, ex, Synthetic::kE, Synthetic::kH, Synthetic::kI);
  EXPECT_FALSE(w.has_gate_up_fused());
  EXPECT_EQ(w.gate_a.shape(), (Shape{4, 4, 16}));
  EXPECT_EQ(w.gate_b.shape(), (Shape{4, 8, 4}));
  EXPECT_EQ(w.up_a.shape(), (Shape{4, 6, 16}));
  EXPECT_EQ(w.up_b.shape(), (Shape{4, 8, 6}));
  EXPECT_EQ(w.down_a.shape(), (Shape{4, 4, 8}));
  EXPECT_EQ(w.down_b.shape(), (Shape{4, 16, 4}));
  EXPECT_FLOAT_EQ(w.gate_scale, 8.0f / 4);
  EXPECT_FLOAT_EQ(w.up_scale, 8.0f / 6);
  EXPECT_FLOAT_EQ(w.down_scale, 32.0f / 4);  // the first matching alpha_pattern key wins
  for (int e = 0; e < Synthetic::kE; ++e) {
    const std::string p = ex + "." + std::to_string(e) + ".";
    expect_slice(w.gate_a, e, s.get(p + "gate_proj", "A"), "gate_a");
    expect_slice(w.gate_b, e, s.get(p + "gate_proj", "B"), "gate_b");
    expect_slice(w.up_a, e, s.get(p + "up_proj", "A"), "up_a");
    expect_slice(w.up_b, e, s.get(p + "up_proj", "B"), "up_b");
    expect_slice(w.down_a, e, s.get(p + "down_proj", "A"), "down_a");
    expect_slice(w.down_b, e, s.get(p + "down_proj", "B"), "down_b");
  }
}

TEST(PeftAdapter, MixtralNamesAndAdapterInfix) {
  Synthetic s;
  const std::string ex = "model.layers.1.mlp.experts";
  s.add_experts(ex, true, 4, ".default");
  const std::string dir = write_adapter(
      "mixtral", R"({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": true,
                     "target_modules": "model\\.layers\\.\\d+\\.mlp\\.experts\\.\\d+\\.w[123]"})",
      s.tensors);
  const PeftAdapter ad = PeftAdapter::load(dir);
  ASSERT_TRUE(ad.config().target_modules_regex.has_value());
  const MoeLoraWeights w =
      moe_lora_from_peft(ad, ex, Synthetic::kE, Synthetic::kH, Synthetic::kI);
  EXPECT_FLOAT_EQ(w.gate_scale, 16.0f / 2.0f);
  EXPECT_FLOAT_EQ(w.down_scale, 16.0f / 2.0f);
  for (int e = 0; e < Synthetic::kE; ++e) {
    const std::string p = ex + "." + std::to_string(e) + ".";
    expect_slice(w.gate_a, e, s.get(p + "w1", "A", ".default"), "w1 A");
    expect_slice(w.up_b, e, s.get(p + "w3", "B", ".default"), "w3 B");
    expect_slice(w.down_a, e, s.get(p + "w2", "A", ".default"), "w2 A");
  }
}

TEST(PeftAdapter, EmbeddingKeysAreListed) {
  Synthetic s;
  s.add("model.layers.0.self_attn.v_proj", 4, 16, 16, "", DType::bf16);
  s.tensors["base_model.model.model.embed_tokens.lora_embedding_A"] =
      test::random_tensor({4, 32}, DType::f32, s.rng);
  s.tensors["base_model.model.model.embed_tokens.lora_embedding_B"] =
      test::random_tensor({16, 4}, DType::f32, s.rng);
  const PeftAdapter ad = PeftAdapter::load(write_adapter("embed", config_json(), s.tensors));
  EXPECT_EQ(ad.modules().size(), 1u);
  EXPECT_EQ(ad.unsupported_keys(),
            (std::vector<std::string>{"base_model.model.model.embed_tokens.lora_embedding_A",
                                      "base_model.model.model.embed_tokens.lora_embedding_B"}));
}

TEST(PeftAdapter, BadInput) {
  const std::string ex = "model.layers.0.mlp.experts";
  auto load_with = [](const std::string& name, const std::string& config,
                      const std::map<std::string, Tensor>& tensors) {
    return [=] { PeftAdapter::load(write_adapter(name, config, tensors)); };
  };
  {
    Synthetic s;
    s.add_experts(ex, false);
    s.tensors.erase("base_model.model." + ex + ".2.up_proj.lora_B.weight");
    test::expect_error(load_with("missing_b", config_json(), s.tensors),
                       "has no matching lora_B weight for module '" + ex + ".2.up_proj'");
  }
  {
    Synthetic s;
    s.add_experts(ex, false);
    s.tensors["base_model.model." + ex + ".1.down_proj.lora_B.weight"] =
        test::random_tensor({16, 3}, DType::f32, s.rng);
    test::expect_error(load_with("rank_mismatch", config_json(), s.tensors), "rank mismatch");
  }
  {
    Synthetic s;
    s.add_experts(ex, false);
    test::expect_error(load_with("rank_vs_config", config_json(R"(, "r": 8)"), s.tensors),
                       "expected rank 8");
  }
  {
    Synthetic s;
    s.add_experts(ex, false);
    for (const char* ab : {"A", "B"})
      for (int e : {1, 3})
        s.tensors.erase("base_model.model." + ex + "." + std::to_string(e) + ".gate_proj.lora_" +
                        ab + ".weight");
    const PeftAdapter ad = PeftAdapter::load(write_adapter("missing_expert", config_json(),
                                                           s.tensors));
    test::expect_error([&] { moe_lora_from_peft(ad, ex, 4, 16, 8); }, "experts [1, 3]");
    test::expect_error([&] { moe_lora_from_peft(ad, ex, 2, 16, 8); }, "out of range");
  }
  {
    Synthetic s;
    s.add_experts(ex, false);
    const PeftAdapter ad = PeftAdapter::load(write_adapter("wrong_hidden", config_json(),
                                                           s.tensors));
    test::expect_error([&] { moe_lora_from_peft(ad, ex, 4, 32, 8); },
                       "gate_proj.lora_A.weight': expected [4, 32], found [4, 16]");
  }
  {
    Synthetic s;
    s.add_experts(ex, false);
    s.tensors["base_model.model." + ex + ".0.up_proj.lora_A.weight"] =
        test::random_ints({4, 16}, s.rng, 0, 3);
    test::expect_error(load_with("int_dtype", config_json(), s.tensors),
                       "expected dtype F32, BF16 or F16, found I32");
  }
  {
    Synthetic s;
    s.add("model.layers.0.self_attn.o_proj", 4, 16, 16);
    test::expect_error(load_with("dora", config_json(R"(, "use_dora": true)"), s.tensors),
                       "'use_dora': expected false");
    test::expect_error(load_with("ia3", R"({"peft_type": "IA3", "r": 4})", s.tensors),
                       "'peft_type': expected \"LORA\", found \"IA3\"");
    test::expect_error(load_with("bad_r", R"({"peft_type": "LORA", "r": "4"})", s.tensors),
                       "'r': expected a positive integer");
    s.tensors["base_model.model.lm_head.modules_to_save.default.weight"] =
        test::random_tensor({4, 16}, DType::f32, s.rng);
    test::expect_error(load_with("mts", config_json(), s.tensors), "modules_to_save");
  }
  {
    // Fused 3D adapter with shapes for another model.
    const PeftAdapter a = PeftAdapter::load(test::fixture_path("moe_block/qwen3_moe_adapter_a"));
    test::expect_error([&] { moe_lora_from_peft(a, "block.experts", 8, 256, 64); },
                       "expected gate_up (lora_A [E*r, 256]");
    test::expect_error([&] { moe_lora_from_peft(a, "block.experts", 4, 192, 64); },
                       "expected num_experts * r = 4 * 4 = 16 rows, found 32");
  }
  {
    // Truncated adapter_model.safetensors.
    const std::string dir = fs::temp_directory_path() /
                            ("moelora_peft_" + std::to_string(::getpid()) + "_truncated");
    fs::create_directories(dir);
    fs::copy_file(test::fixture_path("moe_block/qwen3_moe_adapter_a/adapter_config.json"),
                  dir + "/adapter_config.json", fs::copy_options::overwrite_existing);
    const std::string src = test::fixture_path("moe_block/qwen3_moe_adapter_a/"
                                               "adapter_model.safetensors");
    std::ifstream in(src, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(dir + "/adapter_model.safetensors", std::ios::binary)
        << bytes.substr(0, bytes.size() / 2);
    test::expect_error([&] { PeftAdapter::load(dir); }, "out of range");
    test::expect_error([&] { PeftAdapter::load(dir + "/nowhere"); }, "cannot open");
  }
}

}  // namespace
}  // namespace moelora
