#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "moelora/io/hf_config.h"
#include "test_util.h"

namespace moelora {
namespace {

using nlohmann::json;

// Field names and values as in the published config.json files (trimmed of fields moelora
// does not read).
json qwen3_30b_a3b() {
  return json::parse(R"({
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "hidden_size": 2048, "num_hidden_layers": 48, "vocab_size": 151936,
    "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "max_position_embeddings": 40960,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": false,
    "rope_scaling": null, "torch_dtype": "bfloat16"})");
}

json mixtral_8x7b() {
  return json::parse(R"({
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
    "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6,
    "rms_norm_eps": 1e-05, "max_position_embeddings": 32768, "tie_word_embeddings": false,
    "router_aux_loss_coef": 0.02, "sliding_window": null})");
}

json deepseek_v2_lite() {
  return json::parse(R"({
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "vocab_size": 102400, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": 6, "routed_scaling_factor": 1.0, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": false, "scoring_func": "softmax", "q_lora_rank": null,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "rope_theta": 10000, "rms_norm_eps": 1e-06,
    "max_position_embeddings": 163840, "tie_word_embeddings": false,
    "aux_loss_alpha": 0.001, "seq_aux": true})");
}

// DeepSeek-V2 (236B): group-limited greedy routing, scaled weights.
json deepseek_v2() {
  json j = deepseek_v2_lite();
  j["hidden_size"] = 5120;
  j["num_hidden_layers"] = 60;
  j["num_attention_heads"] = 128;
  j["num_key_value_heads"] = 128;
  j["n_routed_experts"] = 160;
  j["moe_intermediate_size"] = 1536;
  j["intermediate_size"] = 12288;
  j["q_lora_rank"] = 1536;
  j["topk_method"] = "group_limited_greedy";
  j["n_group"] = 8;
  j["topk_group"] = 3;
  j["routed_scaling_factor"] = 16.0;
  return j;
}

json deepseek_v3() {
  return json::parse(R"({
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "vocab_size": 129280, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": true,
    "scoring_func": "sigmoid", "rope_theta": 10000, "rms_norm_eps": 1e-06,
    "max_position_embeddings": 163840, "tie_word_embeddings": false,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]}})");
}

json qwen2_moe_a27b() {
  return json::parse(R"({
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
    "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
    "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": false,
    "decoder_sparse_step": 1, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
    "max_position_embeddings": 8192, "tie_word_embeddings": false})");
}

HfModelConfig parse(const json& j) {
  return HfModelConfig::parse(j.dump(), "/m/config.json");
}

void expect_shape(const MoeShape& a, const MoeShape& b) {
  EXPECT_EQ(a.hidden, b.hidden);
  EXPECT_EQ(a.inter, b.inter);
  EXPECT_EQ(a.num_experts, b.num_experts);
  EXPECT_EQ(a.top_k, b.top_k);
  EXPECT_EQ(a.shared_inter, b.shared_inter);
}

void expect_router(const RouterConfig& a, const RouterConfig& b) {
  EXPECT_EQ(a.num_experts, b.num_experts);
  EXPECT_EQ(a.top_k, b.top_k);
  EXPECT_EQ(a.scoring, b.scoring);
  EXPECT_EQ(a.renormalize, b.renormalize);
  EXPECT_EQ(a.n_group, b.n_group);
  EXPECT_EQ(a.topk_group, b.topk_group);
  if (a.n_group > 1) EXPECT_EQ(a.group_score, b.group_score);
  EXPECT_FLOAT_EQ(a.routed_scaling_factor, b.routed_scaling_factor);
  EXPECT_EQ(a.use_correction_bias, b.use_correction_bias);
}

TEST(HfConfig, Qwen3Moe) {
  const HfModelConfig c = parse(qwen3_30b_a3b());
  EXPECT_EQ(c.model_type, "qwen3_moe");
  EXPECT_EQ(c.num_hidden_layers, 48);
  EXPECT_EQ(c.vocab_size, 151936);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.max_position_embeddings, 40960);
  EXPECT_FALSE(c.mla);
  EXPECT_FALSE(c.has_quantization_config);
  expect_shape(c.moe_shape(), MoeShape::by_name("qwen3-30b-a3b"));
  expect_router(c.router(), RouterConfig::softmax_topk(128, 8, true));
  for (int l = 0; l < 48; ++l) EXPECT_TRUE(c.is_moe_layer(l));
}

