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

// K slices for an inline seam of `num_slots` slots over `num_experts` experts, reduction
// length K, `parts` CTAs per plan block before the K split (halves x column splits): enough
// CTAs for about two per SM while the batch touches few experts (batch 1-8: each LoRA CTA is
// a chain of round trips that must end within the GEMM), 1 once the blocks alone fill the
// GPU; at most 8, and at least 8 chunks of 32 of K per slice.
int inline_lora_k_splits(int64_t num_slots, int64_t num_experts, int64_t K, int parts, int sms);

// Streaming multiprocessors of the current CUDA device.
int current_sm_count();

}  // namespace moelora::cuda
