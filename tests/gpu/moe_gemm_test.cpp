// CUDA expert GEMMs (cuda::moe_gemm1 / moe_gemm2) against a double-precision loop, on fresh
// random inputs with NaN-poisoned outputs, over batch sizes, routings, block sizes and tiles.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cuda/moe_gemm_config.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/core/stream.h"
#include "moelora/moe/types.h"
#include "test_util.h"

namespace moelora {
namespace {

// Host-built alignment (independent of the moe_align kernels), uploaded to the device.
MoeAlignment make_plan(const std::vector<int32_t>& ids, int groups, int block_m) {
  const int64_t slots = int64_t(ids.size());
  const int64_t cap = MoeAlignment::capacity(slots, groups, block_m);
  std::vector<int32_t> sorted(cap, int32_t(slots)), block_group(cap / block_m, -1),
      offsets(groups + 1, 0);
  int64_t pos = 0;
  for (int g = 0; g < groups; ++g) {
    offsets[g] = int32_t(pos);
    const int64_t start = pos;
    for (int64_t s = 0; s < slots; ++s)
      if (ids[s] == g) sorted[pos++] = int32_t(s);
    pos = start + (pos - start + block_m - 1) / block_m * block_m;
    for (int64_t b = start / block_m; b < pos / block_m; ++b) block_group[b] = g;
  }
  offsets[groups] = int32_t(pos);
  MoeAlignment p;
  p.block_m = block_m;
  p.num_groups = groups;
  p.sorted_slots = test::from_ints(sorted, {cap}).to(Device::cuda());
  p.block_group = test::from_ints(block_group, {cap / block_m}).to(Device::cuda());
  p.num_padded = test::from_ints({int32_t(pos)}, {1}).to(Device::cuda());
  p.group_offsets = test::from_ints(offsets, {groups + 1}).to(Device::cuda());
  return p;
}

enum class Routing { random, one_expert, all_missing };

// ids [M, k]: distinct experts per token (random), some -1 (not here) when `holes`.
std::vector<int32_t> make_ids(int64_t m, int k, int groups, Routing r, bool holes,
                              std::mt19937_64& rng) {
  std::vector<int32_t> ids(m * k);
  std::vector<int32_t> perm(groups);
  for (int g = 0; g < groups; ++g) perm[g] = g;
  for (int64_t t = 0; t < m; ++t) {
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < k; ++j) {
      int32_t id = r == Routing::one_expert ? groups / 2 : perm[j % groups];
      if (r == Routing::all_missing || (holes && rng() % 5 == 0)) id = -1;
      ids[t * k + j] = id;
    }
  }
  return ids;
}

struct Case {
  int64_t m;
  int top_k;
  int groups;
  int hidden;
  int inter;
  Routing routing = Routing::random;
  bool holes = true;
  int block_m = 0;  // 0: the heuristic's
  int rows = 0;     // 0: the heuristic's tile
  bool weighted = true;
  bool pdl = false;  // programmatic dependent launch (must not change any result)
};

// out[s, n] = scale[s] * sum_c act[s / div, c] * w[g, n, c] in double; NaN where not aligned.
std::vector<float> reference(const std::vector<float>& act, const std::vector<float>& w,
                             const std::vector<int32_t>& ids, const std::vector<float>* scale,
                             int div, int64_t n, int64_t k, int groups) {
  const int64_t slots = int64_t(ids.size());
  std::vector<float> out(slots * n, std::nanf(""));
  for (int64_t s = 0; s < slots; ++s) {
    const int g = ids[s];
    if (g < 0 || g >= groups) continue;
    const float* a = &act[(s / div) * k];
    for (int64_t r = 0; r < n; ++r) {
      const float* wr = &w[(int64_t(g) * n + r) * k];
      double acc = 0;
      for (int64_t c = 0; c < k; ++c) acc += double(a[c]) * double(wr[c]);
      out[s * n + r] = float(acc * (scale ? (*scale)[s] : 1.0f));
    }
  }
  return out;
}

// Aligned rows must match; rows of unaligned slots must still hold the poison bytes.
void expect_matches(const std::vector<float>& got, const std::vector<float>& want, int64_t n,
                    const char* what) {
  std::vector<float> got_live, want_live;
  int64_t touched_dead = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(want[i])) {
      uint32_t bits;
      std::memcpy(&bits, &got[i], 4);
      touched_dead += bits != 0xFFFFFFFFu;
    } else {
      got_live.push_back(got[i]);
      want_live.push_back(want[i]);
    }
  }
  EXPECT_EQ(touched_dead, 0) << what << ": rows of unaligned slots were written (n=" << n << ")";
  if (!want_live.empty()) EXPECT_TRUE(test::allclose(got_live, want_live, 1e-4, 1e-5)) << what;
}

