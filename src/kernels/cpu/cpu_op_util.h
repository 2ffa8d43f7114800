// Helpers shared by the CPU reference ops (internal): argument checks and a walk over the
// slots of an alignment plan that validates the plan as it goes.
#pragma once

#include <cstdint>
#include <vector>

#include "moelora/core/tensor.h"
#include "moelora/moe/types.h"

namespace moelora::cpu {

// A defined, contiguous host tensor of dtype `dt`.
inline void check_host(const Tensor& t, DType dt, const char* what) {
  check_dtype(t, dt, what);
  check_device(t, Device::cpu(), what);
  check_contiguous(t, what);
}

// A checked host view of a plan's buffers: the entries in use and the group segments.
struct PlanView {
  int64_t num_padded = 0;
  const int32_t* sorted_slots = nullptr;
  const int32_t* group_offsets = nullptr;
  int num_groups = 0;
};

// Validates `plan` (as written by moe_align) for a problem with `num_slots` token-slots.
inline PlanView check_plan(const MoeAlignment& plan, int64_t num_slots, const char* op) {
  MOELORA_CHECK(plan.num_groups > 0, "{}: plan.num_groups must be > 0, found {}", op,
                plan.num_groups);
  check_host(plan.sorted_slots, DType::i32, "alignment plan sorted_slots");
  check_host(plan.num_padded, DType::i32, "alignment plan num_padded");
  check_host(plan.group_offsets, DType::i32, "alignment plan group_offsets");
  check_shape(plan.num_padded, {1}, "alignment plan num_padded");
  check_shape(plan.group_offsets, {int64_t(plan.num_groups) + 1}, "alignment plan group_offsets");
  PlanView v;
  v.num_groups = plan.num_groups;
  v.num_padded = plan.num_padded.data<int32_t>()[0];
  v.sorted_slots = plan.sorted_slots.data<int32_t>();
  v.group_offsets = plan.group_offsets.data<int32_t>();
  MOELORA_CHECK(v.num_padded >= 0 && v.num_padded <= plan.sorted_slots.numel(),
                "{}: plan.num_padded={} outside the sorted_slots capacity 0..{}", op, v.num_padded,
                plan.sorted_slots.numel());
  MOELORA_CHECK(v.group_offsets[0] == 0 && v.group_offsets[plan.num_groups] == v.num_padded,
                "{}: plan.group_offsets must run from 0 to num_padded={}, found {}..{}", op,
                v.num_padded, v.group_offsets[0], v.group_offsets[plan.num_groups]);
  for (int g = 0; g < plan.num_groups; ++g)
    MOELORA_CHECK(v.group_offsets[g] <= v.group_offsets[g + 1],
                  "{}: plan.group_offsets not ascending at group {} ({} > {})", op, g,
                  v.group_offsets[g], v.group_offsets[g + 1]);
  for (int64_t i = 0; i < v.num_padded; ++i)
    MOELORA_CHECK(v.sorted_slots[i] >= 0 && v.sorted_slots[i] <= num_slots,
                  "{}: plan.sorted_slots[{}]={} outside 0..{} (the padding value is {}); was the "
                  "plan built for this batch?",
                  op, i, v.sorted_slots[i], num_slots, num_slots);
  return v;
}

// The real (non-padding) slots of group g, in plan order.
inline void group_slots(const PlanView& v, int g, int64_t num_slots, std::vector<int32_t>& out) {
  out.clear();
  for (int64_t i = v.group_offsets[g]; i < v.group_offsets[g + 1]; ++i)
    if (v.sorted_slots[i] < num_slots) out.push_back(v.sorted_slots[i]);
}

// f32 dot product of a row already in f32 with a bf16 row; several partial sums so the loop
// vectorizes without reassociation flags.
inline float dot_f32_bf16(const float* x, const bf16_t* w, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int l = 0; l < 8; ++l) acc[l] += x[c + l] * bf16_to_float(w[c + l]);
  float tail = 0;
  for (; c < n; ++c) tail += x[c] * bf16_to_float(w[c]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

inline float dot_f32(const float* x, const float* w, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int l = 0; l < 8; ++l) acc[l] += x[c + l] * w[c + l];
  float tail = 0;
  for (; c < n; ++c) tail += x[c] * w[c];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

inline void bf16_row_to_f32(const bf16_t* src, int64_t n, float* dst) {
  for (int64_t c = 0; c < n; ++c) dst[c] = bf16_to_float(src[c]);
}

}  // namespace moelora::cpu
