// CPU reference MLA ops (DeepSeek multi-head latent attention): the contract of
// kernels/mla_ops.inc in namespace moelora::cpu.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"

namespace moelora::cpu {
#include "kernels/mla_ops.inc"
}  // namespace moelora::cpu
