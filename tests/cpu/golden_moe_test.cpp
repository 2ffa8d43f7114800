// MoE blocks from transformers + peft (fixtures), on the CPU reference backend.
#include "golden_moe.h"
#include "moelora/io/safetensors.h"
#include "moelora/lora/moe_lora.h"
#include "test_util.h"

namespace moelora {
namespace {

TEST(GoldenMoeBlock, Qwen3MoeWithPeftAdaptersCpu) { test::check_moe_block_golden("qwen3_moe", Device::cpu()); }

TEST(GoldenMoeBlock, DeepseekV3RoutingSharedExpertCpu) {
  test::check_moe_block_golden("deepseek_v3", Device::cpu());
}

// peft's saved adapter file, sliced per expert, equals the matrices the fixture generator
// recovered by matching peft's forward.
TEST(GoldenMoeBlock, PeftFusedExpertLayoutSlicing) {
  const SafetensorsFile block(test::fixture_path("moe_block/qwen3_moe_block.safetensors"));
  const SafetensorsFile adapter(
      test::fixture_path("moe_block/qwen3_moe_adapter_a/adapter_model.safetensors"));
  const std::string prefix = "base_model.model.block.experts.";
  auto [gu_a, gu_b] = split_peft_expert_lora(adapter.tensor(prefix + "base_layer.lora_A.weight"),
                                             adapter.tensor(prefix + "base_layer.lora_B.weight"),
                                             8, "gate_up");
  auto [dn_a, dn_b] = split_peft_expert_lora(adapter.tensor(prefix + "lora_A.weight"),
                                             adapter.tensor(prefix + "lora_B.weight"), 8, "down");
  EXPECT_EQ(test::to_floats(gu_a), test::to_floats(block.tensor("a.gate_up_a")));
  EXPECT_EQ(test::to_floats(gu_b), test::to_floats(block.tensor("a.gate_up_b")));
  EXPECT_EQ(test::to_floats(dn_a), test::to_floats(block.tensor("a.down_a")));
  EXPECT_EQ(test::to_floats(dn_b), test::to_floats(block.tensor("a.down_b")));
  EXPECT_THROW(split_peft_expert_lora(adapter.tensor(prefix + "lora_A.weight"),
                                      adapter.tensor(prefix + "lora_B.weight"), 3, "down"),
               Error);
}

}  // namespace
}  // namespace moelora
