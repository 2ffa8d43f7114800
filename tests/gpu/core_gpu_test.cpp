#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "model/ops.h"
#include "moelora/core/allocator.h"
#include "moelora/core/graph.h"
#include "moelora/core/random.h"
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

// A kernel enqueued on a high-priority side stream keeps its priority when captured into a graph
// (the launch helpers tag it; CudaGraph instantiates with per-node priorities), and the graph
// still replays correctly.
TEST(CudaCore, GraphKeepsSideStreamPriority) {
  MOELORA_REQUIRE_GPU();
  int least = 0, greatest = 0;
  ASSERT_EQ(cudaDeviceGetStreamPriorityRange(&least, &greatest), cudaSuccess);
  if (least == greatest) GTEST_SKIP() << "the device has a single stream priority";
  const Device d = Device::cuda();
  Stream main = Stream::create(d);
  Stream side = Stream::create(d, StreamPriority::high);
  int p = 0;
  ASSERT_EQ(cudaStreamGetPriority(static_cast<cudaStream_t>(side.handle()), &p), cudaSuccess);
  EXPECT_EQ(p, greatest);
  Event fork = Event::create(d, false), join = Event::create(d, false);
  std::mt19937_64 rng(test::fresh_seed());
  Tensor xh = test::random_tensor({5, 64}, DType::f32, rng);
  Tensor x = xh.to(d, &main);
  Tensor y_side = Tensor::empty({5, 64}, DType::bf16, d),
         y_main = Tensor::empty({5, 64}, DType::bf16, d);
  auto body = [&] {
    fork.record(main);
    side.wait(fork);
    ops::cast(x, y_side, side);
    join.record(side);
    ops::cast(x, y_main, main);
    main.wait(join);
  };
  // The captured nodes' priorities.
  auto ms = static_cast<cudaStream_t>(main.handle());
  ASSERT_EQ(cudaStreamBeginCapture(ms, cudaStreamCaptureModeGlobal), cudaSuccess);
  body();
  cudaGraph_t g = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(ms, &g), cudaSuccess);
  size_t n = 0;
  ASSERT_EQ(cudaGraphGetNodes(g, nullptr, &n), cudaSuccess);
  std::vector<cudaGraphNode_t> nodes(n);
  ASSERT_EQ(cudaGraphGetNodes(g, nodes.data(), &n), cudaSuccess);
  std::vector<int> priorities;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type;
    ASSERT_EQ(cudaGraphNodeGetType(node, &type), cudaSuccess);
    if (type != cudaGraphNodeTypeKernel) continue;
    cudaLaunchAttributeValue v{};
    ASSERT_EQ(cudaGraphKernelNodeGetAttribute(node, cudaLaunchAttributePriority, &v), cudaSuccess);
    priorities.push_back(v.priority);
  }
  cudaGraphDestroy(g);
  std::sort(priorities.begin(), priorities.end());
  EXPECT_EQ(priorities, (std::vector<int>{greatest, least}));
  // CudaGraph's instantiation (per-node priorities) replays the same work.
  fill_uniform(y_side, 1, -9.0f, -8.0f, main);  // poison
  fill_uniform(y_main, 2, -9.0f, -8.0f, main);
  CudaGraph graph = CudaGraph::capture(main, body);
  graph.replay(main);
  main.synchronize();
  std::vector<float> want = test::to_floats(xh);
  for (float& v : want) v = round_bf16(v);
  EXPECT_EQ(test::to_floats(y_side.to(Device::cpu())), want);
  EXPECT_EQ(test::to_floats(y_main.to(Device::cpu())), want);
}

}  // namespace
}  // namespace moelora
