// CPU reference of the model step ops (kernels/model_ops.inc): casts, column slices, row
// gathers, router margins.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"

namespace moelora::cpu {
#include "kernels/model_ops.inc"
}  // namespace moelora::cpu
