// Device code and launchers of the CUDA MLA ops (kernels/mla_ops.inc). Math in f32 like the
// CPU reference; kernels are templated on the element type of each f32-or-bf16 tensor.
//   - mla_paged_attention (decode): a cluster of kPaSplit CTAs per (token, group of kHG heads)
//     splits the token's positions; each CTA runs an online softmax over its share, the CTAs
//     merge their partial (max, sum, latent) through distributed shared memory, so no
//     workspace is needed. A cache row is read once per head group (heads share the row).
//   - mla_absorb_q / mla_absorb_v: per-head GEMMs through W_UK / W_UV with each weight element
//     read once per 8 tokens.
//   - mla_expanded_attention (prefill): one CTA per (query, head), online softmax per warp.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include "kernels/cuda/mla_ops_launch.h"
#include "kernels/cuda/softmax_merge.cuh"

namespace moelora::cuda {
namespace {

namespace cg = cooperative_groups;
using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v) {
  if constexpr (sizeof(T) == 2)
    return __float2bfloat16_rn(v);
  else
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Calls f.template operator()<T>() with T = bf16 for a bf16 tensor, else float.
template <class F>
cudaError_t by_type(bool is_bf16, F&& f) {
  return is_bf16 ? f.template operator()<bf16>() : f.template operator()<float>();
}

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return unsigned(blocks < 132 * 32 ? blocks : 132 * 32);
}

// ---- rope on the rope part of each head -------------------------------------------------------
template <class T>
__global__ void mla_rope_kernel(T* x, int64_t m, int64_t cols, int stride, int offset, int rope_dim,
                                const int32_t* positions, float theta, const float* table,
                                float cos_sin_scale, bool interleaved) {
  const int half = rope_dim / 2;
  const int64_t per_token = cols / stride * half;  // (head, pair) per token
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < m * per_token;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx / per_token, rem = idx % per_token;
    const int64_t h = rem / half;
    const int i = int(rem % half);
    // f32 as transformers (and the CPU op): inv_freq = 1 / theta^(2i/d), or the caller's table.
    const float inv_freq =
        table != nullptr ? table[i] : 1.0f / powf(theta, float(2 * i) / float(rope_dim));
    const float f = float(positions[t]) * inv_freq;
    const float cs = cosf(f) * cos_sin_scale, sn = sinf(f) * cos_sin_scale;
    T* p = x + t * cols + h * stride + offset;
    const int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    const float a = to_f32(p[ia]), b = to_f32(p[ib]);
    p[ia] = from_f32<T>(a * cs - b * sn);
    p[ib] = from_f32<T>(b * cs + a * sn);
  }
}

// ---- cache write / gather --------------------------------------------------------------------
template <class TI, class TC>
__global__ void mla_cache_write_kernel(const TI* kv, const int32_t* slot_mapping, TC* cache,
                                       int64_t m, int64_t row) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < m * row;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / row, c = i % row;
    if (slot_mapping[t] < 0) continue;  // a padding row (slot -1) writes nothing
    cache[int64_t(slot_mapping[t]) * row + c] = from_f32<TC>(to_f32(kv[i]));
  }
}

template <class TC>
__global__ void mla_gather_kernel(const TC* cache, const int32_t* block_row, int page_size,
                                  int64_t len, int64_t row, float* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < len * row;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i / row, c = i % row;
    const int64_t slot = int64_t(block_row[j / page_size]) * page_size + j % page_size;
    out[i] = to_f32(cache[slot * row + c]);
  }
}

// ---- absorb q: q_latent[t, h, c] = sum_i q_nope[t, h, i] W_UK[h][i, c]; rope part copied ------
constexpr int kAqCols = 128, kAqTok = 8, kAqChunk = 32;

