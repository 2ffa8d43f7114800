// The MoE-block golden fixtures (tests/fixtures/moe_block/*_block.safetensors), produced by
// transformers + peft (scripts/golden/make_moe_block_goldens.py), run on any device.
#pragma once

#include <string>

#include "moelora/core/device.h"

namespace moelora::test {

// Runs the block `kind` ("qwen3_moe", "deepseek_v3") on `device` through MoeRunner: the base
// model, the mixed batch (base tokens + two peft adapters), and asserts the outputs match the
// framework's within bf16 tolerance, and base tokens match the LoRA-off run bit for bit.
void check_moe_block_golden(const std::string& kind, Device device);

}  // namespace moelora::test