void run_case(const Case& c) {
  SCOPED_TRACE(::testing::Message() << "M=" << c.m << " k=" << c.top_k << " G=" << c.groups
                                    << " H=" << c.hidden << " I=" << c.inter << " block_m="
                                    << c.block_m << " rows=" << c.rows);
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t M = c.m, k = c.top_k, G = c.groups, H = c.hidden, I = c.inter, S = M * k;
  MoeShape shape{"test", c.hidden, c.inter, c.groups, c.top_k};
  const int block_m = c.block_m ? c.block_m : cuda::moe_block_m(M, shape);
  const auto ids = make_ids(M, c.top_k, c.groups, c.routing, c.holes, rng);
  MoeAlignment plan = make_plan(ids, c.groups, block_m);

  Tensor x = test::random_tensor({M, H}, DType::bf16, rng);
  Tensor w13 = test::random_tensor({G, 2 * I, H}, DType::bf16, rng);
  Tensor w2 = test::random_tensor({G, H, I}, DType::bf16, rng);
  Tensor a = test::random_tensor({S, I}, DType::bf16, rng);
  Tensor sw = test::random_tensor({S}, DType::f32, rng, 0.1f, 1.0f);

  Stream stream = Stream::create(Device::cuda());
  Tensor dx = x.to(Device::cuda()), dw13 = w13.to(Device::cuda()), dw2 = w2.to(Device::cuda());
  Tensor da = a.to(Device::cuda()), dsw = sw.to(Device::cuda());
  Tensor h = Tensor::empty({S, 2 * I}, DType::f32, Device::cuda());
  Tensor o = Tensor::empty({S, H}, DType::f32, Device::cuda());
  h.fill_bytes(0xFF);
  o.fill_bytes(0xFF);
  const Tensor no_weights;
  if (c.rows) {
    cuda::moe_gemm1_tiled(dx, c.top_k, plan, dw13, h, stream, {c.rows, c.pdl});
    // gemm2 after gemm1 with plan_ready: the plan was uploaded before gemm1 started.
    cuda::moe_gemm2_tiled(da, plan, dw2, c.weighted ? dsw : no_weights, o, stream,
                          {c.rows, c.pdl, c.pdl});
  } else {
    cuda::moe_gemm1(dx, c.top_k, plan, dw13, h, stream);
    cuda::moe_gemm2(da, plan, dw2, c.weighted ? dsw : no_weights, o, stream);
  }
  stream.synchronize();

  const auto sw_host = test::to_floats(sw);
  expect_matches(test::to_floats(h),
                 reference(test::to_floats(x), test::to_floats(w13), ids, nullptr, c.top_k,
                           2 * I, H, c.groups),
                 2 * I, "gemm1");
  expect_matches(test::to_floats(o),
                 reference(test::to_floats(a), test::to_floats(w2), ids,
                           c.weighted ? &sw_host : nullptr, 1, H, I, c.groups),
                 H, "gemm2");
}

TEST(CudaMoeGemm, BatchSizes) {
  MOELORA_REQUIRE_GPU();
  for (int64_t m : {1, 7, 64, 257, 1024}) run_case({m, 4, 16, 128, 64});
}

TEST(CudaMoeGemm, AllTokensToOneExpert) {
  MOELORA_REQUIRE_GPU();
  for (int bm : {8, 16, 128}) {
    Case c{257, 2, 8, 128, 64, Routing::one_expert, false, bm};
    run_case(c);
  }
  run_case({33, 2, 8, 128, 64, Routing::all_missing});  // nothing aligned: nothing written
}

