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

const char* format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::bf16: return "bf16";
    case WeightFormat::int4: return "int4";
    case WeightFormat::int8: return "int8";
    case WeightFormat::fp8_block: return "fp8_block";
    case WeightFormat::nvfp4: return "nvfp4";
  }
  return "?";
}

WeightFormat parse_weight_format(std::string_view name) {
  for (WeightFormat f : {WeightFormat::bf16, WeightFormat::int4, WeightFormat::int8,
                         WeightFormat::fp8_block, WeightFormat::nvfp4})
    if (name == format_name(f)) return f;
  if (name == "fp8") return WeightFormat::fp8_block;
  MOELORA_THROW("unknown weight format '{}': expected one of bf16, int4, int8, fp8_block (fp8), "
                "nvfp4", name);
}

ExpertMatrices::ExpertMatrices(Tensor bf16_stack) : w(std::move(bf16_stack)) {
  if (w.defined() && w.dim() == 3) {
    groups = w.size(0);
    n = w.size(1);
    k = w.size(2);
  }
}

void ExpertMatrices::validate(int64_t g, int64_t nn, int64_t kk, const std::string& name) const {
  MOELORA_CHECK(w.defined(), "{}: not given", name);
  if (format == WeightFormat::bf16) {
    check_dtype(w, DType::bf16, name.c_str());
    check_shape(w, {g, nn, kk}, name.c_str());
    check_contiguous(w, name.c_str());
    return;
  }
  MOELORA_CHECK(groups == g && n == nn && k == kk,
                "{}: expected {} logical [{}, {}, {}] (groups, out, in), found [{}, {}, {}]", name,
                format_name(format), g, nn, kk, groups, n, k);
  MOELORA_CHECK(group_k > 0 && group_n > 0, "{}: {} stack without scale group sizes", name,
                format_name(format));
  MOELORA_CHECK(scales.defined(), "{}: {} stack without scales", name, format_name(format));
  for (const Tensor* t : {&scales, &zeros, &perm, &global_scale})
    if (t->defined())
      MOELORA_CHECK(t->device() == w.device(), "{}: codes on {} but a scale tensor on {}", name,
                    w.device().str(), t->device().str());
  if (perm.defined()) check_shape(perm, {g, kk}, (name + " perm").c_str());
  if (format == WeightFormat::nvfp4) {
    MOELORA_CHECK(global_scale.defined(), "{}: nvfp4 stack without global_scale", name);
    // [g]: one weight_scale_2 per matrix; [g, n]: one per row (parts of a group with
    // different weight_scale_2, see src/quant/experts_nvfp4.cpp).
    if (global_scale.dim() == 2)
      check_shape(global_scale, {g, nn}, (name + " global_scale").c_str());
    else
      check_shape(global_scale, {g}, (name + " global_scale").c_str());
  }
}

ExpertMatrices ExpertMatrices::to(Device d) const {
  ExpertMatrices r = *this;
  for (Tensor* t : {&r.w, &r.scales, &r.zeros, &r.perm, &r.global_scale})
    if (t->defined()) *t = t->to(d);
  return r;
}

void MoeWeights::validate(const MoeShape& s) const {
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  for (const ExpertMatrices* m : {&w13, &w2, &shared_w13, &shared_w2})
    if (m->defined())
      MOELORA_CHECK(m->format == format, "MoE weights: format {} but a stack is {}",
                    format_name(format), format_name(m->format));
  w13.validate(E, 2 * I, H, "MoE weights w13 (gate_up)");
  w2.validate(E, H, I, "MoE weights w2 (down)");
  MOELORA_CHECK(w2.device() == w13.device(), "MoE weights: w13 on {} but w2 on {}",
                w13.device().str(), w2.device().str());
  if (correction_bias.defined()) {
    check_dtype(correction_bias, DType::f32, "MoE weights correction_bias");
    check_shape(correction_bias, {E}, "MoE weights correction_bias");
  }
  if (s.shared_inter > 0) {
    const int64_t Is = s.shared_inter;
    shared_w13.validate(1, 2 * Is, H, "MoE weights shared_w13");
    shared_w2.validate(1, H, Is, "MoE weights shared_w2");
  } else {
    MOELORA_CHECK(!shared_w13.defined() && !shared_w2.defined(),
                  "MoE weights: shared expert tensors given but shape '{}' has shared_inter=0",
                  s.name);
  }
}

}  // namespace moelora
