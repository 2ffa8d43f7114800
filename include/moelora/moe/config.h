// MoE layer shapes and routing settings.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace moelora {

enum class ScoringFunc : uint8_t { softmax, sigmoid };
// How a group of experts is scored for group-limited routing:
// DeepSeek-V2 "group_limited_greedy" takes the group's max score, DeepSeek-V3 the sum of its
// two best (bias-corrected) scores.
enum class GroupScore : uint8_t { max, top2_sum };

struct RouterConfig {
  int num_experts = 0;
  int top_k = 0;
  ScoringFunc scoring = ScoringFunc::softmax;
  // Divide the chosen weights by their sum (Qwen3 `norm_topk_prob`, Mixtral always).
  bool renormalize = false;
  // Group-limited routing: experts split into n_group equal groups, only the topk_group best
  // groups are eligible. n_group == 1 disables it.
  int n_group = 1;
  int topk_group = 1;
  GroupScore group_score = GroupScore::max;
  // Multiplies the final weights (DeepSeek `routed_scaling_factor`).
  float routed_scaling_factor = 1.0f;
  // Selection uses score + e_score_correction_bias; weights use the unbiased score (V3).
  bool use_correction_bias = false;

  static RouterConfig softmax_topk(int num_experts, int top_k, bool renormalize);
  static RouterConfig deepseek_v3(int num_experts, int top_k, int n_group, int topk_group,
                                  float routed_scaling_factor, bool renormalize = true);
  // Throws moelora::Error naming the field when the settings are inconsistent.
  void validate() const;
};

// Shape of one MoE layer. Weights: gate_up [E, 2I, H] (gate rows first), down [E, H, I].
struct MoeShape {
  std::string name;       // e.g. "qwen3-30b-a3b"
  int hidden = 0;         // H
  int inter = 0;          // I, per expert
  int num_experts = 0;    // E, experts held here (expert ids outside [0, E) or -1: not here)
  int top_k = 0;
  int shared_inter = 0;   // intermediate size of the shared expert(s) summed; 0 = none
  bool shared_gate = false;  // Qwen2-MoE: shared output times sigmoid(x . w_gate)

  void validate() const;
  // The named shapes the benchmark knows: qwen3-30b-a3b, deepseek-v2-lite, mixtral-8x7b,
  // deepseek-v3.
  static MoeShape by_name(std::string_view name);
  static std::vector<std::string> known_names();
  // A router config matching the named model family.
  RouterConfig default_router() const;
};

}  // namespace moelora
