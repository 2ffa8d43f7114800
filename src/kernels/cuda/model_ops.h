// CUDA model step ops (host-callable, no CUDA headers): same signatures as
// kernels/cpu/model_ops.h. Kernels in dense_ops.cu, ops in dense_ops_op.cpp (they share the
// dense ops' load/store helpers and argument checks).
#pragma once

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"

namespace moelora::cuda {
#include "kernels/model_ops.inc"
}  // namespace moelora::cuda
