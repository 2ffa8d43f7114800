// CPU reference dense ops (embedding, norms, linear, RoPE, paged attention): plain C++ with f32
// accumulation. The model's CPU backend.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"

namespace moelora::cpu {
#include "kernels/dense_ops.inc"
}  // namespace moelora::cpu
