// Device code and launchers of the CUDA dense ops (kernels/dense_ops.inc). Activations are f32
// or bf16 (a template flag per tensor), math in f32 like the CPU reference. These are the
// straightforward kernels a model needs to run on the GPU at all; the decode-critical ones
// (linear, attention) are sized for decode batches: linear streams each weight row once per
// 8 tokens, attention runs one CTA per (token, head) with an online softmax over the pages.
// Linears above kGemvMaxRows rows run on cuBLAS instead (cublas_linear.h).
#include <cuda_bf16.h>

#include <cfloat>
#include <climits>

#include "kernels/cuda/act_io.cuh"
#include "kernels/cuda/dense_ops_launch.h"
#include "kernels/cuda/pdl_launch.cuh"

namespace moelora::cuda {
namespace {

using detail::pdl_trigger;
using detail::pdl_wait;

using act_io::load;
using act_io::store;

// Calls f.template operator()<a, b>() for the runtime flags (a, b).
template <class F>
cudaError_t dispatch2(bool a, bool b, F&& f) {
  if (a) return b ? f.template operator()<true, true>() : f.template operator()<true, false>();
  return b ? f.template operator()<false, true>() : f.template operator()<false, false>();
}

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return unsigned(blocks < 132 * 32 ? blocks : 132 * 32);
}

// ---- embedding -----------------------------------------------------------------------------
template <bool kOut>
__global__ void embedding_kernel(const int32_t* ids, const __nv_bfloat16* table, void* out,
                                 int64_t m, int64_t h) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < m * h;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / h, c = i % h;
    store<kOut>(out, i, __bfloat162float(table[int64_t(ids[t]) * h + c]));
  }
}

// ---- rms_norm: one CTA per row ---------------------------------------------------------------
// 1 / rms of a row whose thread-strided sum of squares each thread holds in `ss` (the same code
// for rms_norm_kernel and attention_prologue_kernel, so their results agree bit for bit).
__device__ __forceinline__ float rms_inverse(float ss, int64_t d, float eps, float* part) {
  for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) part[0] = v;
  }
  __syncthreads();
  return 1.0f / sqrtf(part[0] / float(d) + eps);
}

__device__ __forceinline__ float rms_scale(float v, float inv, __nv_bfloat16 w) {
  return v * inv * __bfloat162float(w);
}

// Threads per row: the attention prologue's per-head norms use the same (rows of < 1024).
__host__ __device__ constexpr int rms_norm_threads(int64_t d) {
  return d >= 1024 ? 512 : 128;
}

template <bool kX, bool kOut>
__global__ void rms_norm_kernel(const void* x, const __nv_bfloat16* w, float eps, void* out,
                                int64_t d) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  const int64_t r = blockIdx.x;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = load<kX>(x, r * d + i);
    ss += v * v;
  }
  __shared__ float part[32];
  const float inv = rms_inverse(ss, d, eps, part);
  // out may alias x: every thread read its elements above, and writes the same ones.
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    store<kOut>(out, r * d + i, rms_scale(load<kX>(x, r * d + i), inv, w[i]));
}

// ---- linear: a warp per 2 weight rows x 8 tokens ----------------------------------------
constexpr int kLinRows = 2, kLinTok = 8, kLinWarps = 4;

template <bool kX>
__device__ __forceinline__ void load8(const void* x, int64_t off, float (&v)[8]) {
  if constexpr (kX) {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(x) + off);
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(p[i]);
      v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
  } else {
    const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(x) + off);
    const float4 b = *reinterpret_cast<const float4*>(static_cast<const float*>(x) + off + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  }
}

