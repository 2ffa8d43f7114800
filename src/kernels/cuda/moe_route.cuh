// Device code for MoE routing: one warp routes one token (softmax or sigmoid scores,
// optional group-limited selection, top-k with ties to the lowest expert id).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kernels/cuda/moe_ops_launch.h"

namespace moelora::cuda::detail {

// Keeps (v, i) or takes (ov, oi): larger value wins, ties to the lower index; index INT32_MAX
// marks "no candidate".
__device__ __forceinline__ void argmax_merge(double& v, int& i, double ov, int oi) {
  if (oi == INT32_MAX) return;
  if (i == INT32_MAX || ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

__device__ __forceinline__ void warp_argmax(double& v, int& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const double ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    argmax_merge(v, i, ov, oi);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Selection scores are doubles so near-ties resolve as in the (double) CPU reference.
__device__ __forceinline__ double sigmoid_d(float x) { return 1.0 / (1.0 + exp(-double(x))); }

// Routes one token with the whole warp. `scores` is this warp's scratch of num_experts doubles,
// `gscores` of n_group doubles. On return lane j < top_k holds the j-th choice in `id`/`w`
// (descending choice score). Experts are chosen by the logit for softmax (same order as the
// probabilities) and by sigmoid + bias for sigmoid scoring.
__device__ __forceinline__ void route_token_warp(const float* __restrict__ logits,
                                                 const float* __restrict__ bias,
                                                 const RouteParams& p, double* scores,
                                                 double* gscores, int& id, float& w) {
  const int lane = threadIdx.x & 31;
  const int E = p.num_experts;
  float lmax = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    const float l = logits[e];
    double s = l;
    if (p.sigmoid) s = sigmoid_d(l) + (p.use_bias ? double(bias[e]) : 0.0);
    scores[e] = s;
    lmax = fmaxf(lmax, l);
  }
  float denom = 1.0f;
  if (!p.sigmoid) {
    lmax = warp_max(lmax);
    float sum = 0.0f;
    for (int e = lane; e < E; e += 32) sum += expf(logits[e] - lmax);
    denom = warp_sum(sum);
  }
  __syncwarp();

  if (p.n_group > 1) {
    const int per_group = E / p.n_group;
    for (int g = lane; g < p.n_group; g += 32) {
      double b1 = -INFINITY, b2 = -INFINITY;
      for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
        const double s = scores[e];
        if (s > b1) {
          b2 = b1;
          b1 = s;
        } else if (s > b2) {
          b2 = s;
        }
      }
      gscores[g] = p.top2_sum ? b1 + b2 : b1;
    }
    __syncwarp();
    // Keep the topk_group best groups; the others' experts become ineligible (-inf).
    unsigned keep_bits = 0;  // lane's groups g = lane + 32 * b
    for (int j = 0; j < p.topk_group; ++j) {
      double v = -INFINITY;
      int i = INT32_MAX;
      for (int g = lane, b = 0; g < p.n_group; g += 32, ++b)
        if (!(keep_bits >> b & 1u)) argmax_merge(v, i, gscores[g], g);
      warp_argmax(v, i);
      if (i != INT32_MAX && (i & 31) == lane) keep_bits |= 1u << (i >> 5);
    }
    for (int g = lane, b = 0; g < p.n_group; g += 32, ++b) gscores[g] = (keep_bits >> b & 1u) ? 1.0 : 0.0;
    __syncwarp();
    for (int e = lane; e < E; e += 32)
      if (gscores[e / per_group] == 0.0) scores[e] = -INFINITY;
    __syncwarp();
  }

  unsigned chosen = 0;  // lane's experts e = lane + 32 * b
  id = -1;
  w = 0.0f;
  for (int j = 0; j < p.top_k; ++j) {
    double v = -INFINITY;
    int i = INT32_MAX;
    for (int e = lane, b = 0; e < E; e += 32, ++b)
      if (!(chosen >> b & 1u)) argmax_merge(v, i, scores[e], e);
    warp_argmax(v, i);
    if (i == INT32_MAX) break;
    if ((i & 31) == lane) chosen |= 1u << (i >> 5);
    if (lane == j) {
      id = i;
      const float l = logits[i];
      w = p.sigmoid ? float(sigmoid_d(l)) : expf(l - lmax) / denom;
    }
  }
  if (p.renormalize) {
    const float sum = warp_sum(lane < p.top_k ? w : 0.0f);
    w = p.sigmoid ? w / (sum + 1e-20f) : w / sum;
  }
  w *= p.scale;
}

}  // namespace moelora::cuda::detail