TEST(HfConfig, QwenSparseStepAndMlpOnlyLayers) {
  json j = qwen3_30b_a3b();
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  j["norm_topk_prob"] = false;
  const HfModelConfig c = parse(j);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_FALSE(c.is_moe_layer(2));
  EXPECT_FALSE(c.is_moe_layer(3));  // sparse by step, but listed as MLP-only
  EXPECT_TRUE(c.is_moe_layer(5));
  EXPECT_FALSE(c.router().renormalize);
  test::expect_error([&] { c.is_moe_layer(48); }, "layer 48");
}

TEST(HfConfig, Qwen2MoeSharedExpert) {
  const HfModelConfig c = parse(qwen2_moe_a27b());
  const MoeShape s = c.moe_shape();
  expect_shape(s, MoeShape::by_name("qwen2-moe-a2.7b"));
  EXPECT_TRUE(s.shared_gate);
  EXPECT_EQ(c.head_dim, 128);  // hidden / heads when the config omits head_dim
  expect_router(c.router(), RouterConfig::softmax_topk(60, 4, false));
}

TEST(HfConfig, Mixtral) {
  json j = mixtral_8x7b();
  const HfModelConfig c = parse(j);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_key_value_heads, 8);
  expect_shape(c.moe_shape(), MoeShape::by_name("mixtral-8x7b"));
  EXPECT_FALSE(c.moe_shape().shared_gate);
  expect_router(c.router(), RouterConfig::softmax_topk(8, 2, true));
  for (int l = 0; l < 32; ++l) EXPECT_TRUE(c.is_moe_layer(l));
}

TEST(HfConfig, DeepseekV2Lite) {
  const HfModelConfig c = parse(deepseek_v2_lite());
  EXPECT_TRUE(c.mla);
  EXPECT_EQ(c.q_lora_rank, 0);  // null: plain q_proj
  EXPECT_EQ(c.kv_lora_rank, 512);
  EXPECT_EQ(c.qk_nope_head_dim, 128);
  EXPECT_EQ(c.qk_rope_head_dim, 64);
  EXPECT_EQ(c.v_head_dim, 128);
  EXPECT_EQ(c.head_dim, 192);
  EXPECT_EQ(c.intermediate_size, 10944);
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_EQ(c.topk_method, TopkMethod::greedy);
  expect_shape(c.moe_shape(), MoeShape::by_name("deepseek-v2-lite"));
  expect_router(c.router(), RouterConfig::softmax_topk(64, 6, false));
  EXPECT_FALSE(c.is_moe_layer(0));
  for (int l = 1; l < 27; ++l) EXPECT_TRUE(c.is_moe_layer(l));
}

TEST(HfConfig, DeepseekV2GroupLimited) {
  const HfModelConfig c = parse(deepseek_v2());
  EXPECT_EQ(c.q_lora_rank, 1536);
  const RouterConfig r = c.router();
  EXPECT_EQ(r.scoring, ScoringFunc::softmax);
  EXPECT_EQ(r.n_group, 8);
  EXPECT_EQ(r.topk_group, 3);
  EXPECT_EQ(r.group_score, GroupScore::max);
  EXPECT_FALSE(r.renormalize);
  EXPECT_FALSE(r.use_correction_bias);
  EXPECT_FLOAT_EQ(r.routed_scaling_factor, 16.0f);

  // DeepSeek's gate and transformers disagree on norm_topk_prob for V2: refused, except top-1
  // where neither renormalizes.
  json j = deepseek_v2();
  j["norm_topk_prob"] = true;
  test::expect_error([&] { parse(j); }, "field 'norm_topk_prob'");
  j["num_experts_per_tok"] = 1;
  EXPECT_FALSE(parse(j).router().renormalize);
}

