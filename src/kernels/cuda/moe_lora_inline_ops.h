// Host side of the inline LoRA CTAs (moe_lora_inline_launch.h): checks a MoeLoraInline against
// the GEMM it rides with and turns it into the launcher's raw arguments. Internal; host only.
#pragma once

#include <cstdint>

#include "kernels/cuda/moe_lora_inline_launch.h"
#include "moelora/core/tensor.h"
#include "moelora/moe/lora_inline.h"

namespace moelora::cuda {

// `in`: the GEMM's bf16 input [rows, K] (x for gate_up, a for down), `rows_div` its rows per
// slot divisor; the GEMM writes `num_slots` slots of `n_out` columns over `num_experts`
// experts. Errors name `op` and the field, expected vs found.
MoeLoraInlineArgs inline_lora_args(const MoeLoraInline& l, bool gate_up, const Tensor& in,
                                   int rows_div, int64_t num_slots, int64_t num_experts,
                                   int64_t n_out, const char* op);

}  // namespace moelora::cuda
