#include "moelora/core/allocator.h"
#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"
#include "test_util.h"

namespace moelora {
namespace {

TEST(CudaCore, RoundTripAndCachingAllocator) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  Tensor h = test::random_tensor({37, 5}, DType::f32, rng);
  Stream s = Stream::create(Device::cuda());
  Tensor d = h.to(Device::cuda(), &s);
  Tensor back = d.to(Device::cpu(), &s);
  s.synchronize();
  EXPECT_EQ(test::to_floats(back), test::to_floats(h));
  const size_t mallocs = cuda_allocator_stats().num_device_mallocs;
  { Tensor again = Tensor::empty({37, 5}, DType::f32, Device::cuda()); }
  { Tensor again = Tensor::empty({37, 5}, DType::f32, Device::cuda()); }
  EXPECT_LE(cuda_allocator_stats().num_device_mallocs, mallocs + 1);
}

}  // namespace
}  // namespace moelora