template <bool kX, bool kY>
__global__ void __launch_bounds__(kLinWarps * 32)
    linear_kernel(const void* x, const __nv_bfloat16* w, void* y, int64_t m, int64_t n, int64_t k) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (int64_t(blockIdx.x) * kLinWarps + warp) * kLinRows;
  const int64_t t0 = int64_t(blockIdx.y) * kLinTok;
  // The weights do not depend on the previous kernel: start pulling this warp's rows into L2
  // while it still runs (programmatic dependent launch, pdl_launch.cuh), then wait for x.
  for (int r = 0; r < kLinRows; ++r)
    if (n0 + r < n)
      for (int64_t c = int64_t(lane) * 64; c < k; c += 32 * 64)  // one 128-byte line per lane
        asm volatile("prefetch.global.L2 [%0];" ::"l"(w + (n0 + r) * k + c));
  pdl_wait();
  pdl_trigger();
  if (n0 >= n) return;
  float acc[kLinRows][kLinTok] = {};
  for (int64_t c = int64_t(lane) * 8; c < k; c += 32 * 8) {
    float wv[kLinRows][8];
#pragma unroll
    for (int r = 0; r < kLinRows; ++r) {
      if (n0 + r < n) {
        load8<true>(w, (n0 + r) * k + c, wv[r]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) wv[r][i] = 0.f;
      }
    }
#pragma unroll
    for (int t = 0; t < kLinTok; ++t) {
      if (t0 + t >= m) break;
      float xv[8];
      load8<kX>(x, (t0 + t) * k + c, xv);
#pragma unroll
      for (int r = 0; r < kLinRows; ++r)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r][t] = fmaf(wv[r][i], xv[i], acc[r][t]);
    }
  }
#pragma unroll
  for (int r = 0; r < kLinRows; ++r)
#pragma unroll
    for (int t = 0; t < kLinTok; ++t) {
      float v = acc[r][t];
      for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && n0 + r < n && t0 + t < m) store<kY>(y, (t0 + t) * n + n0 + r, v);
    }
}

// ---- rope ------------------------------------------------------------------------------------

// (a, b) = (x[i], x[i + d/2]) of one head rotated by position `pos` (the rotate-half layout),
// f32 as transformers: inv_freq = 1 / theta^(2i/d) (or table[i]), angle = position * inv_freq,
// cos and sin times `scale` (exact at 1).
__device__ __forceinline__ void rope_pair(float& a, float& b, int32_t pos, int i, int head_dim,
                                          float theta, const float* table, float scale) {
  const float inv_freq =
      table != nullptr ? table[i] : 1.0f / powf(theta, float(2 * i) / float(head_dim));
  const float f = float(pos) * inv_freq;
  const float cs = cosf(f) * scale, sn = sinf(f) * scale;
  const float ra = a * cs - b * sn, rb = b * cs + a * sn;
  a = ra, b = rb;
}

template <bool kX>
__global__ void rope_kernel(void* x, int64_t m, int64_t cols, int head_dim,
                            const int32_t* positions, float theta, const float* table,
                            float scale) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  const int half = head_dim / 2;
  const int64_t per_token = cols / 2;  // (head, i) pairs
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < m * per_token;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx / per_token, rem = idx % per_token;
    const int64_t head = rem / half;
    const int i = int(rem % half);
    const int64_t base = t * cols + head * head_dim;
    float a = load<kX>(x, base + i), b = load<kX>(x, base + i + half);
    rope_pair(a, b, positions[t], i, head_dim, theta, table, scale);
    store<kX>(x, base + i, a);
    store<kX>(x, base + i + half, b);
  }
}

// ---- kv cache write --------------------------------------------------------------------------
template <bool kIn, bool kCache>
__global__ void kv_write_kernel(const void* k, const void* v, const int32_t* slot_mapping, void* kc,
                                void* vc, int64_t m, int64_t row) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < m * row;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / row, c = i % row;
    if (slot_mapping[t] < 0) continue;  // a padding row
    const int64_t dst = int64_t(slot_mapping[t]) * row + c;
    store<kCache>(kc, dst, load<kIn>(k, i));
    store<kCache>(vc, dst, load<kIn>(v, i));
  }
}

