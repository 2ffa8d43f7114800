// CPU reference MoE ops: plain C++, f32/f64 accumulation. Also the engine's CPU backend.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/moe/types.h"

namespace moelora::cpu {
#include "kernels/moe_ops.inc"
}  // namespace moelora::cpu