template <class TQ>
__global__ void __launch_bounds__(kAqCols)
    mla_absorb_q_kernel(const TQ* q, const bf16* w, float* ql, int64_t m, int nope, int rope,
                        int vd, int64_t L) {
  const int h = blockIdx.y, heads = gridDim.y, qk = nope + rope;
  const int64_t c = int64_t(blockIdx.x) * kAqCols + threadIdx.x;
  const int64_t t0 = int64_t(blockIdx.z) * kAqTok;
  const int64_t q_row = int64_t(heads) * qk, l_row = int64_t(heads) * (L + rope);
  __shared__ float qs[kAqTok][kAqChunk];
  float acc[kAqTok] = {};
  for (int i0 = 0; i0 < nope; i0 += kAqChunk) {
    __syncthreads();
    for (int e = threadIdx.x; e < kAqTok * kAqChunk; e += kAqCols) {
      const int tt = e / kAqChunk, ii = e % kAqChunk;
      qs[tt][ii] = (t0 + tt < m && i0 + ii < nope)
                       ? to_f32(q[(t0 + tt) * q_row + int64_t(h) * qk + i0 + ii])
                       : 0.f;
    }
    __syncthreads();
    if (c < L) {
      const int n = min(kAqChunk, nope - i0);
      const bf16* wc = w + (int64_t(h) * (nope + vd) + i0) * L + c;
      for (int ii = 0; ii < n; ++ii) {
        const float wv = __bfloat162float(wc[int64_t(ii) * L]);
#pragma unroll
        for (int tt = 0; tt < kAqTok; ++tt) acc[tt] = fmaf(qs[tt][ii], wv, acc[tt]);
      }
    }
  }
  if (c < L)
#pragma unroll
    for (int tt = 0; tt < kAqTok; ++tt)
      if (t0 + tt < m) ql[(t0 + tt) * l_row + int64_t(h) * (L + rope) + c] = acc[tt];
  // The first column tile also copies the rope part.
  if (blockIdx.x == 0)
    for (int e = threadIdx.x; e < kAqTok * rope; e += kAqCols) {
      const int tt = e / rope, i = e % rope;
      if (t0 + tt < m)
        ql[(t0 + tt) * l_row + int64_t(h) * (L + rope) + L + i] =
            to_f32(q[(t0 + tt) * q_row + int64_t(h) * qk + nope + i]);
    }
}

// ---- absorb v: out[t, h, i] = W_UV[h][i, :] . latent[t, h, :] -----------------------------
constexpr int kAvRows = 2, kAvTok = 8, kAvWarps = 4;

template <class TO>
__global__ void __launch_bounds__(kAvWarps * 32)
    mla_absorb_v_kernel(const float* lat, const bf16* w, TO* out, int64_t m, int nope, int vd,
                        int64_t L) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, heads = gridDim.y;
  const int i0 = (int(blockIdx.x) * kAvWarps + warp) * kAvRows;
  const int64_t t0 = int64_t(blockIdx.z) * kAvTok;
  if (i0 >= vd) return;
  const bf16* wh = w + (int64_t(h) * (nope + vd) + nope + i0) * L;
  float acc[kAvRows][kAvTok] = {};
  for (int64_t c = lane; c < L; c += 32) {
    float wv[kAvRows];
#pragma unroll
    for (int r = 0; r < kAvRows; ++r) wv[r] = i0 + r < vd ? __bfloat162float(wh[r * L + c]) : 0.f;
#pragma unroll
    for (int tt = 0; tt < kAvTok; ++tt) {
      if (t0 + tt >= m) break;
      const float x = lat[((t0 + tt) * heads + h) * L + c];
#pragma unroll
      for (int r = 0; r < kAvRows; ++r) acc[r][tt] = fmaf(wv[r], x, acc[r][tt]);
    }
  }
#pragma unroll
  for (int r = 0; r < kAvRows; ++r)
#pragma unroll
    for (int tt = 0; tt < kAvTok; ++tt) {
      const float v = warp_sum(acc[r][tt]);
      if (lane == 0 && i0 + r < vd && t0 + tt < m)
        out[((t0 + tt) * heads + h) * vd + i0 + r] = from_f32<TO>(v);
    }
}

// ---- paged latent attention ------------------------------------------------------------------
constexpr int kPaWarps = 4, kPaSplit = 8;

