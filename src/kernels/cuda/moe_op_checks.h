// Argument checks shared by the CUDA MoE ops (internal; host code only).
#pragma once

#include <cuda_runtime_api.h>

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"

namespace moelora::cuda {

inline cudaStream_t raw_stream(const Stream& s) { return static_cast<cudaStream_t>(s.handle()); }

// A contiguous CUDA tensor of `dtype` (shape checked by the caller).
inline void check_cuda_tensor(const Tensor& t, DType dtype, const char* what) {
  MOELORA_CHECK(t.defined(), "{}: expected a tensor, found an undefined one", what);
  MOELORA_CHECK(t.device().is_cuda(), "{}: expected a CUDA tensor, found {}", what, t.describe());
  check_dtype(t, dtype, what);
  check_contiguous(t, what);
}

}  // namespace moelora::cuda
