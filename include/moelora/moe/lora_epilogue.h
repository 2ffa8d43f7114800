// The LoRA of one expert seam as a backend adds it in its GEMM epilogue (the fast LoRA path,
// issue 5): what the hooks hand the backend. Device tensors; see
// src/kernels/cuda/moe_lora_epilogue.h for the math.
#pragma once

#include "moelora/core/tensor.h"

namespace moelora {

struct MoeLoraEpilogue {
  Tensor token_slot;  // i32 [M]: adapter slot per token, -1 = base
  Tensor u;           // f32 [splits * M*k, ldu]: the shrink's K-split partials (complete)
  int splits = 1;
  Tensor b;           // bf16 [S, E, N, r_max]: the pool's B of this seam (b13 or b2)
  Tensor meta;        // i32 [S, 6]: MoeLoraSlotMeta per slot
};

}  // namespace moelora
