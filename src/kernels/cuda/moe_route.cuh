// Device code for MoE routing. A team of ceil32(E) threads routes one token: thread e holds
// expert e's selection score and finds its rank by counting better experts (one broadcast
// shared-memory pass), so the top-k costs one O(E) loop instead of k dependent warp
// reductions. Ties go to the lowest expert id; selection scores are doubles so near-ties
// resolve as in the (double) CPU reference.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kernels/cuda/moe_ops_launch.h"

namespace moelora::cuda::detail {

template <class Score>
__device__ __forceinline__ Score sigmoid_s(float x) { return Score(1) / (Score(1) + exp(-Score(x))); }

// True when (a, ia) ranks before (b, ib): larger score first, ties to the lower index.
template <class Score>
__device__ __forceinline__ bool ranks_before(Score a, int ia, Score b, int ib) {
  return a > b || (a == b && ia < ib);
}

// Routes token `t` (valid when t < m) with a team of route_team(E) threads starting at thread
// `team0`; `smem` is this team's route_team_smem bytes. All threads of the block must call it
// together (it uses __syncthreads). On return the team has written ids/weights [t, :k] and,
// when `sids` is set, sids[t*k + j] too.
// Score: the selection-score type (double in the library; the template exists for probes).
template <class Score = double, bool kRankLoop = true>
__device__ __forceinline__ void route_token_team(const float* __restrict__ logits,
                                                 const float* __restrict__ bias,
                                                 const RouteParams& p, int t, int m, int team0,
                                                 unsigned char* smem, int32_t* ids,
                                                 float* weights, int32_t* sids) {
  const int E = p.num_experts, k = p.top_k, team = route_team(E);
  const int e = int(threadIdx.x) - team0;  // this thread's expert
  const bool live = t < m && e < E;
  Score* score = reinterpret_cast<Score*>(smem);             // [E]
  Score* gscore = score + E;                                  // [n_group]
  int32_t* gkeep = reinterpret_cast<int32_t*>(gscore + p.n_group);  // [n_group]
  float* red = reinterpret_cast<float*>(gkeep + p.n_group);  // [32] per-warp partials
  int32_t* sel_id = reinterpret_cast<int32_t*>(red + 32);    // [32]
  float* sel_w = reinterpret_cast<float*>(sel_id + 32);      // [32]
  const int lane = threadIdx.x & 31, wteam = e >> 5, nwarps = team >> 5;

  const float l = live ? logits[int64_t(t) * E + e] : -INFINITY;
  Score s = l;
  if (p.sigmoid && live) s = sigmoid_s<Score>(l) + (p.use_bias ? Score(bias[e]) : Score(0));
  if (live) score[e] = s;
  if (e < 32) sel_id[e] = -1;

  // Softmax normalizer (max, then sum of exp) over the team.
  float mx = l;
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if (lane == 0) red[wteam] = mx;
  __syncthreads();
  mx = -INFINITY;
  for (int w = 0; w < nwarps; ++w) mx = fmaxf(mx, red[w]);
  float ex = (live && !p.sigmoid) ? expf(l - mx) : 0.0f;
  float sum = ex;
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  __syncthreads();  // everyone has read red[] (max)
  if (lane == 0) red[wteam] = sum;

  if (p.n_group > 1) {  // group-limited: experts outside the topk_group best groups drop out
    const int per_group = E / p.n_group;
    if (t < m && e < p.n_group) {
      Score b1 = -INFINITY, b2 = -INFINITY;
      for (int x = e * per_group; x < (e + 1) * per_group; ++x) {
        const Score v = score[x];
        if (v > b1) {
          b2 = b1;
          b1 = v;
        } else if (v > b2) {
          b2 = v;
        }
      }
      gscore[e] = p.top2_sum ? b1 + b2 : b1;
    }
    __syncthreads();
    if (t < m && e < p.n_group) {
      int rank = 0;
      const Score mine = gscore[e];
      for (int g = 0; g < p.n_group; ++g) rank += ranks_before(gscore[g], g, mine, e);
      gkeep[e] = rank < p.topk_group;
    }
    __syncthreads();
    if (live && !gkeep[e / per_group]) score[e] = s = -INFINITY;
  }
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < nwarps; ++w) total += red[w];

  if (live) {
    // No early exit: independent broadcast loads pipeline (an exit test on `rank` would make
    // every iteration wait for the previous load).
    int rank = kRankLoop ? 0 : e;
    if (kRankLoop) {
#pragma unroll 8
      for (int x = 0; x < E; ++x) rank += ranks_before(score[x], x, s, e);
    }
    if (rank < k) {
      sel_id[rank] = e;
      sel_w[rank] = p.sigmoid ? float(sigmoid_s<double>(l)) : ex / total;
    }
  }
  __syncthreads();
  if (t < m && e < k) {
    const int id = sel_id[e];
    float w = id >= 0 ? sel_w[e] : 0.0f;
    if (p.renormalize) {
      float ssum = 0.0f;
      for (int j = 0; j < k; ++j) ssum += sel_id[j] >= 0 ? sel_w[j] : 0.0f;
      w = p.sigmoid ? w / (ssum + 1e-20f) : w / ssum;
    }
    w *= p.scale;
    ids[int64_t(t) * k + e] = id;
    weights[int64_t(t) * k + e] = w;
    if (sids) sids[t * k + e] = id;
  }
  __syncthreads();  // the team's smem is reused by the caller
}

}  // namespace moelora::cuda::detail
