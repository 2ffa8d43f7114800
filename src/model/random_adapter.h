// Random PEFT adapters for a model config (internal: bench decode, GPU tests).
#pragma once

#include <cstdint>
#include <string>

#include "moelora/io/hf_config.h"

namespace moelora {

// Writes a PEFT adapter (adapter_config.json + adapter_model.safetensors) of rank `r` into
// `dir` on every module the model takes LoRA on. Qwen3-MoE / Mixtral: attention q/k/v/o,
// dense MLP gate/up/down and every expert's three projections. DeepSeek-V2/V3/Kimi-K2: the
// MLA projections (q_proj, or q_a_proj and q_b_proj with q_lora_rank; kv_a_proj_with_mqa,
// kv_b_proj, o_proj) and every routed expert's three projections (the model takes no LoRA on
// its dense MLP layers or shared experts). Experts in the per-expert layout. One A/B
// pair per layer and kind is shared by all experts (same values, separate keys): the bytes a
// step reads are those of distinct adapters, and the file is written in seconds. lora_A is
// uniform in +-1/sqrt(in), lora_B in +-0.02, alpha = 2r: deltas of a few percent.
// `targets`: "all", "attention" (the attention projections only) or "experts" (the routed
// experts only); benchmarks split the LoRA cost with them.
void write_random_adapter(const std::string& dir, const HfModelConfig& c, int r, uint64_t seed,
                          const std::string& targets = "all");

}  // namespace moelora
