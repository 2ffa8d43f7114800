// Launchers of the CUDA dense LoRA kernels (layer 2 of 3): raw pointers in, cudaError_t out.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace moelora::cuda {

struct DenseLoraArgs {
  const void* x;              // bf16 [M, K] (shrink)
  const void* a;              // bf16 [S, slices, R, K]
  const void* b;              // bf16 [S, N, R]
  const int32_t* token_slot;  // [M], -1 = base
  const int32_t* ranks;       // [S, slices]
  float* u;                   // f32 [M, slices * R]
  void* y;                    // f32 or bf16 [M, N] (expand)
  bool y_bf16 = false;
  int64_t m = 0, k = 0, n = 0;
  int slots = 0, slices = 0, r = 0;
  int64_t offset[5] = {};  // slice column offsets (slices + 1 used)
  // launch_dense_lora_expand_out: y' = y_src + the delta (tokens with an adapter; token_slot
  // may be null: no LoRA) goes to split[s] [M, width_s] (slice s's columns; split mode) or
  // is added to residual [M, N] (residual mode), y_src left as it is. f32 throughout.
  const float* y_src = nullptr;
  float* split[4] = {};
  float* residual = nullptr;
};

cudaError_t launch_dense_lora_shrink(const DenseLoraArgs& args, cudaStream_t stream);
cudaError_t launch_dense_lora_expand(const DenseLoraArgs& args, cudaStream_t stream);
cudaError_t launch_dense_lora_expand_out(const DenseLoraArgs& args, cudaStream_t stream);

}  // namespace moelora::cuda