TEST(CudaMoeGemm, EveryTileAndBlockSize) {
  MOELORA_REQUIRE_GPU();
  // H = 200 (K tail in the last 128-wide stage), 2I = 144 (partial row tiles), odd block_m.
  for (int rows : {32, 64, 128})
    for (int bm : {1, 8, 13, 16, 32, 64, 100, 128})
      run_case({50, 3, 5, 200, 72, Routing::random, true, bm, rows, bm % 2 == 0, bm == 8});
}

TEST(CudaMoeGemm, ModelShapes) {
  MOELORA_REQUIRE_GPU();
  run_case({5, 8, 128, 2048, 768});    // qwen3-30b-a3b, batch 5
  run_case({3, 6, 64, 2048, 1408});    // deepseek-v2-lite
  Case shared{6, 1, 1, 2048, 2816};    // deepseek-v2-lite shared expert: G = 1, top_k = 1
  shared.holes = false;
  shared.weighted = false;
  run_case(shared);
}

TEST(CudaMoeGemm, RejectsBadInput) {
  MOELORA_REQUIRE_GPU();
  std::string why;
  EXPECT_FALSE(cuda::moe_shape_supported({"odd", 100, 64, 8, 2}, &why));
  EXPECT_NE(why.find("multiple of 8"), std::string::npos) << why;
  EXPECT_FALSE(cuda::moe_shape_supported({"odd", 128, 60, 8, 2}, &why));
  EXPECT_TRUE(cuda::moe_shape_supported(MoeShape::by_name("qwen3-30b-a3b"), &why));
  EXPECT_TRUE(cuda::moe_shape_supported(MoeShape::by_name("mixtral-8x7b"), &why));

  std::mt19937_64 rng(test::fresh_seed());
  Stream stream = Stream::create(Device::cuda());
  const std::vector<int32_t> ids = {0, 1, 1, 0};
  MoeAlignment plan = make_plan(ids, 2, 8);
  auto dev = [&](Shape s, DType t) { return Tensor::zeros(std::move(s), t, Device::cuda()); };
  Tensor h = dev({4, 32}, DType::f32);
  // K = 100 cannot be streamed in 16-byte chunks.
  EXPECT_THROW(cuda::moe_gemm1(dev({2, 100}, DType::bf16), 2, plan, dev({2, 32, 100}, DType::bf16),
                               h, stream),
               Error);
  // Wrong dtype of the weights, wrong group count, wrong output shape, host tensors.
  EXPECT_THROW(cuda::moe_gemm1(dev({2, 64}, DType::bf16), 2, plan, dev({2, 32, 64}, DType::f32),
                               h, stream),
               Error);
  EXPECT_THROW(cuda::moe_gemm1(dev({2, 64}, DType::bf16), 2, plan, dev({3, 32, 64}, DType::bf16),
                               h, stream),
               Error);
  Tensor bad_h = dev({4, 31}, DType::f32);
  EXPECT_THROW(cuda::moe_gemm1(dev({2, 64}, DType::bf16), 2, plan, dev({2, 32, 64}, DType::bf16),
                               bad_h, stream),
               Error);
  Tensor host_x = Tensor::zeros({2, 64}, DType::bf16);
  EXPECT_THROW(cuda::moe_gemm1(host_x, 2, plan, dev({2, 32, 64}, DType::bf16), h, stream), Error);
  Tensor o = dev({4, 32}, DType::f32);
  EXPECT_THROW(cuda::moe_gemm2(dev({4, 64}, DType::bf16), plan, dev({2, 32, 64}, DType::bf16),
                               dev({3}, DType::f32), o, stream),
               Error);
  EXPECT_THROW(cuda::moe_gemm2_tiled(dev({4, 64}, DType::bf16), plan,
                                     dev({2, 32, 64}, DType::bf16), Tensor(), o, stream, {48}),
               Error);
  // A plan sized for fewer slots than the batch has.
  MoeAlignment small = make_plan({0, 1}, 2, 8);
  small.sorted_slots = small.sorted_slots.narrow(0, 0, 8);
  Tensor o64 = dev({64, 32}, DType::f32);
  EXPECT_THROW(cuda::moe_gemm2(dev({64, 64}, DType::bf16), small, dev({2, 32, 64}, DType::bf16),
                               Tensor(), o64, stream),
               Error);
  (void)rng;
}

}  // namespace
}  // namespace moelora