// ---- attention prologue: per-head norms, rope and the cache write in one pass ---------------
// One CTA per (token, head): q heads first, then kv heads (k normed and rotated, then k and v
// written to the cache). The head is staged in shared memory between the norm and rope, with
// rms_norm_kernel's block size and reduction and rope_kernel's arithmetic, so q, k and the
// cache get the bits of rms_norm, rope and kv_cache_write run one after another.
template <bool kCache>
__global__ void __launch_bounds__(rms_norm_threads(0))
    attention_prologue_kernel(const AttentionPrologueArgs a) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  __shared__ float row[kPrologueMaxHeadDim];
  __shared__ float part[32];
  const int64_t t = blockIdx.x;
  const int d = a.head_dim, half = d / 2;
  const bool is_q = int(blockIdx.y) < a.heads;
  const int head = is_q ? int(blockIdx.y) : int(blockIdx.y) - a.heads;
  float* x = is_q ? a.q + (t * a.heads + head) * d : a.k + (t * a.kv_heads + head) * d;
  const auto* w = static_cast<const __nv_bfloat16*>(is_q ? a.q_norm : a.k_norm);
  for (int i = threadIdx.x; i < d; i += blockDim.x) row[i] = x[i];
  if (w != nullptr) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      const float v = row[i];
      ss += v * v;
    }
    const float inv = rms_inverse(ss, d, a.eps, part);
    for (int i = threadIdx.x; i < d; i += blockDim.x) row[i] = rms_scale(row[i], inv, w[i]);
  }
  __syncthreads();
  const int32_t pos = a.positions[t];
  const int slot = is_q ? -1 : a.slot_mapping[t];
  const int64_t kv_row = int64_t(a.kv_heads) * d;
  const int64_t dst = int64_t(slot) * kv_row + int64_t(head) * d;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float lo = row[i], hi = row[i + half];
    rope_pair(lo, hi, pos, i, d, a.theta, a.inv_freq, a.cos_sin_scale);
    x[i] = lo;
    x[i + half] = hi;
    if (slot >= 0) {
      store<kCache>(a.k_cache, dst + i, lo);
      store<kCache>(a.k_cache, dst + i + half, hi);
    }
  }
  if (slot >= 0) {
    const float* v = a.v + t * kv_row + int64_t(head) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) store<kCache>(a.v_cache, dst + i, v[i]);
  }
}

// ---- paged attention: one CTA (16 warps) per (token, head), online softmax ------------------
// (The fallback for shapes gqa_attention.cu's kernel does not take.)
// Each warp walks every 16th position: a position costs a chain of dependent loads (page, K,
// the dot product, V), so the warps are what keeps bytes in flight (4 warps measured ~20x the
// byte floor at 512 positions in bench decode).
constexpr int kAttnWarps = 16, kMaxHeadDim = 256, kPerLane = kMaxHeadDim / 32;

template <bool kQ, bool kCache, bool kOut>
__global__ void __launch_bounds__(kAttnWarps * 32)
    paged_attention_kernel(const PagedAttentionArgs a) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d = a.head_dim, kvh = h / (a.heads / a.kv_heads);
  const int seq = a.token_seq[t], len = a.token_pos[t] + 1;
  const int per_lane = (d + 31) / 32;  // elements of the head each lane owns: c = lane + 32 j
  float q[kPerLane], acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int c = lane + 32 * j;
    q[j] = (j < per_lane && c < d) ? load<kQ>(a.q, t * int64_t(a.heads) * d + int64_t(h) * d + c)
                                   : 0.f;
    acc[j] = 0.f;
  }
  float mx = -FLT_MAX, sum = 0.f;
  const int64_t row = int64_t(a.kv_heads) * d;
  for (int p = warp; p < len; p += kAttnWarps) {
    const int page = a.block_table[int64_t(seq) * a.max_pages + p / a.page_size];
    const int64_t off = (int64_t(page) * a.page_size + p % a.page_size) * row + int64_t(kvh) * d;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int c = lane + 32 * j;
      if (j < per_lane && c < d) s += q[j] * load<kCache>(a.k_cache, off + c);
    }
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    s *= a.scale;
    const float new_mx = fmaxf(mx, s);
    const float corr = expf(mx - new_mx), e = expf(s - new_mx);
    sum = sum * corr + e;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int c = lane + 32 * j;
      const float vv = (j < per_lane && c < d) ? load<kCache>(a.v_cache, off + c) : 0.f;
      acc[j] = acc[j] * corr + e * vv;
    }
    mx = new_mx;
  }
  // Combine the warps' partial softmaxes.
  __shared__ float s_mx[kAttnWarps], s_sum[kAttnWarps];
  __shared__ float s_acc[kAttnWarps][kMaxHeadDim];
  if (lane == 0) s_mx[warp] = mx, s_sum[warp] = sum;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int c = lane + 32 * j;
    if (c < kMaxHeadDim) s_acc[warp][c] = acc[j];
  }
  __syncthreads();
  float gmx = -FLT_MAX;
  for (int w = 0; w < kAttnWarps; ++w) gmx = fmaxf(gmx, s_mx[w]);
  float gsum = 0.f;
  for (int w = 0; w < kAttnWarps; ++w)
    if (s_sum[w] > 0.f) gsum += s_sum[w] * expf(s_mx[w] - gmx);
  for (int c = threadIdx.x; c < d; c += kAttnWarps * 32) {
    float o = 0.f;
    for (int w = 0; w < kAttnWarps; ++w)
      if (s_sum[w] > 0.f) o += s_acc[w][c] * expf(s_mx[w] - gmx);
    store<kOut>(a.out, t * int64_t(a.heads) * d + int64_t(h) * d + c, o / gsum);
  }
}

