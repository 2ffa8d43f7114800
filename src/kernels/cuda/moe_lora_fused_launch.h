// Launchers of the fused LoRA activation / reduction (layer 2 of 3; see moe_lora_fused.cu).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace moelora::cuda {

struct MoeLoraFusedArgs {
  const float* in;            // activation: h f32 [n, 2I]; reduce: o f32 [n, H]
  const int32_t* ids;         // [M, k], -1 = not here
  const int32_t* token_slot;  // [M], -1 = base
  const float* u;             // [splits * n, ldu] K-split partial sums of the shrink
  int splits = 1;
  int ldu = 0;                // u row length (gate_up: 2 * r_max; down: r_max)
  const void* b;              // bf16 B pool: [S, E, 2I or H, r_max]
  const int32_t* meta;        // [S, 6] MoeLoraSlotMeta
  int r_max = 0;
  int num_experts = 0;
  int num_slots = 0;          // adapter slots in the pool
  int64_t m = 0;              // tokens
  int top_k = 0;
  int width = 0;              // activation: I; reduce: H
  const float* weights;       // reduce: routed weight per slot [n]
  const float* shared_o;      // reduce: [M, H] or null
  const float* gate_logits;   // reduce: [M] or null
  void* out;                  // bf16: activation a [n, I]; reduce y [M, H]
};

cudaError_t launch_moe_lora_activation(const MoeLoraFusedArgs& args, cudaStream_t stream);
cudaError_t launch_moe_lora_reduce(const MoeLoraFusedArgs& args, cudaStream_t stream);

}  // namespace moelora::cuda
