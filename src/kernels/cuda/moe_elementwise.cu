// CUDA activation (silu(gate) * up, f32 -> bf16) and the top-k reduction (+ shared expert).
// Both are bandwidth-trivial; they use 16-byte loads when the row length allows.
#include <cuda_bf16.h>

#include "kernels/cuda/moe_ops_launch.h"
#include "kernels/cuda/moe_silu.cuh"
#include "kernels/cuda/pdl_launch.cuh"

namespace moelora::cuda::detail {

constexpr int kActThreads = 128;
constexpr int kReduceThreads = 256;

// One CTA row per (slot, chunk of kVec * kActThreads columns); slots routed nowhere are skipped.
template <int kVec>
__global__ void __launch_bounds__(kActThreads)
    moe_activation_kernel(const float* __restrict__ h, const int32_t* __restrict__ ids, int inter,
                          __nv_bfloat16* __restrict__ a) {
  pdl_wait();
  pdl_trigger();
  const int64_t s = blockIdx.x;
  if (ids[s] < 0) return;
  const int col = (blockIdx.y * kActThreads + threadIdx.x) * kVec;
  if (col >= inter) return;
  const float* hg = h + s * 2 * inter + col;
  const float* hu = hg + inter;
  __nv_bfloat16* out = a + s * inter + col;
  if constexpr (kVec == 4) {
    const float4 g = *reinterpret_cast<const float4*>(hg);
    const float4 u = *reinterpret_cast<const float4*>(hu);
    __nv_bfloat162 lo = __floats2bfloat162_rn(silu_mul(g.x, u.x), silu_mul(g.y, u.y));
    __nv_bfloat162 hi = __floats2bfloat162_rn(silu_mul(g.z, u.z), silu_mul(g.w, u.w));
    uint2 packed;
    packed.x = *reinterpret_cast<uint32_t*>(&lo);
    packed.y = *reinterpret_cast<uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(out) = packed;
  } else {
    *out = __float2bfloat16_rn(silu_mul(*hg, *hu));
  }
}

template <int kVec>
__global__ void __launch_bounds__(kReduceThreads)
    moe_reduce_kernel(const float* __restrict__ o, const int32_t* __restrict__ ids, int top_k,
                      int hidden, const float* __restrict__ shared_o,
                      const float* __restrict__ gate_logits, __nv_bfloat16* __restrict__ y) {
  pdl_wait();
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int col = (blockIdx.y * kReduceThreads + threadIdx.x) * kVec;
  if (col >= hidden) return;
  float acc[kVec] = {};
  for (int j = 0; j < top_k; ++j) {
    if (ids[t * top_k + j] < 0) continue;
    const float* row = o + (t * top_k + j) * hidden + col;
    if constexpr (kVec == 4) {
      const float4 v = *reinterpret_cast<const float4*>(row);
      acc[0] += v.x, acc[1] += v.y, acc[2] += v.z, acc[3] += v.w;
    } else {
      acc[0] += *row;
    }
  }
  if (shared_o) {
    const float gate = gate_logits ? 1.0f / (1.0f + expf(-gate_logits[t])) : 1.0f;
    const float* row = shared_o + t * hidden + col;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] += gate * row[i];
  }
  __nv_bfloat16* out = y + t * hidden + col;
  if constexpr (kVec == 4) {
    __nv_bfloat162 lo = __floats2bfloat162_rn(acc[0], acc[1]);
    __nv_bfloat162 hi = __floats2bfloat162_rn(acc[2], acc[3]);
    uint2 packed;
    packed.x = *reinterpret_cast<uint32_t*>(&lo);
    packed.y = *reinterpret_cast<uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(out) = packed;
  } else {
    *out = __float2bfloat16_rn(acc[0]);
  }
}

cudaError_t launch_moe_activation(const float* h, const int32_t* ids, int64_t slots, int inter,
                                  void* out, cudaStream_t stream) {
  auto* a = static_cast<__nv_bfloat16*>(out);
  if (inter % 4 == 0) {
    const dim3 grid(unsigned(slots), unsigned((inter / 4 + kActThreads - 1) / kActThreads));
    return launch_pdl(moe_activation_kernel<4>, grid, dim3(kActThreads), 0, stream, h, ids, inter, a);
  } else {
    const dim3 grid(unsigned(slots), unsigned((inter + kActThreads - 1) / kActThreads));
    return launch_pdl(moe_activation_kernel<1>, grid, dim3(kActThreads), 0, stream, h, ids, inter, a);
  }
}

cudaError_t launch_moe_reduce(const float* o, const int32_t* ids, int64_t m, int top_k,
                              int hidden, const float* shared_o, const float* gate_logits,
                              void* out, cudaStream_t stream) {
  auto* y = static_cast<__nv_bfloat16*>(out);
  if (hidden % 4 == 0) {
    const dim3 grid(unsigned(m), unsigned((hidden / 4 + kReduceThreads - 1) / kReduceThreads));
    return launch_pdl(moe_reduce_kernel<4>, grid, dim3(kReduceThreads), 0, stream, o, ids, top_k,
                      hidden, shared_o, gate_logits, y);
  } else {
    const dim3 grid(unsigned(m), unsigned((hidden + kReduceThreads - 1) / kReduceThreads));
    return launch_pdl(moe_reduce_kernel<1>, grid, dim3(kReduceThreads), 0, stream, o, ids, top_k,
                      hidden, shared_o, gate_logits, y);
  }
}

}  // namespace moelora::cuda::detail