// Online-softmax state of one warp for kHG heads over positions; lane owns row elements
// c = lane + 32 j (j < kPer).
template <class TC, int kHG, int kPer>
__global__ void __cluster_dims__(1, 1, kPaSplit) __launch_bounds__(kPaWarps * 32)
    mla_paged_attention_kernel(const MlaAttentionArgs a) {
  constexpr int kCols = kPer * 32;
  __shared__ float s_q[kHG][kCols];
  __shared__ attn::MergeSmem<kPaWarps, kPaSplit, kHG, kCols> s_merge;

  const unsigned rank = cg::this_cluster().block_rank();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = blockIdx.x;
  const int h0 = int(blockIdx.y) * kHG;
  const int row = a.row, L = a.L;
  const int seq = a.token_seq[t], len = a.token_pos[t] + 1;
  for (int e = threadIdx.x; e < kHG * kCols; e += kPaWarps * 32) {
    const int g = e / kCols, c = e % kCols;
    s_q[g][c] = c < row ? a.q_latent[(t * a.heads + h0 + g) * row + c] : 0.f;
  }
  __syncthreads();

  const int chunk = (len + kPaSplit - 1) / kPaSplit;
  const int p_begin = int(rank) * chunk, p_end = min(len, p_begin + chunk);
  const TC* cache = static_cast<const TC*>(a.cache);
  float mx[kHG], sum[kHG], acc[kHG][kPer];
#pragma unroll
  for (int g = 0; g < kHG; ++g) {
    mx[g] = -INFINITY;
    sum[g] = 0.f;
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[g][j] = 0.f;
  }
  for (int p = p_begin + warp; p < p_end; p += kPaWarps) {
    const int page = a.block_table[int64_t(seq) * a.max_pages + p / a.page_size];
    const TC* kr = cache + (int64_t(page) * a.page_size + p % a.page_size) * row;
    float k[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int c = lane + 32 * j;
      k[j] = c < row ? to_f32(kr[c]) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < kHG; ++g) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < kPer; ++j) s = fmaf(s_q[g][lane + 32 * j], k[j], s);
      attn::online_step(mx[g], sum[g], acc[g], warp_sum(s) * a.scale, k);
    }
  }

  attn::merge_partials<kPaWarps, kPaSplit>(
      s_merge, kHG, L, mx, sum, acc,
      [&](int g, int c, float o) { a.latent[(t * a.heads + h0 + g) * L + c] = o; });
}

// ---- kv_b_proj LoRA on the absorbed path -----------------------------------------------------
constexpr int kLoraThreads = 128;

// q side: u = q_nope[h] . B_K[h] ([rank]), q_latent[h][:L] += u . A.
template <class TQ>
__global__ void __launch_bounds__(kLoraThreads)
    mla_lora_q_kernel(const MlaLoraArgs a, const TQ* q, float* ql) {
  extern __shared__ float u[];
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y, slot = a.token_slot[t];
  if (slot < 0) return;
  const int rank = min(int64_t(a.ranks[slot]), a.r_max);
  if (rank <= 0) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, qk = a.nope + a.rope;
  const int64_t rows = int64_t(a.heads) * (a.nope + a.vd);
  const bf16* B = static_cast<const bf16*>(a.B) + (slot * rows + int64_t(h) * (a.nope + a.vd)) * a.r_max;
  const bf16* A = static_cast<const bf16*>(a.A) + int64_t(slot) * a.r_max * a.L;
  const TQ* qh = q + t * a.heads * qk + int64_t(h) * qk;
  for (int r = warp; r < rank; r += kLoraThreads / 32) {
    float s = 0.f;
    for (int i = lane; i < a.nope; i += 32) s = fmaf(to_f32(qh[i]), __bfloat162float(B[i * a.r_max + r]), s);
    s = warp_sum(s);
    if (lane == 0) u[r] = s;
  }
  __syncthreads();
  float* o = ql + (t * a.heads + h) * (a.L + a.rope);
  for (int64_t c = threadIdx.x; c < a.L; c += kLoraThreads) {
    float s = 0.f;
    for (int r = 0; r < rank; ++r) s = fmaf(u[r], __bfloat162float(A[r * a.L + c]), s);
    o[c] += s;
  }
}

