// CUDA activation (silu(gate) * up, f32 -> bf16) and the top-k reduction (+ shared expert).
// Both are bandwidth-trivial; they use 16-byte loads when the row length allows.
#include <cuda_bf16.h>

#include "kernels/cuda/moe_ops_launch.h"
#include "kernels/cuda/moe_silu.cuh"
#include "kernels/cuda/pdl_launch.cuh"

namespace moelora::cuda::detail {

constexpr int kActThreads = 128;
constexpr int kReduceThreads = 256;

__device__ __forceinline__ bool has_delta(const LoraDeltaView& dl, int64_t slot, int expert) {
  if (dl.d == nullptr) return false;
  const int ts = dl.token_slot[slot / dl.top_k];
  return ts >= 0 && ts < dl.num_lora_slots && expert >= 0 && expert < dl.num_experts;
}

template <int kVec>
__device__ __forceinline__ void add_row(const float* d, float (&v)[kVec]) {
  if constexpr (kVec == 4) {
    const float4 x = *reinterpret_cast<const float4*>(d);
    v[0] += x.x, v[1] += x.y, v[2] += x.z, v[3] += x.w;
  } else {
    v[0] += *d;
  }
}

// v += the delta at element offset `at` (its partials summed in order first; one partial:
// exactly v += d[at]).
template <int kVec>
__device__ __forceinline__ void add_delta(const LoraDeltaView& dl, int64_t at, float (&v)[kVec]) {
  if (dl.splits <= 1) {
    add_row<kVec>(dl.d + at, v);
    return;
  }
  float t[kVec] = {};
  add_row<kVec>(dl.d + at, t);
  for (int sp = 1; sp < dl.splits; ++sp) add_row<kVec>(dl.d + sp * dl.split_stride + at, t);
#pragma unroll
  for (int i = 0; i < kVec; ++i) v[i] += t[i];
}

// One CTA row per (slot, chunk of kVec * kActThreads columns); slots routed nowhere are skipped.
template <int kVec>
__global__ void __launch_bounds__(kActThreads)
    moe_activation_kernel(const float* __restrict__ h, const int32_t* __restrict__ ids, int inter,
                          __nv_bfloat16* __restrict__ a, const LoraDeltaView dl) {
  pdl_wait();
  pdl_trigger();
  const int64_t s = blockIdx.x;
  const int e = ids[s];
  if (e < 0) return;
  const int col = (blockIdx.y * kActThreads + threadIdx.x) * kVec;
  if (col >= inter) return;
  const float* hg = h + s * 2 * inter + col;
  const float* hu = hg + inter;
  __nv_bfloat16* out = a + s * inter + col;
  float g[kVec], u[kVec];
  if constexpr (kVec == 4) {
    const float4 g4 = *reinterpret_cast<const float4*>(hg);
    const float4 u4 = *reinterpret_cast<const float4*>(hu);
    g[0] = g4.x, g[1] = g4.y, g[2] = g4.z, g[3] = g4.w;
    u[0] = u4.x, u[1] = u4.y, u[2] = u4.z, u[3] = u4.w;
  } else {
    g[0] = *hg, u[0] = *hu;
  }
  if (has_delta(dl, s, e)) {
    add_delta<kVec>(dl, s * 2 * inter + col, g);
    add_delta<kVec>(dl, s * 2 * inter + inter + col, u);
  }
  if constexpr (kVec == 4) {
    __nv_bfloat162 lo = __floats2bfloat162_rn(silu_mul(g[0], u[0]), silu_mul(g[1], u[1]));
    __nv_bfloat162 hi = __floats2bfloat162_rn(silu_mul(g[2], u[2]), silu_mul(g[3], u[3]));
    uint2 packed;
    packed.x = *reinterpret_cast<uint32_t*>(&lo);
    packed.y = *reinterpret_cast<uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(out) = packed;
  } else {
    *out = __float2bfloat16_rn(silu_mul(g[0], u[0]));
  }
}

template <int kVec>
__global__ void __launch_bounds__(kReduceThreads)
    moe_reduce_kernel(const float* __restrict__ o, const int32_t* __restrict__ ids, int top_k,
                      int hidden, const float* __restrict__ shared_o,
                      const float* __restrict__ gate_logits, __nv_bfloat16* __restrict__ y,
                      const LoraDeltaView dl) {
  pdl_wait();
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int col = (blockIdx.y * kReduceThreads + threadIdx.x) * kVec;
  if (col >= hidden) return;
  float acc[kVec] = {};
  for (int j = 0; j < top_k; ++j) {
    const int64_t slot = t * top_k + j;
    const int e = ids[slot];
    if (e < 0) continue;
    float v[kVec] = {};
    add_row<kVec>(o + slot * hidden + col, v);
    // The slot's LoRA delta joins its row before the sum (as the hooks' expand into o does).
    if (has_delta(dl, slot, e)) add_delta<kVec>(dl, slot * hidden + col, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] += v[i];
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
                                  void* out, cudaStream_t stream, LoraDeltaView delta) {
  auto* a = static_cast<__nv_bfloat16*>(out);
  if (inter % 4 == 0) {
    const dim3 grid(unsigned(slots), unsigned((inter / 4 + kActThreads - 1) / kActThreads));
    return launch_pdl(moe_activation_kernel<4>, grid, dim3(kActThreads), 0, stream, h, ids, inter,
                      a, delta);
  } else {
    const dim3 grid(unsigned(slots), unsigned((inter + kActThreads - 1) / kActThreads));
    return launch_pdl(moe_activation_kernel<1>, grid, dim3(kActThreads), 0, stream, h, ids, inter,
                      a, delta);
  }
}

cudaError_t launch_moe_reduce(const float* o, const int32_t* ids, int64_t m, int top_k, int hidden,
                              const float* shared_o, const float* gate_logits, void* out,
                              cudaStream_t stream, LoraDeltaView delta) {
  auto* y = static_cast<__nv_bfloat16*>(out);
  if (hidden % 4 == 0) {
    const dim3 grid(unsigned(m), unsigned((hidden / 4 + kReduceThreads - 1) / kReduceThreads));
    return launch_pdl(moe_reduce_kernel<4>, grid, dim3(kReduceThreads), 0, stream, o, ids, top_k,
                      hidden, shared_o, gate_logits, y, delta);
  } else {
    const dim3 grid(unsigned(m), unsigned((hidden + kReduceThreads - 1) / kReduceThreads));
    return launch_pdl(moe_reduce_kernel<1>, grid, dim3(kReduceThreads), 0, stream, o, ids, top_k,
                      hidden, shared_o, gate_logits, y, delta);
  }
}

}  // namespace moelora::cuda::detail
