// Element access for activation tensors that are f32 or bf16 by a template flag (internal
// device code of the dense ops and attention kernels): math is always f32.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>

namespace moelora::cuda::act_io {

template <bool kBf16>
__device__ __forceinline__ float load(const void* p, int64_t i) {
  if constexpr (kBf16)
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  else
    return static_cast<const float*>(p)[i];
}

template <bool kBf16>
__device__ __forceinline__ void store(void* p, int64_t i, float v) {
  if constexpr (kBf16)
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else
    static_cast<float*>(p)[i] = v;
}

}  // namespace moelora::cuda::act_io