// ---- elementwise ------------------------------------------------------------------------------
template <bool kOut>
__global__ void silu_mul_kernel(const float* gu, void* out, int64_t m, int64_t inter) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < m * inter;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / inter, c = i % inter;
    const float g = gu[t * 2 * inter + c];
    store<kOut>(out, i, g / (1.0f + expf(-g)) * gu[t * 2 * inter + inter + c]);
  }
}

template <bool kX, bool kY>
__global__ void residual_add_kernel(void* x, const void* y, int64_t n) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store<kX>(x, i, load<kX>(x, i) + load<kY>(y, i));
}

// ---- model step ops: strided row copy (cast / copy_columns / gather_rows), router margin ----
template <bool kS, bool kD>
__global__ void copy_rows_kernel(const void* src, int64_t src_cols, int64_t col,
                                 const int32_t* rows, void* dst, int64_t m, int64_t width) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < m * width;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, c = i % width;
    const int64_t sr = rows ? int64_t(rows[r]) : r;
    store<kD>(dst, i, load<kS>(src, sr * src_cols + col + c));
  }
}

constexpr int kMarginWarps = 4, kMarginMaxE = 32 * 32;

// One warp per token: k + 1 rounds of a warp argmax (larger value, then lower index) over the
// logits not taken yet, so equal logits count separately as in the CPU's sort. Each lane owns
// elements lane + 32 j and marks the taken ones in a 32-bit mask (hence E <= 1024).
__global__ void __launch_bounds__(kMarginWarps * 32)
    router_margin_kernel(const float* logits, int64_t m, int e, int k, float* margin, int64_t cols,
                         int64_t col) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  const int lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * kMarginWarps + threadIdx.x / 32;
  if (t >= m) return;
  float* dst = margin + t * cols + col;
  if (k >= e) {
    if (lane == 0) *dst = INFINITY;
    return;
  }
  const float* row = logits + t * e;
  uint32_t taken = 0;
  float kth = 0.f;
  for (int round = 0; round <= k; ++round) {
    float best = -INFINITY;
    int best_i = INT_MAX;  // INT_MAX: this lane has nothing left
    for (int j = 0; lane + 32 * j < e; ++j) {
      if ((taken >> j) & 1u) continue;
      const float v = row[lane + 32 * j];
      if (best_i == INT_MAX || v > best) best = v, best_i = lane + 32 * j;
    }
    for (int o = 16; o > 0; o /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
      if (oi != INT_MAX && (best_i == INT_MAX || ov > best || (ov == best && oi < best_i)))
        best = ov, best_i = oi;
    }
    if (best_i % 32 == lane) taken |= 1u << (best_i / 32);
    if (round == k - 1) kth = best;
    if (round == k && lane == 0) *dst = kth - best;
  }
}

}  // namespace

cudaError_t launch_embedding(const int32_t* ids, const void* table, void* out, bool out_bf16,
                             int64_t m, int64_t h, cudaStream_t s) {
  if (m * h == 0) return cudaSuccess;
  const auto* tb = static_cast<const __nv_bfloat16*>(table);
  if (out_bf16)
    return detail::launch_pdl(embedding_kernel<true>, dim3(grid_for(m * h, 256)), dim3(256), 0, s,
                              ids, tb, out, m, h);
  return detail::launch_pdl(embedding_kernel<false>, dim3(grid_for(m * h, 256)), dim3(256), 0, s,
                            ids, tb, out, m, h);
}

