// CPU reference dense LoRA ops (kernels/dense_lora_ops.inc).
#pragma once

#include "moelora/core/stream.h"
#include "moelora/lora/dense_lora.h"

namespace moelora::cpu {
#include "kernels/dense_lora_ops.inc"
}  // namespace moelora::cpu
