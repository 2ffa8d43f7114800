// Dense LoRA on CUDA against the CPU reference: fresh random pools and batches, poisoned
// workspaces, M = 1..257, f32 and bf16 outputs, base tokens bit-identical.
#include <gtest/gtest.h>

#include "dense_lora_case.h"
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

INSTANTIATE_TEST_SUITE_P(Tokens, DenseLoraGpu, ::testing::Values(1, 7, 64, 257));

}  // namespace
}  // namespace moelora