cudaError_t launch_rms_norm(const void* x, bool x_bf16, const void* weight, float eps, void* out,
                            bool out_bf16, int64_t rows, int64_t d, cudaStream_t s) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  const auto* w = static_cast<const __nv_bfloat16*>(weight);
  const int threads = rms_norm_threads(d);
  return dispatch2(x_bf16, out_bf16, [&]<bool kX, bool kO>() {
    return detail::launch_pdl(rms_norm_kernel<kX, kO>, dim3(unsigned(rows)), dim3(threads), 0, s, x,
                              w, eps, out, d);
  });
}

cudaError_t launch_linear(const void* x, bool x_bf16, const void* w, void* y, bool y_bf16,
                          int64_t m, int64_t n, int64_t k, cudaStream_t s) {
  if (m * n == 0) return cudaSuccess;
  if (k % 8 != 0) return cudaErrorInvalidValue;
  const int64_t gx = (n + kLinRows * kLinWarps - 1) / (kLinRows * kLinWarps);
  const int64_t gy = (m + kLinTok - 1) / kLinTok;
  if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidValue;
  const auto* wb = static_cast<const __nv_bfloat16*>(w);
  return dispatch2(x_bf16, y_bf16, [&]<bool kX, bool kY>() {
    return detail::launch_pdl(linear_kernel<kX, kY>, dim3(dim3(unsigned(gx), unsigned(gy))),
                              dim3(kLinWarps * 32), 0, s, x, wb, y, m, n, k);
  });
}

__global__ void split_bf16_kernel(const float* x, __nv_bfloat16* hi, __nv_bfloat16* lo, int64_t n) {
  pdl_wait();  // programmatic dependent launch: see pdl_launch.cuh
  pdl_trigger();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float v = x[i];
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    hi[i] = h;
    lo[i] = __float2bfloat16_rn(v - __bfloat162float(h));
  }
}

cudaError_t launch_split_bf16(const float* x, void* hi, void* lo, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  return detail::launch_pdl(split_bf16_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, x,
                            static_cast<__nv_bfloat16*>(hi), static_cast<__nv_bfloat16*>(lo), n);
}

namespace {
// Four elements per thread when the pointers allow 16-byte accesses.
__global__ void add_f32_kernel(const float* a, const float* b, float* out, int64_t n, bool vec) {
  pdl_wait();
  pdl_trigger();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (vec) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n / 4; i += stride) {
      const float4 x = reinterpret_cast<const float4*>(a)[i];
      const float4 y = reinterpret_cast<const float4*>(b)[i];
      reinterpret_cast<float4*>(out)[i] = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
    }
    for (int64_t i = n / 4 * 4 + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
      out[i] = a[i] + b[i];
    return;
  }
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = a[i] + b[i];
}
}  // namespace

cudaError_t launch_add_f32(const float* a, const float* b, float* out, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  const bool vec = (reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                    reinterpret_cast<uintptr_t>(out)) %
                       16 ==
                   0;
  return detail::launch_pdl(add_f32_kernel, dim3(grid_for(vec ? (n + 3) / 4 : n, 256)), dim3(256),
                            0, s, a, b, out, n, vec);
}

cudaError_t launch_rope(void* x, bool x_bf16, int64_t m, int64_t cols, int head_dim,
                        const int32_t* positions, float theta, const float* inv_freq,
                        float cos_sin_scale, cudaStream_t s) {
  if (m * cols == 0) return cudaSuccess;
  const unsigned g = grid_for(m * cols / 2, 256);
  if (x_bf16)
    return detail::launch_pdl(rope_kernel<true>, dim3(g), dim3(256), 0, s, x, m, cols, head_dim,
                              positions, theta, inv_freq, cos_sin_scale);
  return detail::launch_pdl(rope_kernel<false>, dim3(g), dim3(256), 0, s, x, m, cols, head_dim,
                            positions, theta, inv_freq, cos_sin_scale);
}

cudaError_t launch_attention_prologue(const AttentionPrologueArgs& a, bool cache_bf16,
                                      cudaStream_t s) {
  if (a.m == 0) return cudaSuccess;
  if (a.head_dim <= 0 || a.head_dim % 2 != 0 || a.head_dim > kPrologueMaxHeadDim ||
      a.m > 0x7fffffff || a.heads + a.kv_heads > 65535)
    return cudaErrorInvalidValue;
  const dim3 grid(unsigned(a.m), unsigned(a.heads + a.kv_heads));
  const int threads = rms_norm_threads(a.head_dim);
  if (cache_bf16)
    return detail::launch_pdl(attention_prologue_kernel<true>, grid, dim3(threads), 0, s, a);
  return detail::launch_pdl(attention_prologue_kernel<false>, grid, dim3(threads), 0, s, a);
}

