// Launcher of the int4 / int8 expert GEMMs of cuda_wna16 (layer 2 of 3): raw pointers and
// sizes in, cudaError_t out. Included by nvcc and host compilers alike (no fmt, no Tensor).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace moelora::cuda {

// out[s, n] = scale(s) * sum_k act[s / rows_div, perm(k)] * w[g, n, k] for each aligned slot
// s of group g, w being the packed stack of quant/experts_wna16.cpp (dequantized in registers).
struct MoeGemmWna16Args {
  const void* act;              // bf16 [num_slots / rows_div, k]
  const void* w;                // packed tiles i32 [G, np / 16, k_tiles, 128]
  const float* scales;          // f32 [G, num_groups_k, np]
  const float* zeros;           // f32 [G, num_groups_k, np], or nullptr (symmetric)
  const int32_t* perm;          // i32 [G, k] act-order, or nullptr
  float* out;                   // f32 [num_slots, n]
  const float* slot_scale;      // f32 [num_slots], or nullptr for 1
  const int32_t* sorted_slots;  // plan.sorted_slots; padding entries == num_slots
  const int32_t* block_group;   // plan.block_group; -1 past the end
  const int32_t* num_padded;    // i32 [1], read on the device
  int num_slots;
  int rows_div;
  int block_m;  // 1..128
  int n;        // logical output rows
  int k;        // logical reduction length (multiple of 8)
  int np;       // packed (padded) rows: a multiple of 16
  int k_tiles;  // packed K tiles per row tile
  int bits;     // 4 or 8
  int group_k;  // 32, 64, 128, or k (one group: per-channel)
  int num_groups_k;
  bool pdl = true;
  bool plan_ready = false;         // as MoeGemmArgs::plan_ready
  bool row_tiles_fastest = false;  // as MoeGemmArgs::row_tiles_fastest
  // Fused activation (gemm1): act_out[s, c] = bf16(silu(gate) * up), as MoeGemmArgs. n / 2
  // must be a multiple of 16 (gate and up rows then start on tile boundaries).
  void* act_out = nullptr;
};

// Launches over `max_blocks` aligned blocks (blocks past *num_padded exit). `rows` (the bf16
// heuristic's row tile) must be 128 for block_m > 32; the tile below is the launcher's own.
cudaError_t launch_moe_gemm_wna16(const MoeGemmWna16Args& args, int max_blocks, int rows,
                                  cudaStream_t stream);

}  // namespace moelora::cuda