TEST(HfConfig, DeepseekV3) {
  const HfModelConfig c = parse(deepseek_v3());
  EXPECT_EQ(c.topk_method, TopkMethod::noaux_tc);
  EXPECT_EQ(c.scoring_func, ScoringFunc::sigmoid);
  EXPECT_TRUE(c.has_quantization_config);
  EXPECT_EQ(c.quant_method, "fp8");
  EXPECT_EQ(c.q_lora_rank, 1536);
  expect_shape(c.moe_shape(), MoeShape::by_name("deepseek-v3"));
  expect_router(c.router(), RouterConfig::deepseek_v3(256, 8, 8, 4, 2.5f));
  EXPECT_EQ(c.router().group_score, GroupScore::top2_sum);
  for (int l = 0; l < 3; ++l) EXPECT_FALSE(c.is_moe_layer(l));
  for (int l = 3; l < 61; ++l) EXPECT_TRUE(c.is_moe_layer(l));

  // DeepSeek's code and transformers disagree on moe_layer_freq != 1: refused.
  json j = deepseek_v3();
  j["moe_layer_freq"] = 2;
  test::expect_error([&] { parse(j); }, "field 'moe_layer_freq': only 1 is supported");
}

TEST(HfConfig, KimiK2UsesDeepseekV3Routing) {
  json j = deepseek_v3();
  j["model_type"] = "kimi_k2";
  j["n_routed_experts"] = 384;
  j["n_group"] = 1;
  j["topk_group"] = 1;
  j["first_k_dense_replace"] = 1;
  j["routed_scaling_factor"] = 2.827;
  const HfModelConfig c = parse(j);
  expect_router(c.router(), RouterConfig::deepseek_v3(384, 8, 1, 1, 2.827f));
}

TEST(HfConfig, LoadFromDirectory) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("moelora_hfcfg_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << mixtral_8x7b().dump(2);
  const HfModelConfig c = HfModelConfig::load(dir.string());
  EXPECT_EQ(c.path, (dir / "config.json").string());
  EXPECT_EQ(c.num_experts, 8);
  std::filesystem::remove_all(dir);
  test::expect_error([&] { HfModelConfig::load(dir.string()); }, "config.json");
}

TEST(HfConfig, UnknownModelTypeListsSupported) {
  json j = qwen3_30b_a3b();
  j["model_type"] = "llama";
  test::expect_error([&] { parse(j); }, "/m/config.json: unsupported model_type \"llama\"");
  test::expect_error([&] { parse(j); },
                     "qwen3_moe, qwen2_moe, mixtral, deepseek_v2, deepseek_v3, kimi_k2");
  j.erase("model_type");
  test::expect_error([&] { parse(j); }, "missing required field 'model_type'");
}

// YaRN as real DeepSeek / Kimi checkpoints write it: rope_scaling with `type` (transformers 4)
// or rope_parameters with `rope_type` (transformers 5); absent fields keep transformers'
// defaults; bad values name the field.
TEST(HfConfig, YarnRopeScaling) {
  json j = deepseek_v2_lite();
  j["rope_scaling"] = json::parse(R"({"type": "yarn", "factor": 40, "beta_fast": 32,
      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
      "original_max_position_embeddings": 4096})");
  HfModelConfig c = parse(j);
  EXPECT_EQ(c.rope_type, "yarn");
  EXPECT_DOUBLE_EQ(c.yarn.factor, 40.0);
  EXPECT_EQ(c.yarn.original_max_position, 4096);
  EXPECT_DOUBLE_EQ(c.yarn.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(c.yarn.beta_slow, 1.0);
  EXPECT_DOUBLE_EQ(c.yarn.mscale, 0.707);
  EXPECT_DOUBLE_EQ(c.yarn.mscale_all_dim, 0.707);
  EXPECT_DOUBLE_EQ(c.yarn.attention_factor, 0.0);
  EXPECT_TRUE(c.yarn.truncate);

  j = deepseek_v3();
  j.erase("rope_scaling");
  j["rope_parameters"] = json::parse(R"({"rope_type": "yarn", "rope_theta": 50000.0,
      "factor": 32.0, "beta_fast": null, "truncate": false})");
  c = parse(j);
  EXPECT_EQ(c.rope_type, "yarn");
  EXPECT_DOUBLE_EQ(c.rope_theta, 50000.0);
  EXPECT_DOUBLE_EQ(c.yarn.beta_fast, 32.0);  // null: the default
  EXPECT_EQ(c.yarn.original_max_position, 0);
  EXPECT_FALSE(c.yarn.truncate);

  j["rope_parameters"]["factor"] = -2;
  test::expect_error([&] { parse(j); }, "field 'rope_parameters.factor' must be > 0");
  j["rope_parameters"]["factor"] = 4;
  j["rope_parameters"]["original_max_position_embeddings"] = 0;
  test::expect_error([&] { parse(j); }, "'rope_parameters.original_max_position_embeddings'");
  j["rope_parameters"]["original_max_position_embeddings"] = 4096;
  j["rope_parameters"]["attention_factor"] = "1";
  test::expect_error([&] { parse(j); }, "field 'attention_factor': expected a number");
  j["rope_parameters"].erase("attention_factor");
  j["rope_parameters"]["partial_rotary_factor"] = 0.5;
  test::expect_error([&] { parse(j); }, "'rope_parameters.partial_rotary_factor': only 1");
  j["rope_parameters"].erase("partial_rotary_factor");
  j["partial_rotary_factor"] = 0.25;
  test::expect_error([&] { parse(j); }, "field 'partial_rotary_factor': only 1");
}

