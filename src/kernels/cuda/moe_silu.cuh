// silu(gate) * up in f32, shared by moe_activation and gemm1's fused-activation epilogue so
// the two give bit-identical results (base tokens of a LoRA batch must match a LoRA-off run).
#pragma once

#include <cuda_runtime.h>

namespace moelora::cuda::detail {

// No a*b+c pattern, so no FMA contraction can make the two call sites round differently.
__device__ __forceinline__ float silu_mul(float g, float u) {
  return g / (1.0f + expf(-g)) * u;
}

}  // namespace moelora::cuda::detail
