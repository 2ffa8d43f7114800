// CUDA DeepSeek step ops (host-callable, no CUDA headers): same signatures and argument checks
// (kernels/mla_checks.h) as kernels/cpu/mla_step_ops.h. Kernels in mla_ops_step.cu.
// grouped_router_margin: E <= 512 and n_group <= 64.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"
#include "moelora/moe/config.h"

namespace moelora::cuda {
#include "kernels/mla_step_ops.inc"
}  // namespace moelora::cuda
