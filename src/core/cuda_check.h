// Checking CUDA runtime calls (internal header; only compiled with CUDA).
#pragma once

#include <cuda_runtime_api.h>

#include "moelora/core/error.h"

#define MOELORA_CUDA_CHECK(expr)                                                        \
  do {                                                                                  \
    cudaError_t moelora_err_ = (expr);                                                  \
    if (moelora_err_ != cudaSuccess)                                                    \
      MOELORA_THROW("CUDA error {} ({}) in {}", cudaGetErrorName(moelora_err_),          \
                    cudaGetErrorString(moelora_err_), #expr);                           \
  } while (0)

// After a kernel launch: launch-configuration errors surface here.
#define MOELORA_CUDA_CHECK_LAUNCH() MOELORA_CUDA_CHECK(cudaGetLastError())
