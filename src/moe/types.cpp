#include "moelora/moe/types.h"

#include <algorithm>

namespace moelora {

int64_t MoeAlignment::capacity(int64_t num_slots, int num_groups, int block_m) {
  MOELORA_CHECK(block_m >= 1 && block_m <= kMaxBlockM, "alignment: block_m must be in [1, {}], found {}",
                kMaxBlockM, block_m);
  // Each non-empty group pads by at most block_m - 1; at most min(slots, groups) are non-empty.
  const int64_t bound = num_slots + std::min<int64_t>(num_slots, num_groups) * (block_m - 1);
  return std::max<int64_t>((bound + block_m - 1) / block_m * block_m, block_m);
}

MoeAlignment MoeAlignment::allocate(int64_t max_slots, int num_groups, int max_block_m,
                                    Device device) {
  MOELORA_CHECK(max_slots > 0 && num_groups > 0, "alignment: max_slots={} and num_groups={} must be > 0",
                max_slots, num_groups);
  MoeAlignment p;
  p.block_m = max_block_m;
  p.num_groups = num_groups;
  const int64_t cap = capacity(max_slots, num_groups, max_block_m);
  p.sorted_slots = Tensor::empty({cap}, DType::i32, device);
  // Blocks of any block_m <= max_block_m fit: blocks(bm) <= capacity(bm) / bm <= cap.
  p.block_group = Tensor::empty({cap}, DType::i32, device);
  p.num_padded = Tensor::zeros({1}, DType::i32, device);
  p.group_offsets = Tensor::empty({num_groups + 1}, DType::i32, device);
  return p;
}

void MoeWeights::validate(const MoeShape& s) const {
  MOELORA_CHECK(format == WeightFormat::bf16, "MoE weights: only bf16 is supported here");
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  check_dtype(w13, DType::bf16, "MoE weights w13 (gate_up)");
  check_shape(w13, {E, 2 * I, H}, "MoE weights w13 (gate_up)");
  check_contiguous(w13, "MoE weights w13 (gate_up)");
  check_dtype(w2, DType::bf16, "MoE weights w2 (down)");
  check_shape(w2, {E, H, I}, "MoE weights w2 (down)");
  check_contiguous(w2, "MoE weights w2 (down)");
  MOELORA_CHECK(w2.device() == w13.device(), "MoE weights: w13 on {} but w2 on {}",
                w13.device().str(), w2.device().str());
  if (correction_bias.defined()) {
    check_dtype(correction_bias, DType::f32, "MoE weights correction_bias");
    check_shape(correction_bias, {E}, "MoE weights correction_bias");
  }
  if (s.shared_inter > 0) {
    const int64_t Is = s.shared_inter;
    check_dtype(shared_w13, DType::bf16, "MoE weights shared_w13");
    check_shape(shared_w13, {1, 2 * Is, H}, "MoE weights shared_w13");
    check_dtype(shared_w2, DType::bf16, "MoE weights shared_w2");
    check_shape(shared_w2, {1, H, Is}, "MoE weights shared_w2");
  } else {
    MOELORA_CHECK(!shared_w13.defined() && !shared_w2.defined(),
                  "MoE weights: shared expert tensors given but shape '{}' has shared_inter=0",
                  s.name);
  }
}

}  // namespace moelora
