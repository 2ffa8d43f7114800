// Decode-oriented paged attention for grouped-query attention (the fast path of
// dense_ops.inc's paged_attention; launch_paged_attention falls back to the plain kernel for
// shapes this one does not take).
//
// One cluster of kSplit CTAs per (token, KV head): every CTA reads the KV head's K and V rows
// of its share of the positions ONCE for all G query heads of the group (the plain kernel read
// them once per query head: 8x the bytes for Qwen3-30B-A3B's 32/4 heads), keeps one online
// softmax per query head, and the cluster merges its kSplit partial results through
// distributed shared memory, so short batches still spread over the SMs and no workspace is
// needed. Merges are in a fixed order (deterministic).
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/cuda/act_io.cuh"
#include "kernels/cuda/dense_ops_launch.h"
#include "kernels/cuda/softmax_merge.cuh"

namespace moelora::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kSplit = 8;
// Warps per CTA: 16 when the clusters' CTAs fit on the H100's 132 SMs one CTA each (at most
// 16 clusters: decode batches of up to 4 tokens at 4 KV heads), where each warp's chain of
// positions (one at a time: load, a dot product per query head, online softmax) is what the
// kernel's time is (64 positions per CTA at context 512: 16 per warp with 4 warps, 4 with 16);
// 4 otherwise (batch 16 with 16 warps, 512 CTAs of 512 threads, took 18.4 ms per step instead
// of 14.4: one CTA per SM at a time).
constexpr int kFewClusters = 16;
constexpr int kMaxG = 8;    // query heads per KV head
constexpr int kMaxPer = 4;  // head_dim / 32 (head_dim <= 128)

using act_io::load;

__device__ __forceinline__ float reduce_warp(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int kWarps, bool kQ, bool kCache, bool kOut>
__global__ void __cluster_dims__(1, 1, kSplit) __launch_bounds__(kWarps * 32)
    gqa_paged_attention_kernel(const PagedAttentionArgs a) {
  constexpr int kCols = kMaxPer * 32;
  __shared__ float s_q[kMaxG][kCols];
  __shared__ attn::MergeSmem<kWarps, kSplit, kMaxG, kCols> s_merge;

  const unsigned rank = cg::this_cluster().block_rank();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = blockIdx.x;
  const int kvh = int(blockIdx.y);
  const int d = a.head_dim, G = a.heads / a.kv_heads, per = d / 32;
  const int h0 = kvh * G;
  const int seq = a.token_seq[t], len = a.token_pos[t] + 1;
  for (int e = threadIdx.x; e < kMaxG * kCols; e += kWarps * 32) {
    const int g = e / kCols, c = e % kCols;
    s_q[g][c] = (g < G && c < d) ? load<kQ>(a.q, (t * a.heads + h0 + g) * int64_t(d) + c) : 0.f;
  }
  __syncthreads();

  const int chunk = (len + kSplit - 1) / kSplit;
  const int p_begin = int(rank) * chunk, p_end = min(len, p_begin + chunk);
  const int64_t row = int64_t(a.kv_heads) * d;
  float mx[kMaxG], sum[kMaxG], acc[kMaxG][kMaxPer];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    mx[g] = -INFINITY;
    sum[g] = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxPer; ++j) acc[g][j] = 0.f;
  }
  for (int p = p_begin + warp; p < p_end; p += kWarps) {
    const int page = a.block_table[int64_t(seq) * a.max_pages + p / a.page_size];
    const int64_t off = (int64_t(page) * a.page_size + p % a.page_size) * row + int64_t(kvh) * d;
    float k[kMaxPer], v[kMaxPer];
#pragma unroll
    for (int j = 0; j < kMaxPer; ++j) {
      const bool ok = j < per;
      k[j] = ok ? load<kCache>(a.k_cache, off + lane + 32 * j) : 0.f;
      v[j] = ok ? load<kCache>(a.v_cache, off + lane + 32 * j) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      if (g >= G) break;
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < kMaxPer; ++j) s = fmaf(s_q[g][lane + 32 * j], k[j], s);
      attn::online_step(mx[g], sum[g], acc[g], reduce_warp(s) * a.scale, v);
    }
  }

  attn::merge_partials<kWarps, kSplit>(s_merge, G, d, mx, sum, acc, [&](int g, int c, float o) {
    const int64_t i = (t * a.heads + h0 + g) * int64_t(d) + c;
    if constexpr (kOut)
      static_cast<__nv_bfloat16*>(a.out)[i] = __float2bfloat16_rn(o);
    else
      static_cast<float*>(a.out)[i] = o;
  });
}

template <int kW, bool kQ, bool kC>
cudaError_t launch_warps(const PagedAttentionArgs& a, cudaStream_t s) {
  const dim3 grid(unsigned(a.m), unsigned(a.kv_heads), kSplit);
  if (a.out_bf16)
    gqa_paged_attention_kernel<kW, kQ, kC, true><<<grid, kW * 32, 0, s>>>(a);
  else
    gqa_paged_attention_kernel<kW, kQ, kC, false><<<grid, kW * 32, 0, s>>>(a);
  return cudaGetLastError();
}

template <bool kQ, bool kC>
cudaError_t launch_typed(const PagedAttentionArgs& a, cudaStream_t s) {
  return a.m * a.kv_heads <= kFewClusters ? launch_warps<16, kQ, kC>(a, s)
                                          : launch_warps<4, kQ, kC>(a, s);
}

}  // namespace

bool gqa_paged_attention_supported(const PagedAttentionArgs& a) {
  return a.kv_heads > 0 && a.heads % a.kv_heads == 0 && a.heads / a.kv_heads <= kMaxG &&
         a.head_dim % 32 == 0 && a.head_dim <= 32 * kMaxPer && a.kv_heads <= 65535 &&
         a.m <= 0x7fffffff;
}

cudaError_t launch_gqa_paged_attention(const PagedAttentionArgs& a, cudaStream_t s) {
  if (a.m == 0) return cudaSuccess;
  if (!gqa_paged_attention_supported(a)) return cudaErrorInvalidValue;
  if (a.q_bf16)
    return a.cache_bf16 ? launch_typed<true, true>(a, s) : launch_typed<true, false>(a, s);
  return a.cache_bf16 ? launch_typed<false, true>(a, s) : launch_typed<false, false>(a, s);
}

}  // namespace moelora::cuda
