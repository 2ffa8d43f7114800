// Quantization configs as the producing tools write them (AutoGPTQ / GPTQModel, AutoAWQ,
// llm-compressor, transformers / DeepSeek fp8, ModelOpt), and configs we refuse.
#include "moelora/quant/quant_config.h"
#include "quant_test_util.h"

namespace moelora {
namespace {

using namespace quant;

TEST(QuantConfig, GptqFromConfigJsonAndQuantizeConfigJson) {
  const QuantScheme a = parse_quant_config(R"({"architectures": ["Qwen3MoeForCausalLM"],
      "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
      "desc_act": true, "sym": true, "damp_percent": 0.01, "checkpoint_format": "gptq"}})",
                                           "config.json");
  EXPECT_EQ(a.method, QuantMethod::gptq);
  EXPECT_EQ(a.gptq.bits, 4);
  EXPECT_EQ(a.gptq.group_size, 128);
  EXPECT_TRUE(a.gptq.desc_act);
  EXPECT_TRUE(a.gptq.sym);
  EXPECT_EQ(a.gptq.zero_format, GptqZeroFormat::v1_minus_one);
  // AutoGPTQ's quantize_config.json has no quant_method; per-channel is group_size -1.
  const QuantScheme b = parse_quant_config(
      R"({"bits": 8, "group_size": -1, "damp_percent": 0.01, "desc_act": false, "sym": false,
          "true_sequential": true, "model_file_base_name": "model"})",
      "quantize_config.json");
  EXPECT_EQ(b.method, QuantMethod::gptq);
  EXPECT_EQ(b.gptq.bits, 8);
  EXPECT_EQ(b.gptq.group_size, -1);
  EXPECT_FALSE(b.gptq.sym);
  const QuantScheme c = parse_quant_config(
      R"({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"})",
      "c");
  EXPECT_EQ(c.gptq.zero_format, GptqZeroFormat::v2_true);
}

TEST(QuantConfig, AwqCompressedTensorsFp8Nvfp4) {
  const QuantScheme awq = parse_quant_config(
      R"({"quantization_config": {"quant_method": "awq", "zero_point": true, "group_size": 64,
          "bits": 4, "version": "gemm", "modules_to_not_convert": ["gate"]}})",
      "config.json");
  EXPECT_EQ(awq.method, QuantMethod::awq);
  EXPECT_EQ(awq.awq.group_size, 64);
  EXPECT_EQ(awq.unquantized_modules, std::vector<std::string>{"gate"});

  const QuantScheme ct = parse_quant_config(R"({"quantization_config": {
      "quant_method": "compressed-tensors", "format": "pack-quantized",
      "quantization_status": "compressed", "ignore": ["lm_head", "re:.*mlp.gate$"],
      "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": null,
        "output_activations": null, "weights": {"num_bits": 4, "type": "int",
        "symmetric": false, "strategy": "group", "group_size": 128, "actorder": "group",
        "dynamic": false, "observer": "minmax"}}}}})",
                                            "config.json");
  EXPECT_EQ(ct.method, QuantMethod::ct_pack);
  EXPECT_EQ(ct.ct.bits, 4);
  EXPECT_EQ(ct.ct.strategy, CtStrategy::group);
  EXPECT_EQ(ct.ct.group_size, 128);
  EXPECT_FALSE(ct.ct.symmetric);
  EXPECT_TRUE(ct.ct_actorder);
  EXPECT_EQ(ct.unquantized_modules.size(), 2u);
  const QuantScheme ct8 = parse_quant_config(R"({"quant_method": "compressed-tensors",
      "format": "pack-quantized", "config_groups": {"g": {"targets": ["Linear"],
      "weights": {"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel",
      "actorder": null}}}})",
                                             "c");
  EXPECT_EQ(ct8.ct.bits, 8);
  EXPECT_EQ(ct8.ct.strategy, CtStrategy::channel);
  EXPECT_FALSE(ct8.ct_actorder);

  const QuantScheme fp8 = parse_quant_config(
      R"({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
          "activation_scheme": "dynamic", "weight_block_size": [128, 128]}})",
      "config.json");
  EXPECT_EQ(fp8.method, QuantMethod::fp8_block);
  EXPECT_EQ(fp8.fp8.block_n, 128);
  EXPECT_EQ(fp8.fp8.block_k, 128);

  const QuantScheme nv = parse_quant_config(
      R"({"producer": {"name": "modelopt", "version": "0.29.0"}, "quantization":
          {"quant_algo": "NVFP4", "kv_cache_quant_algo": null, "group_size": 16,
           "exclude_modules": ["lm_head"]}})",
      "hf_quant_config.json");
  EXPECT_EQ(nv.method, QuantMethod::nvfp4);
  EXPECT_EQ(nv.unquantized_modules, std::vector<std::string>{"lm_head"});
  EXPECT_EQ(parse_quant_config(R"({"quantization_config": {"quant_method": "modelopt",
      "quant_algo": "NVFP4", "group_size": 16}})",
                               "config.json")
                .method,
            QuantMethod::nvfp4);
}

TEST(QuantConfig, UnsupportedConfigsSayWhatIsSupported) {
  EXPECT_QUANT_ERROR(
      [] {
        parse_quant_config(R"({"quant_method": "gptq", "bits": 3, "group_size": 128})", "q.json");
      },
      "q.json", "supported 4 and 8", "found 3");
  EXPECT_QUANT_ERROR(
      [] {
        parse_quant_config(R"({"quant_method": "gptq", "bits": 4, "group_size": 256})", "q.json");
      },
      "q.json", "group_size", "found 256");
  EXPECT_QUANT_ERROR(
      [] {
        parse_quant_config(
            R"({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"})",
            "q.json");
      },
      "checkpoint_format", "\"marlin\"");
  EXPECT_QUANT_ERROR(
      [] {
        parse_quant_config(
            R"({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"})",
            "c.json");
      },
      "only \"gemm\"", "\"gemv\"");
  EXPECT_QUANT_ERROR(
      [] {
        parse_quant_config(R"({"quant_method": "fp8", "activation_scheme": "dynamic"})", "c.json");
      },
      "per-tensor fp8", "weight_block_size");
  EXPECT_QUANT_ERROR(
      [] {
        parse_quant_config(
            R"({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]})",
            "c.json");
      },
      "activation_scheme", "\"static\"");
  EXPECT_QUANT_ERROR(
      [] { parse_quant_config(R"({"quantization": {"quant_algo": "FP8"}})", "h.json"); }, "h.json",
      "supported \"NVFP4\"", "\"FP8\"");
  EXPECT_QUANT_ERROR(
      [] {
        parse_quant_config(
            R"({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}})",
            "c.json");
      },
      "pack-quantized", "\"float-quantized\"");
  EXPECT_QUANT_ERROR(
      [] {
        parse_quant_config(
            R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, "input_activations": {"num_bits": 8}}}})",
            "c.json");
      },
      "input_activations", "weight-only");
  EXPECT_QUANT_ERROR([] { parse_quant_config(R"({"quant_method": "bitsandbytes"})", "c.json"); },
                     "\"bitsandbytes\"", "supported gptq, awq");
  EXPECT_QUANT_ERROR([] { parse_quant_config("{not json", "c.json"); }, "c.json", "not valid JSON");
  EXPECT_QUANT_ERROR(
      [] {
        parse_quant_config(R"({"quant_method": "gptq", "bits": "4", "group_size": 128})", "c.json");
      },
      "gptq.bits", "expected an integer", "\"4\"");
}

}  // namespace
}  // namespace moelora
