// LoRA of one expert seam that a backend runs inside its expert GEMM's own grid (the inline
// variant of the fast decode path, issue 5): extra CTAs of the GEMM launch compute the seam's
// delta while the others stream the base weights. What the hooks hand the backend; device
// tensors. The math is the hooks' (moelora/lora/moe_lora.h):
//   delta[s] = w(s) . B[a, e] . (A[a, e] . in[s])   for each slot s whose token has adapter a,
// with e the slot's expert, w(s) the routed weight (down) or 1 (gate_up), and the gate and up
// halves of gate_up reading their own rank columns (MoeLoraSlotMeta).
#pragma once

#include "moelora/core/tensor.h"

namespace moelora {

struct MoeLoraInline {
  Tensor token_slot;    // i32 [M]: adapter slot per token, -1 = base
  int top_k = 1;        // slots per token (slot s belongs to token s / top_k)
  Tensor a;             // bf16 [S, E, R, K]: the pool's a13 (R = 2 r_max) or a2 (R = r_max)
  Tensor b;             // bf16 [S, E, N, r_max]: the pool's b13 or b2
  Tensor meta;          // i32 [S, 6]: MoeLoraSlotMeta per slot
  Tensor slot_weights;  // f32 [M*k]: routed weights (down) or undefined (weight 1)
  // f32 [>= M*k, N], or [k_splits, >= M*k, N] to split the shrink's K over k_splits CTAs per
  // part, each writing its partial delta (their sum, in split order, is the delta). Rows of
  // slots with an adapter are written, the others not.
  Tensor delta;
  int column_splits = 1;  // CTAs per (plan block, half) along the seam's output columns
};

// Both seams of one layer call.
struct MoeLoraInlineSeams {
  MoeLoraInline gate_up, down;
};

}  // namespace moelora
