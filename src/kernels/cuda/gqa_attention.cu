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
#include "kernels/cuda/sm90_moe_gemm.cuh"  // mma_bf16_16816
#include "kernels/cuda/softmax_merge.cuh"

namespace moelora::cuda {
namespace {

namespace cg = cooperative_groups;
namespace mma = sm90::detail;

constexpr int kSplit = 8;
// Warps per CTA: 16 when the clusters' CTAs fit on the H100's 132 SMs one CTA each (at most
// 16 clusters: decode batches of up to 4 tokens at 4 KV heads; few_tokens), where each warp's chain
// of positions (one at a time: load, a dot product per query head, online softmax) is what the
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

// ---- tensor-core variant (bf16 cache, larger batches) ---------------------------------------
// The scalar kernel above spends ~30 instructions per (query head, position): the warp-wide dot
// product's shuffles, the online softmax and the P.V FMAs; at batch 128 it is instruction-
// bound at ~0.65 TB/s (bench/NOTES.md). Here both products run on mma.sync m16n8k16 with the
// group's query heads as M (rows >= G are zero): per warp, tiles of 16 positions,
// S = Q.K^T (K rows are the B operand as stored), the online softmax on the accumulator
// fragments, then O += P.V with the S fragments reused as the A operand (FlashAttention-2's
// register layout). Q and P are split into bf16 hi + lo halves (two MMAs each), so products
// stay faithful to f32 operands. Each warp's O goes through shared memory into the scalar
// kernel's lane layout, and the same cluster merge finishes.
constexpr int kMmaWarps = 4;
constexpr int kMmaPos = 16;  // positions per warp tile (the P.V MMA's k)

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// x = hi + lo with hi = bf16(x), lo = bf16(x - hi), packed in pairs.
__device__ __forceinline__ void split_pack(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat16 h0 = __float2bfloat16_rn(x0), h1 = __float2bfloat16_rn(x1);
  __nv_bfloat162 h;
  h.x = h0, h.y = h1;
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = pack_bf16(x0 - __bfloat162float(h0), x1 - __bfloat162float(h1));
}

template <bool kQ, bool kOut>
__global__ void __cluster_dims__(1, 1, kSplit) __launch_bounds__(kMmaWarps * 32)
    gqa_mma_attention_kernel(const PagedAttentionArgs a) {
  constexpr int kCols = kMaxPer * 32;  // 128
  constexpr int kLd = kCols + 8;       // bf16 row stride (+16 bytes: no bank conflicts)
  __shared__ __align__(16) __nv_bfloat16 s_qh[16][kLd], s_ql[16][kLd];
  __shared__ float s_o[kMmaWarps][kMaxG][kCols];
  __shared__ attn::MergeSmem<kMmaWarps, kSplit, kMaxG, kCols> s_merge;

  const unsigned rank = cg::this_cluster().block_rank();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gr = lane / 4, qd = lane % 4;  // fragment row group, quad lane
  const int64_t t = blockIdx.x;
  const int kvh = int(blockIdx.y);
  const int d = a.head_dim, G = a.heads / a.kv_heads;
  const int h0 = kvh * G;
  const int seq = a.token_seq[t], len = a.token_pos[t] + 1;
  const auto* kc = static_cast<const __nv_bfloat16*>(a.k_cache);
  const auto* vc = static_cast<const __nv_bfloat16*>(a.v_cache);
  for (int e = threadIdx.x; e < 16 * kCols; e += kMmaWarps * 32) {
    const int g = e / kCols, c = e % kCols;
    const float x = (g < G && c < d) ? load<kQ>(a.q, (t * a.heads + h0 + g) * int64_t(d) + c) : 0.f;
    const __nv_bfloat16 hi = __float2bfloat16_rn(x);
    s_qh[g][c] = hi;
    s_ql[g][c] = __float2bfloat16_rn(x - __bfloat162float(hi));
  }
  __syncthreads();

  const int chunk = (len + kSplit - 1) / kSplit;
  const int p_begin = int(rank) * chunk, p_end = min(len, p_begin + chunk);
  const int64_t row = int64_t(a.kv_heads) * d;
  const int ksteps = d / 16, ntiles = d / 8;
  float o[kCols / 8][4];
#pragma unroll
  for (int n = 0; n < kCols / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float mx = -INFINITY, sum = 0.f;  // row gr (rows gr + 8 are padding)
  auto offset = [&](int p) {
    const int page = a.block_table[int64_t(seq) * a.max_pages + p / a.page_size];
    return (int64_t(page) * a.page_size + p % a.page_size) * row + int64_t(kvh) * d;
  };
  for (int p0 = p_begin + warp * kMmaPos; p0 < p_end; p0 += kMmaWarps * kMmaPos) {
    // Every K and V fragment of the tile is requested before any is used, so a warp keeps the
    // tile's whole 16 rows of K and V in flight (the softmax and both products wait once).
    // K: this lane's B column is position gr (+ 8); V: positions qd * 2 + {0, 1} (+ 8).
    uint32_t kb[2][kCols / 16][2], vb[kCols / 8][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int p = p0 + nt * 8 + gr;
      const bool live = p < p_end;
      const __nv_bfloat16* krow = kc + (live ? offset(p) : 0);
#pragma unroll
      for (int ks = 0; ks < kCols / 16; ++ks) {
        const int k0 = ks * 16 + qd * 2;
        const bool ok = live && ks < ksteps;
        kb[nt][ks][0] = ok ? *reinterpret_cast<const uint32_t*>(krow + k0) : 0u;
        kb[nt][ks][1] = ok ? *reinterpret_cast<const uint32_t*>(krow + k0 + 8) : 0u;
      }
    }
    {
      int64_t voff[4];
      bool vlive[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int p = p0 + qd * 2 + (i & 1) + (i >> 1) * 8;
        vlive[i] = p < p_end;
        voff[i] = vlive[i] ? offset(p) : 0;
      }
#pragma unroll
      for (int n = 0; n < kCols / 8; ++n) {
        const int c = n * 8 + gr;
        __nv_bfloat16 v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
          v[i] = vlive[i] && n < ntiles ? vc[voff[i] + c] : __float2bfloat16_rn(0.f);
        __nv_bfloat162 lo2, hi2;
        lo2.x = v[0], lo2.y = v[1];
        hi2.x = v[2], hi2.y = v[3];
        vb[n][0] = *reinterpret_cast<const uint32_t*>(&lo2);
        vb[n][1] = *reinterpret_cast<const uint32_t*>(&hi2);
      }
    }
    // S = Q . K^T over two n-tiles of 8 positions.
    float sc[2][4] = {};
#pragma unroll
    for (int ks = 0; ks < kCols / 16; ++ks) {
      if (ks >= ksteps) break;
      const int k0 = ks * 16 + qd * 2;
      uint32_t ah[4], al[4];
      ah[0] = *reinterpret_cast<const uint32_t*>(&s_qh[gr][k0]);
      ah[1] = *reinterpret_cast<const uint32_t*>(&s_qh[gr + 8][k0]);
      ah[2] = *reinterpret_cast<const uint32_t*>(&s_qh[gr][k0 + 8]);
      ah[3] = *reinterpret_cast<const uint32_t*>(&s_qh[gr + 8][k0 + 8]);
      al[0] = *reinterpret_cast<const uint32_t*>(&s_ql[gr][k0]);
      al[1] = *reinterpret_cast<const uint32_t*>(&s_ql[gr + 8][k0]);
      al[2] = *reinterpret_cast<const uint32_t*>(&s_ql[gr][k0 + 8]);
      al[3] = *reinterpret_cast<const uint32_t*>(&s_ql[gr + 8][k0 + 8]);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        mma::mma_bf16_16816(sc[nt], ah, kb[nt][ks][0], kb[nt][ks][1]);
        mma::mma_bf16_16816(sc[nt], al, kb[nt][ks][0], kb[nt][ks][1]);
      }
    }
    // Online softmax of row gr over this tile (columns qd * 2 + {0, 1} of each n-tile).
    float s4[4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int p = p0 + nt * 8 + qd * 2 + e;
        s4[nt * 2 + e] = p < p_end ? sc[nt][e] * a.scale : -INFINITY;
      }
    float tm = fmaxf(fmaxf(s4[0], s4[1]), fmaxf(s4[2], s4[3]));
    tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
    tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
    const float nm = fmaxf(mx, tm);  // finite: the tile has a live position
    const float corr = expf(mx - nm);
    float pr[4], ts = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) ts += (pr[i] = expf(s4[i] - nm));
    ts += __shfl_xor_sync(0xffffffffu, ts, 1);
    ts += __shfl_xor_sync(0xffffffffu, ts, 2);
    sum = sum * corr + ts;
    mx = nm;
    // P as the A operand (k = this tile's 16 positions), rows gr + 8 zero; hi + lo halves.
    uint32_t ph[4], pl[4];
    split_pack(pr[0], pr[1], ph[0], pl[0]);
    split_pack(pr[2], pr[3], ph[2], pl[2]);
    ph[1] = ph[3] = pl[1] = pl[3] = 0u;
#pragma unroll
    for (int n = 0; n < kCols / 8; ++n) {
      if (n >= ntiles) break;
      o[n][0] *= corr, o[n][1] *= corr;
      mma::mma_bf16_16816(o[n], ph, vb[n][0], vb[n][1]);
      mma::mma_bf16_16816(o[n], pl, vb[n][0], vb[n][1]);
    }
  }

