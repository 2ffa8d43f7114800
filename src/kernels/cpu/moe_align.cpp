// CPU reference token alignment: a counting sort of token-slots by group id into segments
// padded to multiples of block_m.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/cpu/cpu_op_util.h"
#include "kernels/cpu/moe_ops.h"

namespace moelora::cpu {

void moe_align(const Tensor& group_ids, MoeAlignment& plan, const Stream& stream) {
  (void)stream;
  check_host(group_ids, DType::i32, "alignment group_ids");
  MOELORA_CHECK(group_ids.dim() == 2, "alignment group_ids: expected i32 [M, k], found {}",
                group_ids.describe());
  MOELORA_CHECK(plan.block_m >= 1 && plan.block_m <= kMaxBlockM,
                "alignment: plan.block_m must be in [1, {}], found {}", kMaxBlockM, plan.block_m);
  MOELORA_CHECK(plan.num_groups > 0, "alignment: plan.num_groups must be > 0, found {}",
                plan.num_groups);
  check_host(plan.sorted_slots, DType::i32, "alignment plan sorted_slots");
  check_host(plan.block_group, DType::i32, "alignment plan block_group");
  check_host(plan.num_padded, DType::i32, "alignment plan num_padded");
  check_host(plan.group_offsets, DType::i32, "alignment plan group_offsets");
  MOELORA_CHECK(plan.sorted_slots.dim() == 1 && plan.block_group.dim() == 1,
                "alignment plan: sorted_slots and block_group must be 1-D, found {} and {}",
                plan.sorted_slots.describe(), plan.block_group.describe());
  check_shape(plan.num_padded, {1}, "alignment plan num_padded");
  check_shape(plan.group_offsets, {int64_t(plan.num_groups) + 1}, "alignment plan group_offsets");

  const int64_t M = group_ids.size(0), k = group_ids.size(1), slots = M * k;
  const int G = plan.num_groups, bm = plan.block_m;
  const int32_t* gid = group_ids.data<int32_t>();

  std::vector<int64_t> count(size_t(G), 0);
  for (int64_t s = 0; s < slots; ++s) {
    const int32_t g = gid[s];
    MOELORA_CHECK(g >= -1 && g < G,
                  "alignment: group id {} at slot {} (token {}, choice {}) is outside [-1, {})", g,
                  s, s / k, s % k, G);
    if (g >= 0) count[size_t(g)]++;
  }
  int32_t* offsets = plan.group_offsets.data<int32_t>();
  int64_t total = 0;
  for (int g = 0; g < G; ++g) {
    offsets[g] = int32_t(total);
    total += (count[size_t(g)] + bm - 1) / bm * bm;
  }
  const int64_t cap = plan.sorted_slots.size(0), blocks = total / bm;
  MOELORA_CHECK(total <= cap && blocks <= plan.block_group.size(0),
                "alignment: {} padded entries ({} blocks of {}) do not fit the plan's "
                "sorted_slots [{}] / block_group [{}]; allocate the plan for more slots",
                total, blocks, bm, cap, plan.block_group.size(0));
  MOELORA_CHECK(total <= INT32_MAX, "alignment: {} padded entries overflow i32", total);
  offsets[G] = int32_t(total);
  plan.num_padded.data<int32_t>()[0] = int32_t(total);

  // Stable scatter: slots ascending within a group; the rest of each segment is padding.
  int32_t* sorted = plan.sorted_slots.data<int32_t>();
  std::vector<int64_t> next(static_cast<size_t>(G));
  for (int g = 0; g < G; ++g) next[size_t(g)] = offsets[g];
  std::fill(sorted, sorted + total, int32_t(slots));
  for (int64_t s = 0; s < slots; ++s)
    if (gid[s] >= 0) sorted[next[size_t(gid[s])]++] = int32_t(s);

  int32_t* block_group = plan.block_group.data<int32_t>();
  const int64_t nb = plan.block_group.size(0);
  std::fill(block_group, block_group + nb, -1);
  for (int g = 0; g < G; ++g)
    for (int64_t b = offsets[g] / bm; b < offsets[g + 1] / bm; ++b) block_group[b] = g;
}

}  // namespace moelora::cpu