// v side: u = A . latent[h] ([rank]), out[h] += B_V[h] . u.
__global__ void __launch_bounds__(kLoraThreads)
    mla_lora_v_kernel(const MlaLoraArgs a, const float* lat, float* out) {
  extern __shared__ float u[];
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y, slot = a.token_slot[t];
  if (slot < 0) return;
  const int rank = min(int64_t(a.ranks[slot]), a.r_max);
  if (rank <= 0) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = int64_t(a.heads) * (a.nope + a.vd);
  const bf16* B =
      static_cast<const bf16*>(a.B) + (slot * rows + int64_t(h) * (a.nope + a.vd) + a.nope) * a.r_max;
  const bf16* A = static_cast<const bf16*>(a.A) + int64_t(slot) * a.r_max * a.L;
  const float* lh = lat + (t * a.heads + h) * a.L;
  for (int r = warp; r < rank; r += kLoraThreads / 32) {
    float s = 0.f;
    for (int64_t c = lane; c < a.L; c += 32) s = fmaf(lh[c], __bfloat162float(A[r * a.L + c]), s);
    s = warp_sum(s);
    if (lane == 0) u[r] = s;
  }
  __syncthreads();
  float* o = out + (t * a.heads + h) * a.vd;
  for (int i = threadIdx.x; i < a.vd; i += kLoraThreads) {
    float s = 0.f;
    for (int r = 0; r < rank; ++r) s = fmaf(u[r], __bfloat162float(B[int64_t(i) * a.r_max + r]), s);
    o[i] += s;
  }
}

// ---- expanded attention (prefill): one CTA per (query, head) ----------------------------------
constexpr int kEaWarps = 4, kEaPer = kMlaMaxHeadDim / 32;

__global__ void __launch_bounds__(kEaWarps * 32) mla_expanded_attention_kernel(const MlaExpandedArgs a) {
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int qk = a.nope + a.rope, wr = a.nope + a.vd;
  const int64_t kv_row = int64_t(a.heads) * wr;
  const int cnt = a.token_pos[t] + 1;
  float q[kEaPer], acc[kEaPer];
#pragma unroll
  for (int j = 0; j < kEaPer; ++j) {
    const int c = lane + 32 * j;
    q[j] = c < qk ? a.q[(t * a.heads + h) * qk + c] : 0.f;
    acc[j] = 0.f;
  }
  float mx = -INFINITY, sum = 0.f;
  for (int p = warp; p < cnt; p += kEaWarps) {
    const float* kv = a.kv_b_out + p * kv_row + int64_t(h) * wr;  // k_nope then v
    const float* k_pe = a.latent + p * a.row + a.L;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kEaPer; ++j) {
      const int c = lane + 32 * j;
      if (c < a.nope)
        s = fmaf(q[j], kv[c], s);
      else if (c < qk)
        s = fmaf(q[j], k_pe[c - a.nope], s);
    }
    s = warp_sum(s) * a.scale;
    const float new_mx = fmaxf(mx, s);
    const float corr = expf(mx - new_mx), e = expf(s - new_mx);
    sum = sum * corr + e;
#pragma unroll
    for (int j = 0; j < kEaPer; ++j) {
      const int c = lane + 32 * j;
      acc[j] = fmaf(acc[j], corr, c < a.vd ? e * kv[a.nope + c] : 0.f);
    }
    mx = new_mx;
  }
  __shared__ float s_mx[kEaWarps], s_sum[kEaWarps], s_acc[kEaWarps][kMlaMaxHeadDim];
  if (lane == 0) s_mx[warp] = mx, s_sum[warp] = sum;
