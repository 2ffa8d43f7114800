// CUDA routing kernel: logits f32 [M, E] -> top-k ids and weights. One warp per token, the
// scores staged in shared memory; no atomics, no host sync.
#include "kernels/cuda/moe_ops_launch.h"
#include "kernels/cuda/moe_route.cuh"

namespace moelora::cuda::detail {

constexpr int kRouteWarps = 4;

__global__ void __launch_bounds__(kRouteWarps * 32)
    moe_route_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                     RouteParams p, int m, int32_t* __restrict__ ids,
                     float* __restrict__ weights) {
  extern __shared__ double smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  double* scores = smem + warp * (p.num_experts + p.n_group);
  double* gscores = scores + p.num_experts;
  for (int t = blockIdx.x * kRouteWarps + warp; t < m; t += gridDim.x * kRouteWarps) {
    int id;
    float w;
    route_token_warp(logits + int64_t(t) * p.num_experts, bias, p, scores, gscores, id, w);
    if (lane < p.top_k) {
      ids[int64_t(t) * p.top_k + lane] = id;
      weights[int64_t(t) * p.top_k + lane] = w;
    }
    __syncwarp();
  }
}

cudaError_t launch_moe_route(const float* logits, const float* bias, const RouteParams& p, int m,
                             int32_t* ids, float* weights, cudaStream_t stream) {
  const size_t smem = size_t(kRouteWarps) * (p.num_experts + p.n_group) * sizeof(double);
  const int blocks = (m + kRouteWarps - 1) / kRouteWarps;
  moe_route_kernel<<<blocks, kRouteWarps * 32, smem, stream>>>(logits, bias, p, m, ids, weights);
  return cudaGetLastError();
}

}  // namespace moelora::cuda::detail