TEST(HfConfig, BadConfigsNameFileAndField) {
  test::expect_error([] { HfModelConfig::parse("{not json", "/m/config.json"); },
                     "/m/config.json: not valid JSON");
  test::expect_error([] { HfModelConfig::parse("[1]", "/m/config.json"); }, "JSON object");

  json j = qwen3_30b_a3b();
  j.erase("num_experts");
  test::expect_error([&] { parse(j); }, "/m/config.json: missing required field 'num_experts'");

  j = qwen3_30b_a3b();
  j["hidden_size"] = "2048";
  test::expect_error([&] { parse(j); }, "field 'hidden_size': expected an integer, found \"2048\"");

  j = qwen3_30b_a3b();
  j["norm_topk_prob"] = 1;
  test::expect_error([&] { parse(j); }, "field 'norm_topk_prob': expected true or false");

  j = qwen3_30b_a3b();
  j["num_experts_per_tok"] = 129;
  test::expect_error([&] { parse(j); },
                     "num_experts_per_tok (129) exceeds the number of experts (128)");

  j = qwen3_30b_a3b();
  j["num_key_value_heads"] = 5;
  test::expect_error([&] { parse(j); }, "multiple of num_key_value_heads");

  j = qwen3_30b_a3b();
  j["mlp_only_layers"] = {48};
  test::expect_error([&] { parse(j); }, "field 'mlp_only_layers'");

  j = mixtral_8x7b();
  j.erase("num_local_experts");
  test::expect_error([&] { parse(j); }, "missing required field 'num_local_experts'");

  j = deepseek_v2_lite();
  j.erase("kv_lora_rank");
  test::expect_error([&] { parse(j); }, "missing required field 'kv_lora_rank'");

  j = deepseek_v2_lite();
  j["topk_method"] = "top2";
  test::expect_error([&] { parse(j); }, "field 'topk_method'");

  j = deepseek_v2_lite();
  j["scoring_func"] = "sigmoid";  // V2 greedy scores with softmax
  test::expect_error([&] { parse(j); }, "needs scoring_func \"softmax\"");

  j = deepseek_v3();
  j["topk_group"] = 9;
  test::expect_error([&] { parse(j); }, "topk_group (9) exceeds n_group (8)");

  j = deepseek_v3();
  j["n_group"] = 7;
  test::expect_error([&] { parse(j); }, "n_group (7) must divide the number of experts (256)");

  j = deepseek_v3();
  j["topk_group"] = 1;
  j["num_experts_per_tok"] = 33;
  test::expect_error([&] { parse(j); }, "cannot hold num_experts_per_tok (33)");

  j = deepseek_v3();
  j["quantization_config"] = "fp8";
  test::expect_error([&] { parse(j); }, "field 'quantization_config': expected an object");

  j = deepseek_v3();
  j["routed_scaling_factor"] = 0;
  test::expect_error([&] { parse(j); }, "field 'routed_scaling_factor'");
}

}  // namespace
}  // namespace moelora