#pragma unroll
  for (int j = 0; j < kEaPer; ++j) s_acc[warp][lane + 32 * j] = acc[j];
  __syncthreads();
  float gm = -INFINITY;
  for (int w = 0; w < kEaWarps; ++w)
    if (s_sum[w] > 0.f) gm = fmaxf(gm, s_mx[w]);
  float wt[kEaWarps], gs = 0.f;
  for (int w = 0; w < kEaWarps; ++w) {
    wt[w] = s_sum[w] > 0.f ? expf(s_mx[w] - gm) : 0.f;
    gs += s_sum[w] * wt[w];
  }
  for (int c = threadIdx.x; c < a.vd; c += kEaWarps * 32) {
    float o = 0.f;
    for (int w = 0; w < kEaWarps; ++w) o += s_acc[w][c] * wt[w];
    a.out[(t * a.heads + h) * a.vd + c] = o / gs;
  }
}

template <class TC, int kHG, int kPer>
cudaError_t paged_attention_as(const MlaAttentionArgs& a, cudaStream_t s) {
  const dim3 grid(unsigned(a.m), unsigned(a.heads / kHG), kPaSplit);
  mla_paged_attention_kernel<TC, kHG, kPer><<<grid, kPaWarps * 32, 0, s>>>(a);
  return cudaGetLastError();
}

template <class TC, int kHG>
cudaError_t paged_attention_per(const MlaAttentionArgs& a, cudaStream_t s) {
  if (a.row <= 64) return paged_attention_as<TC, kHG, 2>(a, s);
  if (a.row <= 256) return paged_attention_as<TC, kHG, 8>(a, s);
  if (a.row <= 576) return paged_attention_as<TC, kHG, 18>(a, s);
  return paged_attention_as<TC, kHG, 32>(a, s);
}

}  // namespace

cudaError_t launch_mla_rope(void* x, bool x_bf16, int64_t m, int64_t cols, int head_stride,
                            int rope_offset, int rope_dim, const int32_t* positions, float theta,
                            const float* inv_freq, float cos_sin_scale, bool interleaved,
                            cudaStream_t s) {
  const int64_t pairs = m * (cols / head_stride) * (rope_dim / 2);
  if (pairs == 0) return cudaSuccess;
  return by_type(x_bf16, [&]<class T>() {
    mla_rope_kernel<T><<<grid_for(pairs, 256), 256, 0, s>>>(
        static_cast<T*>(x), m, cols, head_stride, rope_offset, rope_dim, positions, theta, inv_freq,
        cos_sin_scale, interleaved);
    return cudaGetLastError();
  });
}

