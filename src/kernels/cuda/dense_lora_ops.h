// CUDA dense LoRA ops (host-callable, no CUDA headers): same signatures as the CPU ones.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/lora/dense_lora.h"

namespace moelora::cuda {
#include "kernels/dense_lora_ops.inc"
}  // namespace moelora::cuda
