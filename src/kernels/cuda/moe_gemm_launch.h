// Launcher of the CUDA expert GEMMs (layer 2 of 3): raw pointers and sizes in, cudaError_t
// out. Included by nvcc and host compilers alike, so it pulls in no fmt and no Tensor.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace moelora::cuda {

// LoRA added to the product in the GEMM's epilogue (the fast path's fused expands). For an
// aligned slot s of expert g whose token's adapter a = token_slot[s / top_k] is in
// [0, num_adapters), output row i gets
//   acc[s, i] + sum_{r < rank(i)} B[a, g, i, r] * (sum_{p < splits} u_p[s, col(i) + r])
// before the activation (gate_up) or before the routed-weight scale (down). gate_up: rows of
// the gate half use (gate_rank, gate_col), the up half (up_rank, up_col); down: (down_rank, 0)
// (MoeLoraSlotMeta). token_slot == nullptr: no LoRA (the kernel without this epilogue).
struct MoeGemmLoraArgs {
  const int32_t* token_slot = nullptr;  // i32 [num_slots / top_k]; -1 (or >= S) = base
  int top_k = 1;
  int num_adapters = 0;       // S, the pool's slots
  const float* u = nullptr;   // f32 [splits][num_slots, ldu]: the shrink's K-split partials
  int ldu = 0;
  int splits = 1;             // 1..kMaxLoraEpilogueSplits
  int64_t split_stride = 0;   // elements between partials
  const void* b = nullptr;    // bf16 [S, G, n, r_max]: B of this GEMM's output rows
  int num_experts = 0;        // G (the plan's groups are experts)
  int r_max = 0;              // multiple of 8 (16-byte B loads)
  const int32_t* meta = nullptr;  // i32 [S, 6] (MoeLoraSlotMeta)
  bool gate_up = false;
};

inline constexpr int kMaxLoraEpilogueSplits = 8;

// out[s, n] = scale(s) * sum_k act[s / rows_div, k] * w[g, n, k] for each aligned slot s of
// group g (see moe_gemm1 / moe_gemm2 in kernels/moe_ops.inc).
struct MoeGemmArgs {
  const void* act;              // bf16 [num_slots / rows_div, k]
  const void* w;                // bf16 [G, n, k]
  float* out;                   // f32 [num_slots, n]
  const float* slot_scale;      // f32 [num_slots], or nullptr for 1
  const int32_t* sorted_slots;  // i32 plan.sorted_slots; padding entries == num_slots
  const int32_t* block_group;   // i32 plan.block_group; -1 past the end
  const int32_t* num_padded;    // i32 [1], read on the device
  int num_slots;
  int rows_div;
  int block_m;  // 1..128
  int n;
  int k;  // multiple of 8
  // Launch with programmatic stream serialization (the kernel waits on its predecessor with
  // griddepcontrol.wait either way, so this is always safe).
  bool pdl = true;
  // The plan (sorted_slots, block_group, num_padded) was complete before the predecessor
  // kernel started, so the weight stream may begin before griddepcontrol.wait. True for
  // gemm2 in the MoE layer, where align is 2+ kernels back and every kernel in between waits
  // before it triggers (as all moelora kernels do). Never for a GEMM right after align.
  bool plan_ready = false;
  // Fused activation (gemm1 with no LoRA seam after it): when set, `out` is not written and
  // instead act_out[s, c] = bf16(silu(gate) * up) with gate = column c and up = column
  // n/2 + c of the product, the same float operations as moe_activation (bit-identical).
  // Each CTA then owns matching gate and up rows. n must be even; slot_scale must be null.
  void* act_out = nullptr;  // bf16 [num_slots, n / 2]
  // Grid order: x = row tiles and y = blocks (every CTA of one block dispatched together, the
  // worst case's empty blocks last), or x = blocks and y = row tiles (empty blocks interleaved).
  bool row_tiles_fastest = false;
  // Optional LoRA epilogue (above); with it the fused activation and the scaled output both
  // go through the shared-memory tile, base tokens' values unchanged bit for bit.
  MoeGemmLoraArgs lora{};
};

// Launches over `max_blocks` aligned blocks (the worst case; blocks past *num_padded exit)
// with `rows` weight rows per CTA (32, 64 or 128); at most 65535 of whichever of blocks and
// row tiles is on the grid's y axis.
cudaError_t launch_moe_gemm(const MoeGemmArgs& args, int max_blocks, int rows,
                            cudaStream_t stream);
// Dynamic shared memory launch_moe_gemm would use for `args` with `rows` weight rows per CTA
// (the LoRA epilogue stages u, so it depends on args.lora.ldu), or -1 for a tile it has not.
int moe_gemm_smem_bytes(const MoeGemmArgs& args, int rows);

}  // namespace moelora::cuda