cudaError_t launch_mla_cache_write(const void* kv, bool kv_bf16, const int32_t* slot_mapping,
                                   void* cache, bool cache_bf16, int64_t m, int64_t row,
                                   cudaStream_t s) {
  if (m * row == 0) return cudaSuccess;
  return by_type(kv_bf16, [&]<class TI>() {
    return by_type(cache_bf16, [&]<class TC>() {
      mla_cache_write_kernel<TI, TC><<<grid_for(m * row, 256), 256, 0, s>>>(
          static_cast<const TI*>(kv), slot_mapping, static_cast<TC*>(cache), m, row);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_mla_absorb_q(const void* q, bool q_bf16, const void* w_kv_b, float* q_latent,
                                int64_t m, int heads, int nope, int rope, int vd, int64_t L,
                                cudaStream_t s) {
  if (m == 0) return cudaSuccess;
  const int64_t gx = (L + kAqCols - 1) / kAqCols, gz = (m + kAqTok - 1) / kAqTok;
  if (gx > 0x7fffffff || heads > 65535 || gz > 65535) return cudaErrorInvalidValue;
  const auto* w = static_cast<const bf16*>(w_kv_b);
  return by_type(q_bf16, [&]<class T>() {
    mla_absorb_q_kernel<T><<<dim3(unsigned(gx), unsigned(heads), unsigned(gz)), kAqCols, 0, s>>>(
        static_cast<const T*>(q), w, q_latent, m, nope, rope, vd, L);
    return cudaGetLastError();
  });
}

cudaError_t launch_mla_paged_attention(const MlaAttentionArgs& a, cudaStream_t s) {
  if (a.m == 0) return cudaSuccess;
  if (a.row > kMlaMaxRow || a.L >= a.row || a.m > 0x7fffffff || a.heads > 65535)
    return cudaErrorInvalidValue;
  // Four heads per cluster when they divide evenly: each cache row is read once per 4 heads.
  return by_type(a.cache_bf16, [&]<class TC>() {
    return a.heads % 4 == 0 ? paged_attention_per<TC, 4>(a, s) : paged_attention_per<TC, 1>(a, s);
  });
}

cudaError_t launch_mla_absorb_v(const float* latent, const void* w_kv_b, void* out,
                                bool out_bf16, int64_t m, int heads, int nope, int vd, int64_t L,
                                cudaStream_t s) {
  if (m == 0) return cudaSuccess;
  const int64_t gx = (vd + kAvRows * kAvWarps - 1) / (kAvRows * kAvWarps);
  const int64_t gz = (m + kAvTok - 1) / kAvTok;
  if (heads > 65535 || gz > 65535) return cudaErrorInvalidValue;
  const auto* w = static_cast<const bf16*>(w_kv_b);
  return by_type(out_bf16, [&]<class T>() {
    mla_absorb_v_kernel<T><<<dim3(unsigned(gx), unsigned(heads), unsigned(gz)), kAvWarps * 32, 0,
                             s>>>(latent, w, static_cast<T*>(out), m, nope, vd, L);
    return cudaGetLastError();
  });
}

cudaError_t launch_mla_lora_absorb_q(const MlaLoraArgs& a, const void* q, bool q_bf16,
                                     float* q_latent, cudaStream_t s) {
  if (a.m == 0 || a.r_max == 0) return cudaSuccess;
  if (a.r_max > kMlaMaxLoraRank || a.m > 0x7fffffff || a.heads > 65535)
    return cudaErrorInvalidValue;
  const dim3 grid(unsigned(a.m), unsigned(a.heads));
  const size_t smem = size_t(a.r_max) * sizeof(float);
  return by_type(q_bf16, [&]<class T>() {
    mla_lora_q_kernel<T><<<grid, kLoraThreads, smem, s>>>(a, static_cast<const T*>(q), q_latent);
    return cudaGetLastError();
  });
}

cudaError_t launch_mla_lora_absorb_v(const MlaLoraArgs& a, const float* latent, float* out,
                                     cudaStream_t s) {
  if (a.m == 0 || a.r_max == 0) return cudaSuccess;
  if (a.r_max > kMlaMaxLoraRank || a.m > 0x7fffffff || a.heads > 65535)
    return cudaErrorInvalidValue;
  const dim3 grid(unsigned(a.m), unsigned(a.heads));
  mla_lora_v_kernel<<<grid, kLoraThreads, size_t(a.r_max) * sizeof(float), s>>>(a, latent, out);
  return cudaGetLastError();
}

cudaError_t launch_mla_gather_latent(const void* cache, bool cache_bf16, const int32_t* block_row,
                                     int page_size, int64_t len, int64_t row, float* out,
                                     cudaStream_t s) {
  if (len * row == 0) return cudaSuccess;
  return by_type(cache_bf16, [&]<class TC>() {
    mla_gather_kernel<TC><<<grid_for(len * row, 256), 256, 0, s>>>(
        static_cast<const TC*>(cache), block_row, page_size, len, row, out);
    return cudaGetLastError();
  });
}

cudaError_t launch_mla_expanded_attention(const MlaExpandedArgs& a, cudaStream_t s) {
  if (a.n == 0) return cudaSuccess;
  if (a.nope + a.rope > kMlaMaxHeadDim || a.vd > kMlaMaxHeadDim || a.n > 0x7fffffff ||
      a.heads > 65535)
    return cudaErrorInvalidValue;
  mla_expanded_attention_kernel<<<dim3(unsigned(a.n), unsigned(a.heads)), kEaWarps * 32, 0, s>>>(
      a);
  return cudaGetLastError();
}

}  // namespace moelora::cuda
