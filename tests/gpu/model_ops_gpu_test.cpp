// CUDA model step ops (kernels/model_ops.inc) against the CPU reference: fresh random inputs,
// poisoned outputs, f32 and bf16 on both sides, decode- and prefill-sized row counts. All of
// them are copies or exact selections, so the results must match bit for bit.
#include <gtest/gtest.h>

#include "gpu_op_test_util.h"
#include "kernels/cpu/model_ops.h"
#include "kernels/cuda/model_ops.h"

namespace moelora {
namespace {

using test::kPoisonFloat;

std::vector<uint32_t> bits(const Tensor& t) {
  return t.dtype() == DType::f32 ? test::raw_bits32(t) : [&] {
    const std::vector<uint16_t> v = test::raw_bits16(t);
    return std::vector<uint32_t>(v.begin(), v.end());
  }();
}

class ModelOpsGpu : public ::testing::TestWithParam<int64_t> {};

TEST_P(ModelOpsGpu, CastCopyColumnsGatherRowsBitExact) {
  MOELORA_REQUIRE_GPU();
  const int64_t m = GetParam();
  std::mt19937_64 rng(test::fresh_seed());
  const Stream s = Stream::create(Device::cuda());
  const Device g = Device::cuda();
  const int64_t n = 200;  // q 96 | k 48 | v 56: odd widths and offsets on purpose
  for (DType st : {DType::f32, DType::bf16})
    for (DType dt : {DType::f32, DType::bf16}) {
      SCOPED_TRACE(fmt::format("m {} {} -> {}", m, dtype_name(st), dtype_name(dt)));
      const Tensor src = test::random_tensor({m, n}, st, rng, -5, 5);
      const Tensor src_g = test::to_gpu(src);
      // cast
      Tensor c_cpu = Tensor::empty({m, n}, dt), c_gpu = test::poisoned({m, n}, dt, g, kPoisonFloat);
      cpu::cast(src, c_cpu, Stream());
      cuda::cast(src_g, c_gpu, s);
      s.synchronize();
      EXPECT_EQ(bits(c_gpu), bits(c_cpu)) << "cast";
      // copy_columns
      for (auto [col, w] : {std::pair<int64_t, int64_t>{0, 96}, {96, 48}, {144, 56}, {7, 1}}) {
        Tensor a = Tensor::empty({m, w}, dt), b = test::poisoned({m, w}, dt, g, kPoisonFloat);
        cpu::copy_columns(src, col, a, Stream());
        cuda::copy_columns(src_g, col, b, s);
        s.synchronize();
        EXPECT_EQ(bits(b), bits(a)) << "copy_columns " << col << "+" << w;
      }
      // gather_rows: the last row of each of up to m "sequences", plus repeats
      const int64_t rows_n = std::max<int64_t>(1, m / 3);
      const Tensor rows = test::random_ints({rows_n}, rng, 0, int(m) - 1);
      Tensor a = Tensor::empty({rows_n, n}, dt), b = test::poisoned({rows_n, n}, dt, g, kPoisonFloat);
      cpu::gather_rows(src, rows, a, Stream());
      cuda::gather_rows(src_g, test::to_gpu(rows), b, s);
      s.synchronize();
      EXPECT_EQ(bits(b), bits(a)) << "gather_rows";
    }
}

TEST_P(ModelOpsGpu, RouterMarginBitExactWithTies) {
  MOELORA_REQUIRE_GPU();
  const int64_t m = GetParam();
  std::mt19937_64 rng(test::fresh_seed());
  const Stream s = Stream::create(Device::cuda());
  for (auto [e, k] : {std::pair<int64_t, int>{8, 2}, {60, 4}, {128, 8}, {160, 6}, {256, 8},
                      {384, 8}, {1024, 1}, {4, 4}, {2, 3}}) {
    for (bool ties : {false, true}) {
      SCOPED_TRACE(fmt::format("m {} E {} k {} ties {}", m, e, k, ties));
      Tensor lg = test::random_tensor({m, e}, DType::f32, rng, -4, 4);
      if (ties) {  // a few distinct values: equal logits straddle the cut
        std::uniform_int_distribution<int> d(-2, 2);
        for (int64_t i = 0; i < lg.numel(); ++i) lg.data<float>()[i] = 0.25f * float(d(rng));
      }
      const int64_t cols = 3, col = 2;
      Tensor a = Tensor::empty({m, cols}, DType::f32);
      a.fill_bytes(0xFF);
      Tensor b = test::poisoned({m, cols}, DType::f32, Device::cuda(), kPoisonFloat);
      cpu::router_margin(lg, k, a, col, Stream());
      cuda::router_margin(test::to_gpu(lg), k, b, col, s);
      s.synchronize();
      // Column `col` equal bit for bit; the other columns still hold the poison.
      EXPECT_EQ(test::raw_bits32(b), test::raw_bits32(a));
    }
  }
  Tensor lg = test::poisoned({2, 1025}, DType::f32, Device::cuda(), kPoisonFloat);
  Tensor mg = test::poisoned({2, 1}, DType::f32, Device::cuda(), kPoisonFloat);
  test::expect_error([&] { cuda::router_margin(lg, 2, mg, 0, s); }, "1..1024");
}

INSTANTIATE_TEST_SUITE_P(Rows, ModelOpsGpu, ::testing::Values(1, 5, 64, 333));

}  // namespace
}  // namespace moelora
