// Dense LoRA on CUDA against the CPU reference: fresh random pools and batches, poisoned
// workspaces, M = 1..257, f32 and bf16 outputs, base tokens bit-identical.
#include <gtest/gtest.h>

#include "dense_lora_case.h"
#include "gpu_op_test_util.h"
#include "test_util.h"

namespace moelora {
namespace {

class DenseLoraGpu : public ::testing::TestWithParam<int64_t> {};

// Both expand variants: r_max a multiple of 8 (B read 8 ranks per load; ranks that are not
// multiples of 8 or 16 included) and not (one rank at a time); slices of any width; K from 256
// to 4096 (the shrink's threads stride K).
struct Config {
  int64_t k;
  std::vector<int64_t> widths;
  std::vector<std::vector<int>> ranks;
  int r_max;
};
const Config kConfigs[] = {
    {256, {128, 64, 64}, {{16, 16, 16}, {8, 0, 64}, {0, 32, 0}, {64, 64, 64}}, 64},
    {4096, {96, 40, 40}, {{12, 24, 5}, {0, 17, 24}, {24, 24, 24}}, 24},
    {1024, {64}, {{20}, {3}, {0}}, 20},
    {512, {6, 10}, {{8, 16}, {16, 0}}, 16},  // slices narrower than a warp, odd offsets
};

TEST_P(DenseLoraGpu, MatchesCpu) {
  MOELORA_REQUIRE_GPU();
  const int64_t m = GetParam();
  std::mt19937_64 rng(test::fresh_seed());
  for (const Config& cfg : kConfigs) {
    SCOPED_TRACE(fmt::format("K {} r_max {}", cfg.k, cfg.r_max));
    const auto c = test::DenseLoraCase::make(m, cfg.k, cfg.widths, cfg.ranks, cfg.r_max, rng);
    const DenseLoraPool cpu_pool = c.pool(Device::cpu());
    const DenseLoraPool gpu_pool = c.pool(Device::cuda());
    const int64_t n = c.slices.total(), width = int64_t(cfg.widths.size()) * cfg.r_max;
    const Stream stream = Stream::create(Device::cuda());
    for (DType yt : {DType::f32, DType::bf16}) {
      SCOPED_TRACE(yt == DType::f32 ? "y f32" : "y bf16");
      Tensor y_cpu = test::random_tensor({m, n}, yt, rng);
      Tensor y_gpu = y_cpu.to(Device::cuda());
      Tensor u_cpu = Tensor::empty({m, width}, DType::f32);
      Tensor u_gpu = Tensor::empty({m, width}, DType::f32, Device::cuda());
      u_gpu.fill_bytes(0xFF);  // NaN: columns past a slot's rank must never be read
      apply_dense_lora(cpu_pool, c.x, c.token_slot, u_cpu, y_cpu, Stream());
      apply_dense_lora(gpu_pool, c.x.to(Device::cuda()), c.token_slot.to(Device::cuda()), u_gpu,
                       y_gpu, stream);
      stream.synchronize();
      const auto a = test::to_floats(y_gpu), b = test::to_floats(y_cpu);
      EXPECT_TRUE(test::allclose(a, b, yt == DType::f32 ? 1e-4 : 1e-2, 1e-4));
      const auto ts = test::to_ints(c.token_slot);
      for (int64_t t = 0; t < m; ++t)
        if (ts[size_t(t)] < 0)
          for (int64_t j = 0; j < n; ++j) ASSERT_EQ(a[size_t(t * n + j)], b[size_t(t * n + j)]);
    }
  }
}

// The fast decode path's folded expands: the split into the slices' buffers and the residual
// add give exactly the bits of dense_lora_expand followed by the plain split / add (y itself
// untouched), with and without a pool.
TEST_P(DenseLoraGpu, FoldedExpandsMatchExpandThenSplitOrAdd) {
  MOELORA_REQUIRE_GPU();
  const int64_t m = GetParam();
  std::mt19937_64 rng(test::fresh_seed());
  const Device d = Device::cuda();
  for (const Config& cfg : kConfigs) {
    SCOPED_TRACE(fmt::format("K {} r_max {}", cfg.k, cfg.r_max));
    const auto c = test::DenseLoraCase::make(m, cfg.k, cfg.widths, cfg.ranks, cfg.r_max, rng);
    const DenseLoraPool pool = c.pool(d);
    const int64_t n = c.slices.total(), width = int64_t(cfg.widths.size()) * cfg.r_max;
    const Stream stream = Stream::create(d);
    const Tensor ts = c.token_slot.to(d);
    const Tensor xd = c.x.to(d);  // alive until the shrink has run
    Tensor u = Tensor::empty({m, width}, DType::f32, d);
    u.fill_bytes(0xFF, &stream);
    dense_lora_shrink(pool, xd, ts, u, stream);
    stream.synchronize();
    const Tensor y_host = test::random_tensor({m, n}, DType::f32, rng);
    const Tensor x_host = test::random_tensor({m, n}, DType::f32, rng);
    for (bool lora : {true, false}) {
      SCOPED_TRACE(lora ? "with LoRA" : "no pool");
      const Tensor y = y_host.to(d);
      Tensor want = y_host.to(d);
      if (lora) dense_lora_expand(pool, u, ts, want, stream);
      stream.synchronize();  // the host copy below does not wait for `stream`
      const auto w = test::to_floats(want), x0 = test::to_floats(x_host);
      // Split.
      std::vector<Tensor> outs;
      std::vector<Tensor*> ptrs;
      for (int64_t wd : cfg.widths)
        outs.push_back(test::poisoned({m, wd}, DType::f32, d, test::kPoisonFloat));
      for (Tensor& o : outs) ptrs.push_back(&o);
      dense_lora_expand_split(lora ? &pool : nullptr, u, ts, y, c.slices, ptrs, stream);
      // Residual.
      Tensor x = x_host.to(d);
      dense_lora_expand_residual(lora ? &pool : nullptr, u, ts, y, x, stream);
      stream.synchronize();
      EXPECT_EQ(test::to_floats(y), test::to_floats(y_host.to(d))) << "y was changed";
      int64_t col = 0;
      for (size_t s = 0; s < outs.size(); ++s) {
        const auto o = test::to_floats(outs[s]);
        const int64_t wd = cfg.widths[s];
        for (int64_t t = 0; t < m; ++t)
          for (int64_t j = 0; j < wd; ++j)
            ASSERT_EQ(o[size_t(t * wd + j)], w[size_t(t * n + col + j)])
                << "slice " << s << " row " << t << " col " << j;
        col += wd;
      }
      const auto xr = test::to_floats(x);
      for (int64_t i = 0; i < m * n; ++i)
        ASSERT_EQ(xr[size_t(i)], x0[size_t(i)] + w[size_t(i)]) << "residual element " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tokens, DenseLoraGpu, ::testing::Values(1, 7, 64, 257));

}  // namespace
}  // namespace moelora
