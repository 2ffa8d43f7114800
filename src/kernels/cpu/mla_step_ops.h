// CPU reference DeepSeek step ops: the contract of kernels/mla_step_ops.inc in namespace
// moelora::cpu.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"
#include "moelora/moe/config.h"

namespace moelora::cpu {
#include "kernels/mla_step_ops.inc"
}  // namespace moelora::cpu
