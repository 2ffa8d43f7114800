// CUDA dense ops (host-callable, no CUDA headers): same signatures as kernels/cpu/dense_ops.h.
// Limits of the CUDA versions (the CPU runs any size): linear and attention read 16-byte
// vectors, so K (linear) and head_dim (attention, <= 256) must be multiples of 8.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"

namespace moelora::cuda {
#include "kernels/dense_ops.inc"
}  // namespace moelora::cuda
