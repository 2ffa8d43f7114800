// CUDA token alignment kernels (single CTA, stable counting sort; see moe_align.cuh) and the
// fused variants that save a launch on the decode path: routing + alignment in one kernel,
// and LoRA virtual-expert ids + alignment in one kernel.
#include <algorithm>

#include "kernels/cuda/moe_align.cuh"
#include "kernels/cuda/moe_ops_launch.h"
#include "kernels/cuda/moe_route.cuh"

namespace moelora::cuda::detail {
namespace {

__global__ void moe_align_kernel(const int32_t* __restrict__ ids, AlignOut o) {
  extern __shared__ __align__(16) unsigned char smem[];
  align_block([&](int s) { return ids[s]; }, o, smem);
}

__global__ void moe_lora_align_kernel(const int32_t* __restrict__ ids,
                                      const int32_t* __restrict__ token_slot, int top_k,
                                      int num_experts, AlignOut o) {
  extern __shared__ __align__(16) unsigned char smem[];
  align_block(
      [&](int s) {
        const int slot = token_slot[s / top_k], e = ids[s];
        if (slot < 0 || e < 0 || e >= num_experts) return -1;
        const int64_t v = int64_t(slot) * num_experts + e;
        return v < o.num_groups ? int(v) : -1;
      },
      o, smem);
}

// Routes the m tokens (warps loop over tokens), then aligns their ids from shared memory.
// The routing scratch (first `scratch_bytes`) is reused by the aligner.
__global__ void moe_route_align_kernel(const float* __restrict__ logits,
                                       const float* __restrict__ bias, RouteParams p, int m,
                                       int32_t* __restrict__ ids, float* __restrict__ weights,
                                       AlignOut o, int scratch_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  int32_t* sids = reinterpret_cast<int32_t*>(smem + scratch_bytes);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  double* scores = reinterpret_cast<double*>(smem) + warp * (p.num_experts + p.n_group);
  for (int t = warp; t < m; t += nwarps) {
    int id;
    float w;
    route_token_warp(logits + int64_t(t) * p.num_experts, bias, p, scores,
                     scores + p.num_experts, id, w);
    if (lane < p.top_k) {
      ids[t * p.top_k + lane] = id;
      weights[t * p.top_k + lane] = w;
      sids[t * p.top_k + lane] = id;
    }
    __syncwarp();
  }
  __syncthreads();
  align_block([&](int s) { return sids[s]; }, o, smem);
}

// Threads and row warps for n slots in G groups; returns the shared memory needed.
size_t configure(AlignOut& o, int& threads) {
  const int chunks = (o.num_slots + 31) / 32;
  threads = (o.num_slots <= 2048 && o.num_groups <= 2048) ? 256 : 1024;
  int w = std::max(1, std::min(threads / 32, chunks));
  while (w > 1 && align_smem_bytes(o.num_groups, w) > kAlignSmemLimit) --w;
  o.row_warps = w;
  return align_smem_bytes(o.num_groups, w);
}

template <class Kernel>
cudaError_t allow_large_smem(Kernel kernel) {
  // Once per kernel; not a stream operation, so harmless under graph capture too.
  static const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kAlignSmemLimit + kSmemSlack));
  return err;
}

}  // namespace

cudaError_t launch_moe_align(const int32_t* group_ids, AlignOut o, cudaStream_t stream) {
  int threads;
  const size_t smem = configure(o, threads);
  if (cudaError_t e = allow_large_smem(moe_align_kernel); e != cudaSuccess) return e;
  moe_align_kernel<<<1, threads, smem, stream>>>(group_ids, o);
  return cudaGetLastError();
}

cudaError_t launch_moe_lora_align(const int32_t* ids, const int32_t* token_slot, int top_k,
                                  int num_experts, AlignOut o, cudaStream_t stream) {
  int threads;
  const size_t smem = configure(o, threads);
  if (cudaError_t e = allow_large_smem(moe_lora_align_kernel); e != cudaSuccess) return e;
  moe_lora_align_kernel<<<1, threads, smem, stream>>>(ids, token_slot, top_k, num_experts, o);
  return cudaGetLastError();
}

cudaError_t launch_moe_route_align(const float* logits, const float* bias, const RouteParams& p,
                                   int m, int32_t* ids, float* weights, AlignOut o,
                                   cudaStream_t stream) {
  int threads;
  configure(o, threads);
  threads = 1024;  // one warp per token while routing
  const size_t scratch =
      route_align_scratch_bytes(p.num_experts, p.n_group, o.num_groups, o.row_warps);
  const size_t smem = scratch + size_t(m) * p.top_k * 4;
  if (smem > kAlignSmemLimit + kSmemSlack) return cudaErrorInvalidValue;
  if (cudaError_t e = allow_large_smem(moe_route_align_kernel); e != cudaSuccess) return e;
  moe_route_align_kernel<<<1, threads, smem, stream>>>(logits, bias, p, m, ids, weights, o,
                                                       int(scratch));
  return cudaGetLastError();
}

}  // namespace moelora::cuda::detail
