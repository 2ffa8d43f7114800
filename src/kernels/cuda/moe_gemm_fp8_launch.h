// Launcher of the fp8 block-scale expert GEMMs (layer 2 of 3): raw pointers and sizes in,
// cudaError_t out. Included by nvcc and host compilers alike (no fmt, no Tensor).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/cuda/moe_lora_inline_launch.h"

namespace moelora::cuda {

// out[s, n] = scale(s) * sum_kb w_scale(g, n, kb) * act_scale(r, kb) *
//             sum_{k in block kb} e4m3(w)[g, n, k] * act_q[r, k],   r = s / rows_div,
// with the activation already quantized per row and 128 channels (launch_fp8_quantize_act,
// exactly quant::quantize_fp8_activation). Fields as MoeGemmArgs (moe_gemm_launch.h) unless
// noted.
struct MoeGemmFp8Args {
  const uint8_t* act_q;    // e4m3 codes [num_slots / rows_div, k]
  const float* act_scale;  // f32 [num_slots / rows_div, k_blocks]
  const uint8_t* w;        // e4m3 codes [G, n, k]
  const float* w_scale;    // f32 [G, parts, part_blocks, k_blocks] (experts_fp8.cpp layout)
  float* out;              // f32 [num_slots, n]
  const float* slot_scale;
  const int32_t* sorted_slots;
  const int32_t* block_group;
  const int32_t* num_padded;
  int num_slots;
  int rows_div;
  int block_m;  // 1..128
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
  // LoRA CTAs prepended to the grid (inline_lora.parts > 0; moe_lora_inline_launch.h). The launcher
  // sets lora_blocks (extra entries on the block axis) and lora_units.
  MoeLoraInlineArgs inline_lora{};
  int lora_blocks = 0;
  int lora_units = 0;
};

inline constexpr int kFp8BlockK = 128;  // the only K block the kernels run (= their K tile)

// `rows` weight rows per CTA: 32, 64 or 128.
cudaError_t launch_moe_gemm_fp8(const MoeGemmFp8Args& args, int max_blocks, int rows,
                                cudaStream_t stream);

// q e4m3 [rows, k] and scale f32 [rows, ceil(k / 128)] from bf16 x [rows, k] (k a multiple of
// 16), bit for bit quant::quantize_fp8_activation(x, 128). With `pdl` it may start while its
// predecessor drains, and lets its successor start once every CTA has waited for that
// predecessor (so a successor's plan_ready holds when the plan is older than this kernel).
cudaError_t launch_fp8_quantize_act(const void* x, int rows, int k, uint8_t* q, float* scale,
                                    bool pdl, cudaStream_t stream);

}  // namespace moelora::cuda
