// MoE blocks from transformers + peft (fixtures), on the CUDA backend.
#include "golden_moe.h"
#include "test_util.h"

namespace moelora {
namespace {

TEST(GoldenMoeBlockGpu, Qwen3MoeWithPeftAdapters) {
  MOELORA_REQUIRE_GPU();
  test::check_moe_block_golden("qwen3_moe", Device::cuda());
}

TEST(GoldenMoeBlockGpu, DeepseekV3RoutingSharedExpert) {
  MOELORA_REQUIRE_GPU();
  test::check_moe_block_golden("deepseek_v3", Device::cuda());
}

}  // namespace
}  // namespace moelora
