// CUDA token alignment kernels (single CTA, stable counting sort; see moe_align.cuh) and the
// fused variants that save a launch on the decode path: routing + alignment in one kernel,
// and LoRA virtual-expert ids + alignment in one kernel.
#include <algorithm>

#include "kernels/cuda/moe_align.cuh"
#include "kernels/cuda/moe_ops_launch.h"
#include "kernels/cuda/moe_route.cuh"
#include "kernels/cuda/pdl_launch.cuh"

namespace moelora::cuda::detail {
namespace {

// Group ids staged in shared memory after the aligner's own arrays (one parallel pass of
// global loads, instead of each warp walking its range with dependent loads), when they fit.
template <bool kStaged, class GidFn>
__device__ __forceinline__ void stage_and_align(GidFn gid, const AlignOut& o, unsigned char* smem,
                                                int staged_offset) {
  if constexpr (kStaged) {
    int32_t* sg = reinterpret_cast<int32_t*>(smem + staged_offset);
#pragma unroll 8
    for (int s = threadIdx.x; s < o.num_slots; s += blockDim.x) sg[s] = gid(s);
    __syncthreads();
    align_block([&](int s) { return sg[s]; }, o, smem);
  } else {
    align_block(gid, o, smem);
  }
}

template <bool kStaged>
__global__ void moe_align_kernel(const int32_t* __restrict__ ids, AlignOut o, int staged_offset) {
  extern __shared__ __align__(16) unsigned char smem[];
  pdl_wait();
  pdl_trigger();
  stage_and_align<kStaged>([&](int s) { return ids[s]; }, o, smem, staged_offset);
}

template <bool kStaged>
__global__ void moe_lora_align_kernel(const int32_t* __restrict__ ids,
                                      const int32_t* __restrict__ token_slot, int top_k,
                                      int num_experts, AlignOut o, int staged_offset) {
  extern __shared__ __align__(16) unsigned char smem[];
  pdl_wait();
  pdl_trigger();
  stage_and_align<kStaged>(
      [&](int s) {
        const int slot = token_slot[s / top_k], e = ids[s];
        if (slot < 0 || e < 0 || e >= num_experts) return -1;
        const int64_t v = int64_t(slot) * num_experts + e;
        return v < o.num_groups ? int(v) : -1;
      },
      o, smem, staged_offset);
}

// Routes the m tokens (teams of ceil32(E) threads, several tokens per pass), then aligns
// their ids from shared memory. The routing scratch (first `scratch_bytes`) is reused by the
// aligner.
__global__ void moe_route_align_kernel(const float* __restrict__ logits,
                                       const float* __restrict__ bias, RouteParams p, int m,
                                       int32_t* __restrict__ ids, float* __restrict__ weights,
                                       AlignOut o, int scratch_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  pdl_wait();
  pdl_trigger();
  int32_t* sids = reinterpret_cast<int32_t*>(smem + scratch_bytes);
  const int team = route_team(p.num_experts), teams = blockDim.x / team;  // whole teams
  const int slot = threadIdx.x / team;
  unsigned char* tsmem = smem + slot * route_team_smem(p.num_experts, p.n_group);
  for (int t0 = 0; t0 < m; t0 += teams)
    route_token_team(logits, bias, p, t0 + slot, m, slot * team, tsmem, ids, weights, sids);
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

template <auto kKernel>
cudaError_t allow_large_smem() {
  // Once per kernel; not a stream operation, so harmless under graph capture too.
  static const cudaError_t err = cudaFuncSetAttribute(
      kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kAlignSmemLimit + kSmemSlack));
  return err;
}

}  // namespace

// Launches `staged` or `direct` (the same kernel with kStaged true/false) with the staging
// area after the aligner's arrays when it fits.
template <auto kStaged, auto kDirect, class... Args>
cudaError_t launch_align(AlignOut o, cudaStream_t stream, Args... args) {
  int threads;
  const size_t smem = configure(o, threads);
  const size_t offset = (smem + 15) / 16 * 16;
  const size_t with_ids = offset + size_t(o.num_slots) * 4;
  if (with_ids <= kAlignSmemLimit) {
    if (cudaError_t e = allow_large_smem<kStaged>(); e != cudaSuccess) return e;
    return launch_pdl(kStaged, dim3(1), dim3(threads), with_ids, stream, args..., o, int(offset));
  } else {
    if (cudaError_t e = allow_large_smem<kDirect>(); e != cudaSuccess) return e;
    return launch_pdl(kDirect, dim3(1), dim3(threads), smem, stream, args..., o, 0);
  }
}

cudaError_t launch_moe_align(const int32_t* group_ids, AlignOut o, cudaStream_t stream) {
  return launch_align<moe_align_kernel<true>, moe_align_kernel<false>>(o, stream, group_ids);
}

cudaError_t launch_moe_lora_align(const int32_t* ids, const int32_t* token_slot, int top_k,
                                  int num_experts, AlignOut o, cudaStream_t stream) {
  return launch_align<moe_lora_align_kernel<true>, moe_lora_align_kernel<false>>(
      o, stream, ids, token_slot, top_k, num_experts);
}

cudaError_t launch_moe_route_align(const float* logits, const float* bias, const RouteParams& p,
                                   int m, int32_t* ids, float* weights, AlignOut o,
                                   cudaStream_t stream) {
  int threads;
  configure(o, threads);
  // Whole teams, one per token up to 1024 threads, at least 128 threads for the aligner: a
  // 1024-thread CTA for one token spends its time in block-wide barriers.
  const int team = route_team(p.num_experts), max_teams = 1024 / team;
  const int teams = std::min(max_teams, std::max(m, (128 + team - 1) / team));
  threads = teams * team;
  o.row_warps = std::max(1, std::min(o.row_warps, threads / 32));
  const size_t scratch =
      route_align_scratch_bytes(p.num_experts, p.n_group, o.num_groups, o.row_warps);
  const size_t smem = scratch + size_t(m) * p.top_k * 4;
  if (smem > kAlignSmemLimit + kSmemSlack) return cudaErrorInvalidValue;
  if (cudaError_t e = allow_large_smem<moe_route_align_kernel>(); e != cudaSuccess) return e;
  return launch_pdl(moe_route_align_kernel, dim3(1), dim3(threads), smem, stream, logits, bias, p,
                    m, ids, weights, o, int(scratch));
}

}  // namespace moelora::cuda::detail
