// CPU token alignment: invariants on random routings, -1 ids, skew, bad ids.
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cpu/moe_ops.h"
#include "moe_reference.h"
#include "test_util.h"

namespace moelora {
namespace {

// A plan sized for `slots` slots with every buffer poisoned, so unwritten entries show.
MoeAlignment poisoned_plan(int64_t slots, int groups, int block_m) {
  MoeAlignment p = MoeAlignment::allocate(slots, groups, kMaxBlockM, Device::cpu());
  p.block_m = block_m;
  for (Tensor* t : {&p.sorted_slots, &p.block_group, &p.num_padded, &p.group_offsets})
    t->fill_bytes(0x5a);
  return p;
}

// Checks every invariant of the plan for `ids` (i32 [M, k]) from first principles.
void check_plan(const std::vector<int32_t>& ids, int64_t M, int64_t k, int G,
                const MoeAlignment& p) {
  const int64_t slots = M * k;
  const int bm = p.block_m;
  const auto sorted = test::to_ints(p.sorted_slots);
  const auto blocks = test::to_ints(p.block_group);
  const auto offsets = test::to_ints(p.group_offsets);
  const int64_t total = test::to_ints(p.num_padded)[0];

  std::vector<std::vector<int32_t>> members(static_cast<size_t>(G));
  for (int64_t s = 0; s < slots; ++s)
    if (ids[size_t(s)] >= 0) members[size_t(ids[size_t(s)])].push_back(int32_t(s));  // ascending

  ASSERT_EQ(total % bm, 0) << "num_padded must be a multiple of block_m";
  ASSERT_EQ(offsets[0], 0);
  ASSERT_EQ(offsets[size_t(G)], total);
  int64_t expect_off = 0;
  std::vector<int> seen(size_t(slots), 0);
  for (int g = 0; g < G; ++g) {
    const auto& mem = members[size_t(g)];
    const int64_t padded = (int64_t(mem.size()) + bm - 1) / bm * bm;
    ASSERT_EQ(offsets[size_t(g)], expect_off) << "group " << g;
    ASSERT_EQ(offsets[size_t(g) + 1] - offsets[size_t(g)], padded) << "group " << g;
    for (int64_t i = 0; i < padded; ++i) {
      const int32_t v = sorted[size_t(expect_off + i)];
      if (i < int64_t(mem.size())) {
        ASSERT_EQ(v, mem[size_t(i)]) << "group " << g << " entry " << i;
        ASSERT_EQ(ids[size_t(v)], g);
        seen[size_t(v)]++;
      } else {
        ASSERT_EQ(v, slots) << "padding of group " << g << " entry " << i;
      }
    }
    for (int64_t b = expect_off / bm; b < (expect_off + padded) / bm; ++b)
      ASSERT_EQ(blocks[size_t(b)], g) << "block " << b;
    expect_off += padded;
  }
  ASSERT_EQ(expect_off, total);
  for (size_t b = size_t(total / bm); b < blocks.size(); ++b)
    ASSERT_EQ(blocks[b], -1) << "block " << b << " past num_padded";
  for (int64_t s = 0; s < slots; ++s)
    ASSERT_EQ(seen[size_t(s)], ids[size_t(s)] >= 0 ? 1 : 0) << "slot " << s;
}

void align_and_check(const std::vector<int32_t>& ids, int64_t M, int64_t k, int G, int bm) {
  MoeAlignment p = poisoned_plan(M * k, G, bm);
  const Tensor t = test::from_ints(ids, {M, k});
  cpu::moe_align(t, p, Stream());
  check_plan(ids, M, k, G, p);
}

TEST(MoeAlign, RandomRoutingsInvariants) {
  std::mt19937_64 rng(test::fresh_seed());
  const int G = 32, k = 4;
  for (int64_t M : {1, 7, 64, 257, 1024}) {
    for (int bm : {1, 4, 16, 64}) {
      SCOPED_TRACE("M=" + std::to_string(M) + " block_m=" + std::to_string(bm));
      std::uniform_int_distribution<int> expert(0, G - 1), coin(0, 9);
      std::vector<int32_t> ids(size_t(M * k));
      for (auto& v : ids) v = coin(rng) == 0 ? -1 : expert(rng);  // ~10% "not here"
      align_and_check(ids, M, k, G, bm);
    }
  }
}

TEST(MoeAlign, AllTokensToOneExpert) {
  for (int bm : {1, 16, 64}) {
    const int64_t M = 257, k = 1;
    align_and_check(std::vector<int32_t>(size_t(M * k), 5), M, k, 8, bm);
    // Top-2 where every token picks experts 7 and 0.
    std::vector<int32_t> ids;
    for (int64_t t = 0; t < M; ++t) ids.insert(ids.end(), {7, 0});
    align_and_check(ids, M, 2, 8, bm);
  }
}

TEST(MoeAlign, AllSlotsNotHere) {
  const int64_t M = 9, k = 3;
  MoeAlignment p = poisoned_plan(M * k, 4, 16);
  cpu::moe_align(test::from_ints(std::vector<int32_t>(size_t(M * k), -1), {M, k}), p, Stream());
  EXPECT_EQ(test::to_ints(p.num_padded)[0], 0);
  for (int32_t b : test::to_ints(p.block_group)) ASSERT_EQ(b, -1);
  EXPECT_EQ(test::to_ints(p.group_offsets), (std::vector<int32_t>{0, 0, 0, 0, 0}));
}

TEST(MoeAlign, SmallExampleExact) {
  // 3 tokens, k = 2, 3 groups, block 2: group 0 <- {1, 4}, group 1 <- {}, group 2 <- {0, 2, 5}.
  MoeAlignment p = poisoned_plan(6, 3, 2);
  cpu::moe_align(test::from_ints({2, 0, 2, -1, 0, 2}, {3, 2}), p, Stream());
  EXPECT_EQ(test::to_ints(p.num_padded)[0], 6);
  EXPECT_EQ(test::to_ints(p.group_offsets), (std::vector<int32_t>{0, 2, 2, 6}));
  const auto sorted = test::to_ints(p.sorted_slots);
  EXPECT_EQ(std::vector<int32_t>(sorted.begin(), sorted.begin() + 6),
            (std::vector<int32_t>{1, 4, 0, 2, 5, 6}));
  const auto blocks = test::to_ints(p.block_group);
  EXPECT_EQ(std::vector<int32_t>(blocks.begin(), blocks.begin() + 4),
            (std::vector<int32_t>{0, 2, 2, -1}));
}

TEST(MoeAlign, BadInputThrows) {
  MoeAlignment p = poisoned_plan(8, 4, 4);
  test::expect_error(
      [&] {
        cpu::moe_align(test::from_ints({0, 1, 4, 2}, {2, 2}), p, Stream());
      },
      "group id 4 at slot 2 (token 1, choice 0) is outside [-1, 4)");
  test::expect_error(
      [&] {
        cpu::moe_align(test::from_ints({0, -2, 1, 2}, {2, 2}), p, Stream());
      },
      "group id -2");
  // More slots than the plan was sized for.
  MoeAlignment small = MoeAlignment::allocate(2, 4, /*max_block_m=*/4, Device::cpu());
  test::expect_error(
      [&] {
        cpu::moe_align(test::from_ints({0, 1, 2, 3, 0, 1, 2, 3}, {4, 2}), small, Stream());
      },
      "do not fit");
  // block_m outside [1, kMaxBlockM]; wrong dtype.
  MoeAlignment bad = poisoned_plan(8, 4, 4);
  bad.block_m = 0;
  test::expect_error(
      [&] {
        cpu::moe_align(test::from_ints({0, 1}, {1, 2}), bad, Stream());
      },
      "block_m");
  test::expect_error(
      [&] {
        cpu::moe_align(Tensor::zeros({1, 2}, DType::f32), p, Stream());
      },
      "expected dtype i32");
}

}  // namespace
}  // namespace moelora
