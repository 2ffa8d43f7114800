// Hugging Face model config.json for the MoE families moelora serves: the fields the loader
// and the models need, validated, plus the mapping to MoeShape / RouterConfig.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "moelora/moe/config.h"

namespace moelora {

// YaRN RoPE settings (rope_type "yarn": DeepSeek-V2/V3 and Kimi-K2 checkpoints), as written in
// rope_parameters / rope_scaling. Absent fields keep transformers' defaults; 0 / false where
// transformers tests the field's truthiness (mscale, mscale_all_dim).
struct YarnRope {
  double factor = 0.0;                // 0: absent (max_position_embeddings / original)
  int64_t original_max_position = 0;  // 0: absent (max_position_embeddings)
  double beta_fast = 32.0, beta_slow = 1.0;
  double mscale = 0.0, mscale_all_dim = 0.0;
  double attention_factor = 0.0;  // 0: absent (from mscale / mscale_all_dim)
  bool truncate = true;           // round the correction range outwards to whole dims
};

// DeepSeek `topk_method`; the other families route greedily.
enum class TopkMethod : uint8_t { greedy, group_limited_greedy, noaux_tc };

struct HfModelConfig {
  std::string path;        // the file it came from (for error messages)
  std::string model_type;  // as written: qwen3_moe, qwen2_moe, mixtral, deepseek_v2, ...

  int hidden_size = 0;
  int num_hidden_layers = 0;
  int vocab_size = 0;
  int intermediate_size = 0;  // dense MLP (DeepSeek first dense layers, Qwen mlp_only_layers)

  // Attention.
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  // MLA: the query/key head size qk_nope_head_dim + qk_rope_head_dim (transformers' own
  // DeepseekV2Config.head_dim means qk_rope_head_dim instead).
  int head_dim = 0;
  double rope_theta = 10000.0;
  // rope_parameters.rope_type (or rope_scaling's type); "default" = plain RoPE.
  std::string rope_type = "default";
  YarnRope yarn;  // when rope_type == "yarn"
  double rms_norm_eps = 1e-6;
  int64_t max_position_embeddings = 0;
  // MLA (DeepSeek). q_lora_rank == 0 means the config says null: q_proj is one matrix.
  bool mla = false;
  int q_lora_rank = 0;
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;

  // MoE.
  int num_experts = 0;  // num_experts / num_local_experts / n_routed_experts
  int num_experts_per_tok = 0;
  int moe_intermediate_size = 0;            // per expert (Mixtral: intermediate_size)
  int shared_expert_intermediate_size = 0;  // summed over shared experts; 0 = none
  int n_shared_experts = 0;                 // DeepSeek
  bool shared_expert_gate = false;          // Qwen2-MoE sigmoid gate on the shared expert
  int first_k_dense_replace = 0;            // DeepSeek
  // DeepSeek-V3 / Kimi-K2: multi-token-prediction layers stored after the decoder layers
  // (model.layers.<num_hidden_layers + i>.*); not run (transformers skips them too).
  int num_nextn_predict_layers = 0;
  int moe_layer_freq = 1;                   // DeepSeek; only 1 is accepted
  int decoder_sparse_step = 1;              // Qwen
  std::vector<int> mlp_only_layers;         // Qwen
  bool norm_topk_prob = false;              // deepseek_v2: only false (or top-1) is accepted
  ScoringFunc scoring_func = ScoringFunc::softmax;
  TopkMethod topk_method = TopkMethod::greedy;
  int n_group = 1;
  int topk_group = 1;
  double routed_scaling_factor = 1.0;

  bool tie_word_embeddings = false;
  bool has_quantization_config = false;
  std::string quant_method;  // quantization_config.quant_method when present

  // Reads `dir`/config.json.
  static HfModelConfig load(const std::string& dir);
  // Parses config JSON text; `path` names it in errors.
  static HfModelConfig parse(std::string_view json_text, const std::string& path);
  static std::vector<std::string> supported_model_types();

  MoeShape moe_shape() const;
  RouterConfig router() const;
  // Whether decoder layer `layer` (0-based) has a routed MoE block (else a dense MLP).
  bool is_moe_layer(int layer) const;
  bool is_deepseek() const { return mla; }
};

}  // namespace moelora
