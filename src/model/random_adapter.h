// Random PEFT adapters for a model config (internal: bench decode, GPU tests).
#pragma once

#include <cstdint>
#include <string>

#include "moelora/io/hf_config.h"

namespace moelora {

// Writes a PEFT adapter (adapter_config.json + adapter_model.safetensors) of rank `r` into
// `dir` on every module the Qwen3-MoE / Mixtral decoders take LoRA on: attention q/k/v/o,
// dense MLP gate/up/down and every expert's three projections (per-expert layout). One A/B
// pair per layer and kind is shared by all experts (same values, separate keys): the bytes a
// step reads are those of distinct adapters, and the file is written in seconds. lora_A is
// uniform in +-1/sqrt(in), lora_B in +-0.02, alpha = 2r: deltas of a few percent.
void write_random_adapter(const std::string& dir, const HfModelConfig& c, int r, uint64_t seed);

}  // namespace moelora