cudaError_t launch_kv_cache_write(const void* k, bool k_bf16, const void* v, bool v_bf16,
                                  const int32_t* slot_mapping, void* k_cache, void* v_cache,
                                  bool cache_bf16, int64_t m, int64_t row, cudaStream_t s) {
  if (m * row == 0) return cudaSuccess;
  if (k_bf16 != v_bf16) return cudaErrorInvalidValue;
  return dispatch2(k_bf16, cache_bf16, [&]<bool kI, bool kC>() {
    return detail::launch_pdl(kv_write_kernel<kI, kC>, dim3(grid_for(m * row, 256)), dim3(256), 0,
                              s, k, v, slot_mapping, k_cache, v_cache, m, row);
  });
}

cudaError_t launch_paged_attention(const PagedAttentionArgs& a, cudaStream_t s) {
  if (a.m == 0) return cudaSuccess;
  if (a.head_dim > kMaxHeadDim || a.m > 0x7fffffff || a.heads > 65535) return cudaErrorInvalidValue;
  if (gqa_paged_attention_supported(a)) return launch_gqa_paged_attention(a, s);
  const dim3 grid(unsigned(a.m), unsigned(a.heads));
  auto go = [&]<bool kQ, bool kC>() {
    if (a.out_bf16)
      return detail::launch_pdl(paged_attention_kernel<kQ, kC, true>, dim3(grid),
                                dim3(kAttnWarps * 32), 0, s, a);
    return detail::launch_pdl(paged_attention_kernel<kQ, kC, false>, dim3(grid),
                              dim3(kAttnWarps * 32), 0, s, a);
  };
  return dispatch2(a.q_bf16, a.cache_bf16, go);
}

cudaError_t launch_silu_mul(const float* gate_up, void* out, bool out_bf16, int64_t m,
                            int64_t inter, cudaStream_t s) {
  if (m * inter == 0) return cudaSuccess;
  if (out_bf16)
    return detail::launch_pdl(silu_mul_kernel<true>, dim3(grid_for(m * inter, 256)), dim3(256), 0,
                              s, gate_up, out, m, inter);
  return detail::launch_pdl(silu_mul_kernel<false>, dim3(grid_for(m * inter, 256)), dim3(256), 0, s,
                            gate_up, out, m, inter);
}

cudaError_t launch_residual_add(void* x, bool x_bf16, const void* y, bool y_bf16, int64_t n,
                                cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  return dispatch2(x_bf16, y_bf16, [&]<bool kX, bool kY>() {
    return detail::launch_pdl(residual_add_kernel<kX, kY>, dim3(grid_for(n, 256)), dim3(256), 0, s,
                              x, y, n);
  });
}

cudaError_t launch_copy_rows(const void* src, bool src_bf16, int64_t src_cols, int64_t col,
                             const int32_t* rows, void* dst, bool dst_bf16, int64_t m,
                             int64_t width, cudaStream_t s) {
  if (m * width == 0) return cudaSuccess;
  return dispatch2(src_bf16, dst_bf16, [&]<bool kS, bool kD>() {
    return detail::launch_pdl(copy_rows_kernel<kS, kD>, dim3(grid_for(m * width, 256)), dim3(256),
                              0, s, src, src_cols, col, rows, dst, m, width);
  });
}

cudaError_t launch_router_margin(const float* logits, int64_t m, int e, int k, float* margin,
                                 int64_t cols, int64_t col, cudaStream_t s) {
  if (m == 0) return cudaSuccess;
  if (e > kMarginMaxE || e < 1 || k < 1) return cudaErrorInvalidValue;
  const int64_t blocks = (m + kMarginWarps - 1) / kMarginWarps;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  return detail::launch_pdl(router_margin_kernel, dim3(unsigned(blocks)), dim3(kMarginWarps * 32),
                            0, s, logits, m, e, k, margin, cols, col);
}

}  // namespace moelora::cuda
