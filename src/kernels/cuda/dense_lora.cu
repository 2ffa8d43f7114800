// Device code and launchers of the dense LoRA ops (kernels/dense_lora_ops.inc). Decode-sized
// batches: one CTA per (token, slice) for the shrink, its 8 warps splitting K and every thread
// keeping 16 rank rows' loads in flight (the shrink reads 16 x K bf16 of A per token: a warp
// per row, one row after the other, left it latency-bound at 15-25 us for K = 2048-4096; the
// partial sums are reduced in a fixed order, so results are deterministic); one CTA per
// (token, 128 output columns) for the expand (the token's u row staged in shared memory, B
// read 8 ranks per 16-byte load). Tokens of the same adapter re-read A and B from L2. Base
// tokens (slot -1) and slices a slot does not target exit at once.
#include <cuda_bf16.h>

#include "kernels/cuda/dense_lora_launch.h"
#include "kernels/cuda/pdl_launch.cuh"

namespace moelora::cuda {
namespace {

using detail::pdl_trigger;
using detail::pdl_wait;

constexpr int kShrinkThreads = 256, kShrinkRows = 16;
constexpr int kExpandThreads = 128;

__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&b);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = __bfloat1622float2(pa[i]), fb = __bfloat1622float2(pb[i]);
    acc = fmaf(fa.x, fb.x, acc);
    acc = fmaf(fa.y, fb.y, acc);
  }
  return acc;
}

__global__ void __launch_bounds__(kShrinkThreads) dense_lora_shrink_kernel(const DenseLoraArgs p) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  __shared__ float part[kShrinkThreads / 32][kShrinkRows];
  const int64_t t = blockIdx.x;
  const int s = blockIdx.y;
  const int slot = p.token_slot[t];
  if (slot < 0) return;
  const int rank = p.ranks[slot * p.slices + s];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint4* x = reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.x) + t * p.k);
  const __nv_bfloat16* a0 =
      static_cast<const __nv_bfloat16*>(p.a) + (int64_t(slot) * p.slices + s) * p.r * p.k;
  const int64_t chunks = p.k / 8;
  for (int r0 = 0; r0 < rank; r0 += kShrinkRows) {
    const int rows = min(kShrinkRows, rank - r0);
    float acc[kShrinkRows] = {};
    for (int64_t c = threadIdx.x; c < chunks; c += kShrinkThreads) {
      const uint4 xv = __ldg(x + c);
      uint4 av[kShrinkRows];
#pragma unroll
      for (int j = 0; j < kShrinkRows; ++j)
        if (j < rows) av[j] = __ldg(reinterpret_cast<const uint4*>(a0 + (r0 + j) * p.k) + c);
#pragma unroll
      for (int j = 0; j < kShrinkRows; ++j)
        if (j < rows) acc[j] += dot8(xv, av[j]);
    }
#pragma unroll
    for (int j = 0; j < kShrinkRows; ++j) {
      float v = acc[j];
#pragma unroll
      for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) part[warp][j] = v;
    }
    __syncthreads();
    if (threadIdx.x < rows) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kShrinkThreads / 32; ++w) v += part[w][threadIdx.x];
      p.u[t * p.slices * p.r + s * p.r + r0 + threadIdx.x] = v;
    }
    __syncthreads();
  }
}

// B row b (rank values of one output column) . staged u, ranks [0, rank): the expand's sum,
// in the same order wherever it is used (so folded expands give the in-place expand's bits).
__device__ __forceinline__ float dense_lora_dot(const __nv_bfloat16* b, const float* u, int rank,
                                                int r) {
  float acc = 0.f;
  if (r % 8 == 0) {
    for (int r0 = 0; r0 < rank; r0 += 8) {
      const uint4 bv = __ldg(reinterpret_cast<const uint4*>(b + r0));
      const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&bv);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(pb[i]);
        acc = fmaf(f.x, u[r0 + 2 * i], acc);
        acc = fmaf(f.y, u[r0 + 2 * i + 1], acc);
      }
    }
  } else {
    for (int q = 0; q < rank; ++q) acc = fmaf(__bfloat162float(b[q]), u[q], acc);
  }
  return acc;
}

// The token's u row staged in shared memory, zero above each slice's rank (the 8-wide steps
// past the rank then add exact zeros).
__device__ __forceinline__ void dense_lora_stage_u(const DenseLoraArgs& p, int64_t t, int slot,
                                                   float* u_row) {
  const int width = p.slices * p.r;
  for (int i = threadIdx.x; i < width; i += kExpandThreads) {
    const int s = i / p.r;
    u_row[i] = (i % p.r) < p.ranks[slot * p.slices + s] ? p.u[t * width + i] : 0.f;
  }
}

