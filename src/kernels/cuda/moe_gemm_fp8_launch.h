// Launcher of the fp8 block-scale expert GEMMs (layer 2 of 3): raw pointers and sizes in,
// cudaError_t out. Included by nvcc and host compilers alike (no fmt, no Tensor).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace moelora::cuda {

// out[s, n] = scale(s) * sum_kb w_scale(g, n, kb) * x_scale(s, kb) *
//             sum_{k in block kb} e4m3(w)[g, n, k] * e4m3(act / x_scale)[s / rows_div, k]
// with the activation quantized on the fly per row and 128 channels (quantize_fp8_activation).
// Fields as MoeGemmArgs (moe_gemm_launch.h) unless noted.
struct MoeGemmFp8Args {
  const void* act;        // bf16 [num_slots / rows_div, k]
  const uint8_t* w;       // e4m3 codes [G, n, k]
  const float* w_scale;   // f32 [G, parts, part_blocks, k_blocks] (experts_fp8.cpp layout)
  float* out;             // f32 [num_slots, n]
  const float* slot_scale;
  const int32_t* sorted_slots;
  const int32_t* block_group;
  const int32_t* num_padded;
  int num_slots;
  int rows_div;
  int block_m;      // 1..128
  int n;
  int k;            // multiple of 16 (16-byte rows of codes)
  int block_n;      // rows per scale block (any >= 1); the K block is always 128
  int part_rows;    // n / parts: rows of each part's own scale grid
  int part_blocks;  // ceil(part_rows / block_n)
  int k_blocks;     // ceil(k / 128)
  bool pdl = true;
  bool plan_ready = false;
  void* act_out = nullptr;  // fused SiLU(gate) * up, bf16 [num_slots, n / 2]
  bool row_tiles_fastest = false;
};

inline constexpr int kFp8BlockK = 128;  // the only K block the kernels run (= their K tile)

// `rows` weight rows per CTA: 32, 64 or 128.
cudaError_t launch_moe_gemm_fp8(const MoeGemmFp8Args& args, int max_blocks, int rows,
                                cudaStream_t stream);

}  // namespace moelora::cuda
