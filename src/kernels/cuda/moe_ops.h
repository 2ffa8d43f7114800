// CUDA MoE ops (host-callable, no CUDA headers): same signatures as kernels/cpu/moe_ops.h.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/moe/types.h"

namespace moelora::cuda {
#include "kernels/moe_ops.inc"
}  // namespace moelora::cuda
