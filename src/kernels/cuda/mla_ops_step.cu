// Device code and launchers of the CUDA DeepSeek step ops (kernels/mla_step_ops.inc).
#include <cuda_bf16.h>

#include "kernels/cuda/mla_ops_launch.h"

namespace moelora::cuda {
namespace {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

// ---- kv_a_layernorm on the first L columns: one CTA per row ----------------------------------
constexpr int kNormThreads = 128;

template <class T>
__global__ void __launch_bounds__(kNormThreads)
    mla_kv_norm_kernel(T* kv, const bf16* w, float eps, int64_t cols, int64_t L) {
  T* row = kv + int64_t(blockIdx.x) * cols;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < L; i += kNormThreads) {
    const float v = to_f32(row[i]);
    ss = fmaf(v, v, ss);
  }
  for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  __shared__ float part[kNormThreads / 32];
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < kNormThreads / 32; ++i) total += part[i];
  const float inv = 1.0f / sqrtf(total / float(L) + eps);
  // Each thread rewrites the elements it read above.
  for (int64_t i = threadIdx.x; i < L; i += kNormThreads)
    put(row + i, to_f32(row[i]) * inv * __bfloat162float(w[i]));
}

// ---- grouped router margin: one thread per token (a diagnostic; serial, in double) -----------

// The gap between the n-th and (n+1)-th largest of v[i] over i < size with eligible(i) (ties
// count separately); INFINITY when n or fewer are eligible.
template <class Eligible>
__device__ float top_gap(const double* v, int size, int n, Eligible eligible) {
  int count = 0;
  for (int i = 0; i < size; ++i) count += eligible(i) ? 1 : 0;
  if (count <= n) return INFINITY;
  uint32_t taken[kGroupedMarginMaxE / 32] = {};
  double nth = 0, next = 0;
  for (int round = 0; round <= n; ++round) {
    int best = -1;
    for (int i = 0; i < size; ++i)
      if (eligible(i) && !((taken[i / 32] >> (i % 32)) & 1u) && (best < 0 || v[i] > v[best]))
        best = i;
    taken[best / 32] |= 1u << (best % 32);
    if (round == n - 1) nth = v[best];
    if (round == n) next = v[best];
  }
  return float(nth - next);
}

__global__ void grouped_margin_kernel(const GroupedMarginArgs a) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= a.m) return;
  double s[kGroupedMarginMaxE];
  const float* l = a.logits + t * a.E;
  for (int e = 0; e < a.E; ++e) {
    s[e] = a.sigmoid ? 1.0 / (1.0 + exp(-double(l[e]))) : double(l[e]);
    if (a.correction_bias) s[e] += a.correction_bias[e];
  }
  float m = INFINITY;
  uint64_t chosen = ~uint64_t(0);  // groups whose experts are eligible
  const int per_group = a.E / a.n_group;
  if (a.n_group > 1) {
    double gs[kGroupedMarginMaxGroups];
    for (int g = 0; g < a.n_group; ++g) {
      double b0 = -INFINITY, b1 = -INFINITY;  // the group's two largest scores
      for (int i = g * per_group; i < (g + 1) * per_group; ++i) {
        if (s[i] > b0)
          b1 = b0, b0 = s[i];
        else if (s[i] > b1)
          b1 = s[i];
      }
      gs[g] = a.top2_sum ? b0 + b1 : b0;
    }
    m = fminf(m, top_gap(gs, a.n_group, a.topk_group, [](int) { return true; }));
    // The topk_group best groups, the lower index first among equal scores (a stable sort).
    chosen = 0;
    for (int r = 0; r < a.topk_group; ++r) {
      int best = -1;
      for (int g = 0; g < a.n_group; ++g)
        if (!((chosen >> g) & 1u) && (best < 0 || gs[g] > gs[best])) best = g;
      chosen |= uint64_t(1) << best;
    }
  }
  m = fminf(m, top_gap(s, a.E, a.top_k,
                       [&](int e) { return ((chosen >> (e / per_group)) & 1u) != 0; }));
  a.margin[t * a.cols + a.col] = m;
}

}  // namespace

cudaError_t launch_mla_kv_norm(void* kv, bool kv_bf16, const void* weight, float eps, int64_t m,
                               int64_t cols, int64_t L, cudaStream_t s) {
  if (m == 0) return cudaSuccess;
  if (m > 0x7fffffff || L > cols) return cudaErrorInvalidValue;
  const auto* w = static_cast<const bf16*>(weight);
  if (kv_bf16)
    mla_kv_norm_kernel<bf16><<<unsigned(m), kNormThreads, 0, s>>>(static_cast<bf16*>(kv), w, eps,
                                                                  cols, L);
  else
    mla_kv_norm_kernel<float><<<unsigned(m), kNormThreads, 0, s>>>(static_cast<float*>(kv), w,
                                                                   eps, cols, L);
  return cudaGetLastError();
}

cudaError_t launch_grouped_router_margin(const GroupedMarginArgs& a, cudaStream_t s) {
  if (a.m == 0) return cudaSuccess;
  if (a.E > kGroupedMarginMaxE || a.n_group > kGroupedMarginMaxGroups || a.n_group < 1 ||
      a.E % a.n_group != 0)
    return cudaErrorInvalidValue;
  const int threads = 64;
  const int64_t blocks = (a.m + threads - 1) / threads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  grouped_margin_kernel<<<unsigned(blocks), threads, 0, s>>>(a);
  return cudaGetLastError();
}

}  // namespace moelora::cuda
