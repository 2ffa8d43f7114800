#include "moelora/core/graph.h"

#include <utility>

#include "moelora/core/error.h"

#ifdef MOELORA_WITH_CUDA
#include "core/cuda_check.h"
#endif

namespace moelora {

#ifdef MOELORA_WITH_CUDA
CudaGraph CudaGraph::capture(const Stream& stream, const std::function<void()>& body) {
  MOELORA_CHECK(stream.device().is_cuda() && stream.handle() != nullptr,
                "CudaGraph::capture needs a created CUDA stream, found {}", stream.device().str());
  auto s = static_cast<cudaStream_t>(stream.handle());
  MOELORA_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  try {
    body();
  } catch (...) {
    cudaGraph_t broken = nullptr;
    cudaStreamEndCapture(s, &broken);
    if (broken) cudaGraphDestroy(broken);
    (void)cudaGetLastError();
    throw;
  }
  cudaGraph_t g = nullptr;
  MOELORA_CUDA_CHECK(cudaStreamEndCapture(s, &g));
  CudaGraph out;
  out.graph_ = g;
  cudaGraphExec_t exec = nullptr;
  // Per-node priorities: kernels captured from a high-priority stream keep their priority in
  // the replay (without the flag every node runs at the priority of the replay's stream).
  MOELORA_CUDA_CHECK(cudaGraphInstantiate(&exec, g, cudaGraphInstantiateFlagUseNodePriority));
  out.exec_ = exec;
  return out;
}

CudaGraph::~CudaGraph() {
  if (exec_) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
  if (graph_) cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
}

void CudaGraph::replay(const Stream& stream) const {
  MOELORA_CHECK(exec_ != nullptr, "CudaGraph::replay on an empty graph");
  MOELORA_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_),
                                     static_cast<cudaStream_t>(stream.handle())));
}

DeviceInfo device_info(Device device) {
  DeviceInfo info;
  if (device.is_cpu()) {
    info.name = "cpu";
    return info;
  }
  cudaDeviceProp p{};
  MOELORA_CUDA_CHECK(cudaGetDeviceProperties(&p, device.index));
  info.name = p.name;
  info.sm_count = p.multiProcessorCount;
  info.l2_bytes = size_t(p.l2CacheSize);
  info.memory_bytes = p.totalGlobalMem;
  info.cc_major = p.major;
  info.cc_minor = p.minor;
  return info;
}
#else
CudaGraph CudaGraph::capture(const Stream&, const std::function<void()>&) {
  MOELORA_THROW("CUDA graphs need CUDA, but moelora was built without it");
}
CudaGraph::~CudaGraph() = default;
void CudaGraph::replay(const Stream&) const {
  MOELORA_THROW("CUDA graphs need CUDA, but moelora was built without it");
}
DeviceInfo device_info(Device device) {
  MOELORA_CHECK(device.is_cpu(), "device {} needs CUDA, but moelora was built without it",
                device.str());
  DeviceInfo info;
  info.name = "cpu";
  return info;
}
#endif

CudaGraph::CudaGraph(CudaGraph&& o) noexcept
    : graph_(std::exchange(o.graph_, nullptr)), exec_(std::exchange(o.exec_, nullptr)) {}

CudaGraph& CudaGraph::operator=(CudaGraph&& o) noexcept {
  if (this != &o) {
    CudaGraph tmp(std::move(*this));
    graph_ = std::exchange(o.graph_, nullptr);
    exec_ = std::exchange(o.exec_, nullptr);
  }
  return *this;
}

}  // namespace moelora
