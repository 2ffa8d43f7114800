// CUDA routing kernel: logits f32 [M, E] -> top-k ids and weights. One team of ceil32(E)
// threads per token (see moe_route.cuh); no atomics, no host sync.
#include "kernels/cuda/moe_ops_launch.h"
#include "kernels/cuda/moe_route.cuh"
#include "kernels/cuda/pdl_launch.cuh"

namespace moelora::cuda::detail {
namespace {

// Tokens per CTA: about 256 threads, at least one team.
int route_tokens_per_cta(int num_experts) {
  const int team = route_team(num_experts);
  return team >= 256 ? 1 : 256 / team;
}

__global__ void moe_route_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                                 RouteParams p, int m, int32_t* __restrict__ ids,
                                 float* __restrict__ weights) {
  extern __shared__ __align__(16) unsigned char smem[];
  pdl_wait();
  pdl_trigger();
  const int team = route_team(p.num_experts);
  const int slot = threadIdx.x / team;
  const int t = blockIdx.x * (blockDim.x / team) + slot;
  route_token_team(logits, bias, p, t, m, slot * team,
                   smem + slot * route_team_smem(p.num_experts, p.n_group), ids, weights,
                   nullptr);
}

}  // namespace

cudaError_t launch_moe_route(const float* logits, const float* bias, const RouteParams& p, int m,
                             int32_t* ids, float* weights, cudaStream_t stream) {
  const int tpc = route_tokens_per_cta(p.num_experts);
  const size_t smem = size_t(tpc) * route_team_smem(p.num_experts, p.n_group);
  const int blocks = (m + tpc - 1) / tpc;
  return launch_pdl(moe_route_kernel, dim3(blocks), dim3(tpc * route_team(p.num_experts)), smem,
                    stream, logits, bias, p, m, ids, weights);
}

}  // namespace moelora::cuda::detail