__device__ __forceinline__ int dense_lora_slice(const DenseLoraArgs& p, int64_t n) {
  int s = 0;
  while (s + 1 < p.slices && n >= p.offset[s + 1]) ++s;
  return s;
}

__global__ void __launch_bounds__(kExpandThreads) dense_lora_expand_kernel(const DenseLoraArgs p) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  extern __shared__ float u_row[];  // [slices * R]
  const int64_t t = blockIdx.x;
  const int slot = p.token_slot[t];
  if (slot < 0) return;
  dense_lora_stage_u(p, t, slot, u_row);
  __syncthreads();
  const int64_t n = int64_t(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (n >= p.n) return;
  const int s = dense_lora_slice(p, n);
  const int rank = p.ranks[slot * p.slices + s];
  if (rank == 0) return;
  const __nv_bfloat16* b = static_cast<const __nv_bfloat16*>(p.b) + (int64_t(slot) * p.n + n) * p.r;
  const float acc = dense_lora_dot(b, u_row + s * p.r, rank, p.r);
  if (p.y_bf16) {
    __nv_bfloat16* y = static_cast<__nv_bfloat16*>(p.y) + t * p.n + n;
    *y = __float2bfloat16_rn(__bfloat162float(*y) + acc);
  } else {
    static_cast<float*>(p.y)[t * p.n + n] += acc;
  }
}

// The expand folded into the pass that consumes y (every token, adapter or not): y' = y + delta
// exactly as dense_lora_expand leaves y, then split into the slices' buffers or added to the
// residual stream, so the fast decode path spends no kernel of its own on the expand.
__global__ void __launch_bounds__(kExpandThreads)
    dense_lora_expand_out_kernel(const DenseLoraArgs p) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ float u_row[];  // [slices * R]
  const int64_t t = blockIdx.x;
  const int slot = p.token_slot ? p.token_slot[t] : -1;
  if (slot >= 0) dense_lora_stage_u(p, t, slot, u_row);
  __syncthreads();
  const int64_t n = int64_t(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (n >= p.n) return;
  const int s = dense_lora_slice(p, n);
  float v = p.y_src[t * p.n + n];
  if (slot >= 0) {
    const int rank = p.ranks[slot * p.slices + s];
    if (rank > 0) {
      const __nv_bfloat16* b =
          static_cast<const __nv_bfloat16*>(p.b) + (int64_t(slot) * p.n + n) * p.r;
      v += dense_lora_dot(b, u_row + s * p.r, rank, p.r);
    }
  }
  if (p.residual) {
    p.residual[t * p.n + n] += v;
  } else {
    const int64_t w = p.offset[s + 1] - p.offset[s];
    p.split[s][t * w + (n - p.offset[s])] = v;
  }
}

}  // namespace

cudaError_t launch_dense_lora_shrink(const DenseLoraArgs& p, cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  if (p.k % 8 != 0 || p.m > 0x7fffffff || p.slices > 65535) return cudaErrorInvalidValue;
  return detail::launch_pdl(dense_lora_shrink_kernel, dim3(dim3(unsigned(p.m), unsigned(p.slices))),
                            dim3(kShrinkThreads), 0, stream, p);
}

cudaError_t launch_dense_lora_expand(const DenseLoraArgs& p, cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  const int64_t col_tiles = (p.n + kExpandThreads - 1) / kExpandThreads;
  if (col_tiles > 65535 || p.m > 0x7fffffff) return cudaErrorInvalidValue;
  const size_t smem = size_t(p.slices) * p.r * sizeof(float);
  return detail::launch_pdl(dense_lora_expand_kernel,
                            dim3(dim3(unsigned(p.m), unsigned(col_tiles))), dim3(kExpandThreads),
                            smem, stream, p);
}

cudaError_t launch_dense_lora_expand_out(const DenseLoraArgs& p, cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  const int64_t col_tiles = (p.n + kExpandThreads - 1) / kExpandThreads;
  if (col_tiles > 65535 || p.m > 0x7fffffff || (p.token_slot && p.r <= 0))
    return cudaErrorInvalidValue;
  const size_t smem = p.token_slot ? size_t(p.slices) * p.r * sizeof(float) : 0;
  return detail::launch_pdl(dense_lora_expand_out_kernel,
                            dim3(dim3(unsigned(p.m), unsigned(col_tiles))), dim3(kExpandThreads),
                            smem, stream, p);
}

}  // namespace moelora::cuda
