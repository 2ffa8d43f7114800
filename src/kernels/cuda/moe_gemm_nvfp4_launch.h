// Launcher of the NVFP4 expert GEMMs (layer 2 of 3): raw pointers and sizes in, cudaError_t
// out. Included by nvcc and host compilers alike (no fmt, no Tensor).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace moelora::cuda {

// out[s, n] = scale(s) * sum_k act[s / rows_div, k] * w[g, n, k] for each aligned slot s of
// group g, w in the packed NVFP4 layout of src/quant/experts_nvfp4.cpp:
// w[g, n, k] = e2m1(code) * e4m3(scale) * gscale[g * gs_group_stride + n * gs_row_stride].
struct MoeGemmNvfp4Args {
  const void* act;            // bf16 [num_slots / rows_div, k]
  const uint8_t* codes;       // packed e2m1 codes [G, np, kp / 2]
  const uint8_t* scales;      // packed e4m3 scales [G, np, kp / 16]
  const float* gscale;        // f32 global scales
  int gs_group_stride;        // 1 (per matrix) or n (per row)
  int gs_row_stride;          // 0 (per matrix) or 1 (per row)
  float* out;                 // f32 [num_slots, n]
  const float* slot_scale;    // f32 [num_slots], or nullptr for 1
  const int32_t* sorted_slots;
  const int32_t* block_group;
  const int32_t* num_padded;  // i32 [1], read on the device
  int num_slots;
  int rows_div;
  int block_m;  // 1..128
  int n;        // logical rows
  int k;        // logical K (multiple of 16)
  int row_tiles16;  // np / 16
  int k_chunks64;   // kp / 64
  bool pdl = true;
  bool plan_ready = false;  // as MoeGemmArgs::plan_ready
  // Fused SiLU(gate) * up epilogue as MoeGemmArgs::act_out; needs n / 2 a multiple of 16.
  void* act_out = nullptr;  // bf16 [num_slots, n / 2]
  bool row_tiles_fastest = false;
  // Weight loads marked L2 evict-first with a 256-byte prefetch (as the bf16 kernel). OFF:
  // on the H100 this kernel's cp.async with the createpolicy operand raised
  // cudaErrorIllegalInstruction in the main-loop refills of some instantiations (2026-11-22,
  // bench/NOTES.md "nvfp4"); the same tiles pass with plain cp.async.cg. Cause not found.
  bool evict_first = false;
  // Narrow token tiles split each 16-row tile's K over 2-4 warps (see the kernel). Measured
  // slower (bench/NOTES.md), so off unless MoeGemmConfig::split_k.
  bool split_k = false;
};

// `rows` weight rows per CTA: 32, 64 or 128.
cudaError_t launch_moe_gemm_nvfp4(const MoeGemmNvfp4Args& args, int max_blocks, int rows,
                                  cudaStream_t stream);

}  // namespace moelora::cuda
