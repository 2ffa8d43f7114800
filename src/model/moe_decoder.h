// The llama-style MoE decoder shared by Qwen3-MoE and Mixtral (internal):
//   h = embed(ids)
//   per layer: n = input_layernorm(h)
//              h += o_proj(attn(rope([q_norm](q_proj n)), rope([k_norm](k_proj n)), v_proj n))
//              h += moe(post_attention_layernorm(h))   (a dense SiLU MLP on dense layers)
//   logits = lm_head(norm(h))
// What differs between the families (checkpoint names, q/k norm, which settings to refuse)
// is a MoeDecoderFamily filled in by each architecture's own file (qwen3_moe.cpp,
// mixtral.cpp). CPU backend: residual stream and attention in f32, the MoE block through
// MoeRunner (bf16 in / out as its contract says), KV cache f32 or bf16.
//
// LoRA per request slot: experts through MoeLoraPool/MoeLoraHooks; q/k/v as one 3-slice
// DenseLoraPool on the fused qkv output, o_proj one slice, dense MLP gate/up 2 slices and
// down 1 slice. LoRA reads the bf16 copy of its input (as the MoE LoRA does).
#pragma once

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "moelora/model/model.h"

namespace moelora {

struct MoeDecoderFamily {
  std::string model_type;
  bool qk_norm = false;  // per-head RMSNorm on q and k before RoPE (Qwen3)
  // Checkpoint names under model.layers.L.: the MoE block, its router, the per-expert
  // projections (gate, up, down) and the dense MLP module.
  std::string moe_module = "mlp";
  std::string router = "gate";
  std::array<std::string, 3> expert_proj = {"gate_proj", "up_proj", "down_proj"};
  // Where PEFT adapters name a layer's experts module (after model.layers.L.), in the order
  // tried: per-expert adapters use the checkpoint names, peft's 3D-parameter adapters the
  // in-memory ones of the transformers version that wrote them.
  std::vector<std::string> lora_expert_modules = {"mlp.experts"};
};

std::unique_ptr<Model> make_moe_decoder(const std::string& dir, const HfModelConfig& config,
                                        const ModelOptions& options,
                                        const MoeDecoderFamily& family);

// The config.json of `dir` as JSON (for the settings HfModelConfig does not carry).
std::string read_text_file(const std::string& path);

}  // namespace moelora
