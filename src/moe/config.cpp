#include "moelora/moe/config.h"

#include "moelora/core/error.h"

namespace moelora {

RouterConfig RouterConfig::softmax_topk(int num_experts, int top_k, bool renormalize) {
  RouterConfig c;
  c.num_experts = num_experts;
  c.top_k = top_k;
  c.renormalize = renormalize;
  return c;
}

RouterConfig RouterConfig::deepseek_v3(int num_experts, int top_k, int n_group, int topk_group,
                                       float routed_scaling_factor, bool renormalize) {
  RouterConfig c;
  c.num_experts = num_experts;
  c.top_k = top_k;
  c.scoring = ScoringFunc::sigmoid;
  c.renormalize = renormalize;
  c.n_group = n_group;
  c.topk_group = topk_group;
  c.group_score = GroupScore::top2_sum;
  c.routed_scaling_factor = routed_scaling_factor;
  c.use_correction_bias = true;
  return c;
}

void RouterConfig::validate() const {
  MOELORA_CHECK(num_experts > 0, "router: num_experts must be > 0, found {}", num_experts);
  MOELORA_CHECK(top_k > 0 && top_k <= num_experts,
                "router: top_k must be in [1, num_experts={}], found {}", num_experts, top_k);
  MOELORA_CHECK(n_group >= 1 && num_experts % n_group == 0,
                "router: n_group must divide num_experts={}, found n_group={}", num_experts,
                n_group);
  MOELORA_CHECK(topk_group >= 1 && topk_group <= n_group,
                "router: topk_group must be in [1, n_group={}], found {}", n_group, topk_group);
  if (n_group > 1) {
    const int per_group = num_experts / n_group;
    MOELORA_CHECK(top_k <= topk_group * per_group,
                  "router: top_k={} exceeds the experts in the topk_group={} kept groups ({})",
                  top_k, topk_group, topk_group * per_group);
    MOELORA_CHECK(group_score != GroupScore::top2_sum || per_group >= 2,
                  "router: top2_sum group scoring needs >= 2 experts per group, found {}",
                  per_group);
  }
  MOELORA_CHECK(num_experts <= 1024, "router: at most 1024 experts supported, found {}",
                num_experts);
  MOELORA_CHECK(top_k <= 32, "router: top_k at most 32 supported, found {}", top_k);
}

void MoeShape::validate() const {
  MOELORA_CHECK(hidden > 0 && inter > 0 && num_experts > 0 && top_k > 0,
                "MoE shape '{}': hidden, inter, num_experts, top_k must be > 0, found {}, {}, {}, "
                "{}",
                name, hidden, inter, num_experts, top_k);
  MOELORA_CHECK(top_k <= num_experts, "MoE shape '{}': top_k={} > num_experts={}", name, top_k,
                num_experts);
  MOELORA_CHECK(shared_inter >= 0, "MoE shape '{}': shared_inter must be >= 0, found {}", name,
                shared_inter);
  MOELORA_CHECK(!shared_gate || shared_inter > 0,
                "MoE shape '{}': shared_gate set without a shared expert", name);
}

MoeShape MoeShape::by_name(std::string_view name) {
  MoeShape s;
  s.name = std::string(name);
  if (name == "qwen3-30b-a3b") {
    s.hidden = 2048, s.inter = 768, s.num_experts = 128, s.top_k = 8;
  } else if (name == "deepseek-v2-lite") {
    s.hidden = 2048, s.inter = 1408, s.num_experts = 64, s.top_k = 6, s.shared_inter = 2 * 1408;
  } else if (name == "mixtral-8x7b") {
    s.hidden = 4096, s.inter = 14336, s.num_experts = 8, s.top_k = 2;
  } else if (name == "deepseek-v3") {
    s.hidden = 7168, s.inter = 2048, s.num_experts = 256, s.top_k = 8, s.shared_inter = 2048;
  } else if (name == "qwen2-moe-a2.7b") {
    s.hidden = 2048, s.inter = 1408, s.num_experts = 60, s.top_k = 4, s.shared_inter = 5632;
    s.shared_gate = true;
  } else {
    std::string known;
    for (const auto& n : known_names()) known += (known.empty() ? "" : ", ") + n;
    MOELORA_THROW("unknown MoE shape '{}'; known: {}", name, known);
  }
  return s;
}

std::vector<std::string> MoeShape::known_names() {
  return {"qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b", "deepseek-v3", "qwen2-moe-a2.7b"};
}

RouterConfig MoeShape::default_router() const {
  if (name == "deepseek-v3") return RouterConfig::deepseek_v3(num_experts, top_k, 8, 4, 2.5f);
  if (name == "deepseek-v2-lite") {
    // V2-Lite: softmax, greedy top-6, no renormalization, routed_scaling_factor 1.0.
    return RouterConfig::softmax_topk(num_experts, top_k, false);
  }
  if (name == "qwen2-moe-a2.7b") return RouterConfig::softmax_topk(num_experts, top_k, false);
  return RouterConfig::softmax_topk(num_experts, top_k, true);  // qwen3 (norm_topk_prob), mixtral
}

}  // namespace moelora