  // Row gr's O (columns n * 8 + qd * 2 + {0, 1}) into the scalar kernel's lane layout.
  if (gr < kMaxG)
#pragma unroll
    for (int n = 0; n < kCols / 8; ++n) {
      s_o[warp][gr][n * 8 + qd * 2] = o[n][0];
      s_o[warp][gr][n * 8 + qd * 2 + 1] = o[n][1];
    }
  __syncwarp();
  float wmx[kMaxG], wsum[kMaxG], acc[kMaxG][kMaxPer];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    wmx[g] = __shfl_sync(0xffffffffu, mx, g * 4);
    wsum[g] = __shfl_sync(0xffffffffu, sum, g * 4);
#pragma unroll
    for (int j = 0; j < kMaxPer; ++j) acc[g][j] = s_o[warp][g][lane + 32 * j];
  }
  attn::merge_partials<kMmaWarps, kSplit>(
      s_merge, G, d, wmx, wsum, acc, [&](int g, int c, float v) {
        const int64_t i = (t * a.heads + h0 + g) * int64_t(d) + c;
        if constexpr (kOut)
          static_cast<__nv_bfloat16*>(a.out)[i] = __float2bfloat16_rn(v);
        else
          static_cast<float*>(a.out)[i] = v;
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

// Scalar kernel (f32 caches): batches of up to this many tokens take 16 warps per CTA. It is
// the largest power of two with tokens x kv_heads <= kFewClusters; a power of two is also a
// decode-graph bucket (1, 2, 4, 8, 16), so an eager step and the graph of its bucket (padded
// rows included) pick the same kernel.
int few_tokens(int kv_heads) {
  int f = 1;
  while (int64_t(2 * f) * kv_heads <= kFewClusters) f *= 2;
  return f;
}

template <bool kQ, bool kC>
cudaError_t launch_typed(const PagedAttentionArgs& a, cudaStream_t s) {
  // Tensor cores from a bf16 cache and head_dim a multiple of 16 (K/V rows as MMA operands),
  // at every batch. Measured on H100 (qwen3-30b-a3b, fp8 experts, ms per decode step, scalar
  // -> tensor cores): context 512 batch 1 5.88 -> 5.25, 4 9.80 -> 8.07, 16 13.02 -> 12.47, 128
  // 30.73 -> 27.54; context 2048 batch 1 6.99 -> 5.80, 4 12.07 -> 8.59, 128 59.77 -> 36.53.
  if constexpr (kC) {
    if (a.head_dim % 16 == 0) {
      const dim3 grid(unsigned(a.m), unsigned(a.kv_heads), kSplit);
      if (a.out_bf16)
        gqa_mma_attention_kernel<kQ, true><<<grid, kMmaWarps * 32, 0, s>>>(a);
      else
        gqa_mma_attention_kernel<kQ, false><<<grid, kMmaWarps * 32, 0, s>>>(a);
      return cudaGetLastError();
    }
  }
  if (a.m <= few_tokens(a.kv_heads)) return launch_warps<16, kQ, kC>(a, s);
  return launch_warps<4, kQ, kC>(a, s);
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
