// Programmatic dependent launch (Hopper): a kernel launched with launch_pdl may be scheduled
// while its predecessor in the stream still runs; it must call pdl_wait() before touching
// anything the predecessor writes. That hides most of the launch gap between the small
// kernels of a decode step (also inside CUDA graphs). Without the launch attribute, or after
// a predecessor that never triggers, pdl_wait() simply waits for the predecessor to finish.
#pragma once

#include <utility>

#include <cuda_runtime.h>

namespace moelora::cuda::detail {

// Waits until every prerequisite grid has completed and its writes are visible.
__device__ __forceinline__ void pdl_wait() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}
// Lets the next PDL kernel in the stream be scheduled now (it still waits in pdl_wait()).
__device__ __forceinline__ void pdl_trigger() {
  asm volatile("griddepcontrol.launch_dependents;");
}

template <class... KernelArgs, class... Args>
cudaError_t launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // The stream's priority as the kernel's own, so a graph captured from a high-priority side
  // stream keeps it (core/graph.cpp instantiates with per-node priorities).
  int priority = 0;
  if (cudaStreamGetPriority(stream, &priority) == cudaSuccess && priority != 0) {
    attr[1].id = cudaLaunchAttributePriority;
    attr[1].val.priority = priority;
    cfg.numAttrs = 2;
  }
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace moelora::cuda::detail
