// LoRA of one expert seam run *inside* an expert GEMM's grid (issue 5's inline variant): the
// GEMM launcher prepends CTAs that compute delta = scale . B . (A . in) for the slots of each
// plan block that carry an adapter, while the other CTAs of the same grid stream the base
// weights. Unlike a side stream, whose CTAs get SMs only as the GEMM's retire, these are
// dispatched first and share every SM with the GEMM tiles from the start. Raw pointers only;
// included by nvcc and host compilers alike. Device code: moe_lora_inline.cuh.
#pragma once

#include <cstdint>

namespace moelora::cuda {

struct MoeLoraInlineArgs {
  const void* in = nullptr;  // bf16 [rows, K]: x (gate_up, row = slot / rows_div) or a (down)
  int rows_div = 1;          // the GEMM's: top_k for gate_up, 1 for down
  int K = 0;
  const void* A = nullptr;  // bf16 [S, E, R, K]: the pool's a13 (R = 2 r_max) or a2 (R = r_max)
  int R = 0;
  const void* B = nullptr;  // bf16 [S, E, N, r_max], zero past each slot's rank
  int N = 0;                // 2I (gate rows, then up rows) or H
  int r_max = 0;            // multiple of 8
  int num_experts = 0;
  const int32_t* meta = nullptr;        // [S, 6] MoeLoraSlotMeta
  const int32_t* token_slot = nullptr;  // [M]: adapter slot per token, -1 (or >= S) = base
  int top_k = 1;                        // token of slot s = s / top_k
  int num_lora_slots = 0;
  bool gate_up = false;
  const float* slot_weights = nullptr;  // [n] routed weights (down) or null (1)
  // f32 [k_splits][rows >= n][N]: partial deltas (one per K slice of the shrink; their sum in
  // split order is the delta); rows of slots with an adapter written.
  float* delta = nullptr;
  int k_splits = 1;
  int64_t split_stride = 0;  // elements between partial deltas
  // CTAs per plan block: halves (2 for gate_up: gate, up; 1 for down) * k_splits * column
  // splits. 0 = no LoRA CTAs (the GEMM alone).
  int parts = 0;
};

// Warps per CTA the inline LoRA body can run with (the GEMM tiles' block sizes).
inline constexpr int kInlineMaxWarps = 8;
inline constexpr int kInlineRanks = 32;       // ranks per pass (two MMA row tiles)
inline constexpr int kInlineRows = 16;        // slots per pass (two MMA column tiles)
inline constexpr int kInlineMaxBlockM = 128;  // plan tiles the LoRA CTAs take

// Dynamic shared memory the LoRA CTAs need at `threads` threads and plan tile `block_m`.
inline constexpr int moe_lora_inline_smem(int threads, int block_m) {
  return (threads / 32) * kInlineRanks * kInlineRows * 4  // per-warp partial sums
         + kInlineRanks * kInlineRows * 4                 // summed u
         + 2 * block_m * 4 + kInlineRows * 8 + 16;  // rows' slots, adapters; pass list, weights
}

// LoRA CTAs to prepend for `max_blocks` plan blocks.
inline int64_t moe_lora_inline_units(const MoeLoraInlineArgs& l, int64_t max_blocks) {
  return l.parts > 0 ? max_blocks * l.parts : 0;
}

}  // namespace moelora::cuda
