// Merging online-softmax partials of a decode attention kernel (internal device code, shared
// by the MLA latent attention and the grouped-query attention): each warp of a CTA holds, per
// head g < kG, a running max, a running sum and a weighted accumulator over its positions;
// the CTA merges its warps (in warp order), then the kSplit CTAs of a thread-block cluster
// merge through distributed shared memory (in rank order), so results are deterministic and
// need no workspace.
#pragma once

#include <cooperative_groups.h>

namespace moelora::cuda::attn {

// One position of an online softmax: score s, value row v (the lane's kPer columns).
template <int kPer>
__device__ __forceinline__ void online_step(float& mx, float& sum, float (&acc)[kPer], float s,
                                            const float (&v)[kPer]) {
  const float nm = fmaxf(mx, s);
  const float corr = expf(mx - nm), e = expf(s - nm);
  sum = sum * corr + e;
#pragma unroll
  for (int j = 0; j < kPer; ++j) acc[j] = fmaf(acc[j], corr, e * v[j]);
  mx = nm;
}

// The shared memory a merge uses, declared by the kernel (cluster-visible parts included).
template <int kWarps, int kSplit, int kG, int kCols>
struct MergeSmem {
  float part[kG][kCols];      // the CTA's merged accumulator (read by the cluster)
  float w_mx[kWarps][kG], w_sum[kWarps][kG];
  float mx[kG], sum[kG];      // the CTA's merged max and sum (read by the cluster)
  float weight[kG][kSplit];   // each rank's share of the final result
};

// Merges the calling warp's state (mx, sum, acc: lane owns columns lane + 32 j) into the
// cluster's result and calls write(g, c, value) for heads g < heads and this CTA's columns
// [rank * ceil(cols / kSplit), ...) of [0, cols). Every thread of every CTA must call it.
// Positions a state never saw have sum 0 (and any max).
template <int kWarps, int kSplit, int kG, int kPer, class Write>
__device__ void merge_partials(MergeSmem<kWarps, kSplit, kG, kPer * 32>& sm, int heads, int cols,
                               const float (&mx)[kG], const float (&sum)[kG],
                               const float (&acc)[kG][kPer], Write&& write) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0)
#pragma unroll
    for (int g = 0; g < kG; ++g) sm.w_mx[warp][g] = mx[g], sm.w_sum[warp][g] = sum[g];
  __syncthreads();
  float wt[kG];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    float cm = -INFINITY;
    for (int w = 0; w < kWarps; ++w)
      if (sm.w_sum[w][g] > 0.f) cm = fmaxf(cm, sm.w_mx[w][g]);
    wt[g] = sum[g] > 0.f ? expf(mx[g] - cm) : 0.f;
    if (threadIdx.x == 0) {
      float cs = 0.f;
      for (int w = 0; w < kWarps; ++w)
        if (sm.w_sum[w][g] > 0.f) cs += sm.w_sum[w][g] * expf(sm.w_mx[w][g] - cm);
      sm.mx[g] = cm;
      sm.sum[g] = cs;
    }
  }
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w)
#pragma unroll
      for (int g = 0; g < kG; ++g)
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int c = lane + 32 * j;
          const float v = acc[g][j] * wt[g];
          sm.part[g][c] = w == 0 ? v : sm.part[g][c] + v;
        }
    __syncthreads();
  }

  cluster.sync();
  if (int(threadIdx.x) < heads && threadIdx.x < kG) {
    const int g = threadIdx.x;
    float pm[kSplit], ps[kSplit], gm = -INFINITY;
    for (int r = 0; r < kSplit; ++r) {
      pm[r] = *cluster.map_shared_rank(&sm.mx[g], r);
      ps[r] = *cluster.map_shared_rank(&sm.sum[g], r);
      if (ps[r] > 0.f) gm = fmaxf(gm, pm[r]);
    }
    float gs = 0.f;
    for (int r = 0; r < kSplit; ++r) {
      pm[r] = ps[r] > 0.f ? expf(pm[r] - gm) : 0.f;
      gs += ps[r] * pm[r];
    }
    for (int r = 0; r < kSplit; ++r) sm.weight[g][r] = pm[r] / gs;  // >= 1 position: gs > 0
  }
  __syncthreads();
  const int cs = (cols + kSplit - 1) / kSplit;
  for (int e = threadIdx.x; e < heads * cs; e += kWarps * 32) {
    const int g = e / cs, c = int(rank) * cs + e % cs;
    if (c >= cols) continue;
    float o = 0.f;
    for (int r = 0; r < kSplit; ++r)
      if (sm.weight[g][r] != 0.f) o += *cluster.map_shared_rank(&sm.part[g][c], r) * sm.weight[g][r];
    write(g, c, o);
  }
  cluster.sync();  // keep this CTA's shared memory alive until the cluster has read it
}

}  // namespace moelora::cuda::attn
