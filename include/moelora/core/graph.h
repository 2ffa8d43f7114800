// CUDA graphs: capture the work a callable enqueues on a stream once, replay it many times.
#pragma once

#include <functional>
#include <string>

#include "moelora/core/stream.h"

namespace moelora {

class CudaGraph {
 public:
  CudaGraph() = default;
  // Captures everything `body` enqueues on `stream` (which must be a CUDA stream other than
  // the legacy default). Allocation or host synchronization inside `body` fails the capture.
  static CudaGraph capture(const Stream& stream, const std::function<void()>& body);
  ~CudaGraph();
  CudaGraph(CudaGraph&& other) noexcept;
  CudaGraph& operator=(CudaGraph&& other) noexcept;
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  void replay(const Stream& stream) const;
  bool valid() const { return exec_ != nullptr; }

 private:
  void* graph_ = nullptr;  // cudaGraph_t
  void* exec_ = nullptr;   // cudaGraphExec_t
};

struct DeviceInfo {
  std::string name;
  int sm_count = 0;
  size_t l2_bytes = 0;
  size_t memory_bytes = 0;
  int cc_major = 0, cc_minor = 0;
};
// Properties of a CUDA device; for the CPU, name "cpu" and zeros.
DeviceInfo device_info(Device device);

}  // namespace moelora
