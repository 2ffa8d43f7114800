// The direct MoE LoRA delta (the hooks' direct variant, MoeLoraHooksOptions::direct_max_tokens):
// one kernel per seam computes d[s] = w[s] * B . (A . in[s]) for every token-slot s that
// carries an adapter, straight from the routing (ids, token_slot): no (adapter, expert)
// alignment kernel, no u round trip through global memory, no separate expand. The staged
// chain (group/align, shrink, expand) costs ~15 us of latency per seam even on an idle GPU
// (bench/NOTES.md, session 6); here the whole seam is one launch whose critical path was
// designed as about two memory round trips plus a cluster exchange. Measured on the H100
// (session 7) it takes 19-37 us per seam from batch 16 up, so it wins only at batch 1; the
// analysis and the next version (branch direct-v2) are in bench/NOTES.md, session 7.
//
// Work unit: one (adapter slot, expert) pair present in the batch, taken by one cluster of kC
// CTAs. Every CTA reads the batch's routing into shared memory once, marks the present pairs
// in a bitmap and numbers them (ascending slot * E + expert); cluster i takes units i,
// i + clusters, ... Inside a unit, the pair's token-slots (ascending) go 16 at a time:
//  - shrink: CTA c reduces its 1 / kC slice of K on tensor cores (mma.sync m16n8k16, ranks in
//    M, token-slots in N, the k order inside each 32-wide chunk permuted the same way for A and
//    the input, as moe_lora_shrink_kernel); warps split the slice and meet in shared memory in
//    a fixed order;
//  - exchange: each CTA sums the kC partial u rows from its cluster's shared memory (DSMEM), in
//    CTA order, so every CTA holds the same u;
//  - expand: CTA c writes its 1 / kC slice of the output columns, four adjacent columns per
//    thread (16-byte stores), u staged transposed ([rank][token]: one rank costs two broadcast
//    16-byte shared loads for 32 FMAs), B read as 16-byte row pieces (prefetched into L2 when
//    the unit starts, while the shrink runs).
// kC == 1 is a plain CTA per pair (moe_lora_direct_single_kernel: no cluster to co-schedule).
// Sums run in a fixed order everywhere: results are deterministic (eager = graph replay).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/moe_lora_epilogue.cuh"  // load_or_zero, bf16x8_to_float
#include "kernels/cuda/moe_lora_launch.h"
#include "kernels/cuda/pdl_launch.cuh"
#include "kernels/cuda/sm90_moe_gemm.cuh"  // mma_bf16_16816

namespace moelora::cuda::detail {
namespace {

namespace cg = cooperative_groups;
using sm90::detail::mma_bf16_16816;

constexpr int kDirectWarps = 8;
constexpr int kDirectThreads = kDirectWarps * 32;
constexpr int kDirectTok = 8;     // token-slots per pass (one MMA n-tile)
constexpr int kDirectRanks = 32;  // A rows per shrink pass (two MMA m-tiles)

// Dynamic shared memory, in 4-byte words, for n slots, `keys` pair ids and R shrink rows.
struct DirectSmem {
  int key, list, bitmap, prefix, meta, part, u, total;
  __host__ __device__ DirectSmem(int n, int keys, int R, int num_lora_slots) {
    const int words = (keys + 31) / 32;
    key = 0;
    list = key + n;
    bitmap = list + n;
    prefix = bitmap + words;
    meta = prefix + words;
    part = (meta + num_lora_slots * 6 + 3) / 4 * 4;  // 16-byte aligned float rows
    u = part + kDirectTok * R;
    total = u + kDirectTok * R;
  }
};

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// The kernel body for clusters of kC CTAs (kC == 1: a plain CTA per pair, no cluster).
template <int kC>
__device__ __forceinline__ void direct_body(const DirectLoraArgs& a) {
  extern __shared__ __align__(16) int smem[];
  __shared__ float red[kDirectWarps][kDirectRanks][kDirectTok];
  __shared__ int s_unit_key, s_units, s_count, s_warp_base[kDirectWarps + 1];
  __shared__ float s_wt[kDirectTok];
  int crank = 0;
  if constexpr (kC > 1) crank = int(cg::this_cluster().block_rank());
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int E = a.num_experts, S = a.num_lora_slots, keys = S * E;
  const DirectSmem L(a.n, keys, a.R, S);
  int* s_key = smem + L.key;
  int* s_list = smem + L.list;
  unsigned* s_bitmap = reinterpret_cast<unsigned*>(smem + L.bitmap);
  int* s_prefix = smem + L.prefix;
  int* s_meta = smem + L.meta;
  float* s_part = reinterpret_cast<float*>(smem + L.part);
  float* s_u = reinterpret_cast<float*>(smem + L.u);
  const int words = (keys + 31) / 32;

  pdl_wait();
  pdl_trigger();
  // The batch's (adapter, expert) key per token-slot, -1 for base tokens and invalid experts.
  for (int s = threadIdx.x; s < a.n; s += kDirectThreads) {
    const int e = a.ids[s], slot = a.token_slot[s / a.top_k];
    s_key[s] = (e >= 0 && e < E && slot >= 0 && slot < S) ? slot * E + e : -1;
  }
  for (int w = threadIdx.x; w < words; w += kDirectThreads) s_bitmap[w] = 0u;
  for (int i = threadIdx.x; i < S * 6; i += kDirectThreads) s_meta[i] = a.meta[i];
  __syncthreads();
  for (int s = threadIdx.x; s < a.n; s += kDirectThreads) {
    const int k = s_key[s];
    if (k >= 0) atomicOr(&s_bitmap[k >> 5], 1u << (k & 31));
  }
  __syncthreads();
  if (warp == 0) {  // exclusive prefix of the bitmap words' popcounts: the units' numbering
    int base = 0;
    for (int w0 = 0; w0 < words; w0 += 32) {
      const int w = w0 + lane;
      const int c = w < words ? __popc(s_bitmap[w]) : 0;
      int incl = c;
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const int t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
      }
      if (w < words) s_prefix[w] = base + incl - c;
      base += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) s_units = base;
  }
  __syncthreads();
  const int units = s_units;
  const int clusters = int(gridDim.x) / kC;

  for (int unit = int(blockIdx.x) / kC; unit < units; unit += clusters) {
    // The unit's key: the (unit - prefix)-th set bit of the word that holds it.
    for (int w = threadIdx.x; w < words; w += kDirectThreads) {
      const unsigned bits = s_bitmap[w];
      const int first = s_prefix[w];
      if (unit >= first && unit < first + __popc(bits)) {
        unsigned b = bits;
        for (int i = unit - first; i > 0; --i) b &= b - 1;  // drop the lower set bits
        s_unit_key = w * 32 + __ffs(int(b)) - 1;
      }
    }
    __syncthreads();
    const int key = s_unit_key;
    const int slot = key / E, e = key % E;
    // The pair's token-slots in ascending order: each warp compacts a contiguous segment.
    const int seg = (a.n + kDirectWarps - 1) / kDirectWarps;
    const int s_begin = warp * seg, s_end = min(a.n, s_begin + seg);
    int mine = 0;
    for (int s0 = s_begin; s0 < s_end; s0 += 32) {
      const int s = s0 + lane;
      mine += __popc(__ballot_sync(0xffffffffu, s < s_end && s_key[s] == key));
    }
    if (lane == 0) s_warp_base[warp + 1] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
      s_warp_base[0] = 0;
      for (int w = 0; w < kDirectWarps; ++w) s_warp_base[w + 1] += s_warp_base[w];
      s_count = s_warp_base[kDirectWarps];
    }
    __syncthreads();
    int pos = s_warp_base[warp];
    for (int s0 = s_begin; s0 < s_end; s0 += 32) {
      const int s = s0 + lane;
      const bool hit = s < s_end && s_key[s] == key;
      const unsigned mask = __ballot_sync(0xffffffffu, hit);
      if (hit) s_list[pos + __popc(mask & ((1u << lane) - 1u))] = s;
      pos += __popc(mask);
    }
    __syncthreads();  // the list is complete
    const int T = s_count;

    // The adapter's ranks for this seam, clamped to the pool (as the staged kernels do).
    const int* m = s_meta + slot * 6;
    const int shrink_rank = max(0, min(m[a.gate_up ? 0 : 5], a.R));
    const SeamRanks sr = SeamRanks::of(m, a.gate_up).clamped(a.R, a.r_max);
    const int rank_lo = sr.rank_lo, col_lo = sr.col_lo, rank_hi = sr.rank_hi, col_hi = sr.col_hi;

    // This CTA's output columns, and their B rows into L2 while the shrink runs.
    const int cols = ((a.N + kC - 1) / kC + 3) / 4 * 4;  // whole 4-column quads (N % 4 == 0)
    const int c0 = crank * cols, c1 = min(a.N, c0 + cols);
    const int64_t pair = int64_t(slot) * E + e;
    const __nv_bfloat16* bbase = static_cast<const __nv_bfloat16*>(a.B) + pair * a.N * a.r_max;
    if (c1 > c0 && (rank_lo > 0 || rank_hi > 0)) {
      const char* p = reinterpret_cast<const char*>(bbase + int64_t(c0) * a.r_max);
      const int64_t bytes = int64_t(c1 - c0) * a.r_max * 2;
      for (int64_t off = int64_t(threadIdx.x) * 128; off < bytes; off += kDirectThreads * 128)
        prefetch_l2(p + off);
    }

    const __nv_bfloat16* abase = static_cast<const __nv_bfloat16*>(a.A) + pair * int64_t(a.R) * a.K;
    const int chunks = (a.K + 31) / 32;
    const int per_cta = (chunks + kC - 1) / kC;
    const int cb = crank * per_cta, ce = min(chunks, cb + per_cta);

    for (int t0 = 0; t0 < T; t0 += kDirectTok) {
      const int tc = min(kDirectTok, T - t0);
      // This thread's input row (token column g of the MMA n-tile).
      const bool has = g < tc;
      const __nv_bfloat16* xrow = static_cast<const __nv_bfloat16*>(a.in) +
                                  int64_t(has ? s_list[t0 + g] / a.rows_div : 0) * a.K;
      for (int r0 = 0; r0 < shrink_rank; r0 += kDirectRanks) {
        float acc[2][4] = {};
#pragma unroll 4
        for (int c = cb + warp; c < ce; c += kDirectWarps) {
          const int k = c * 32 + tig * 8;
          const bool k_ok = k < a.K;
          uint32_t f0[2][4], f1[2][4];
#pragma unroll
          for (int rt = 0; rt < 2; ++rt) {
            const int ra = r0 + rt * 16 + g, rb = ra + 8;
            const uint4 lo = load_or_zero(abase + int64_t(ra) * a.K + k, k_ok && ra < shrink_rank);
            const uint4 hi = load_or_zero(abase + int64_t(rb) * a.K + k, k_ok && rb < shrink_rank);
            f0[rt][0] = lo.x, f0[rt][1] = hi.x, f0[rt][2] = lo.y, f0[rt][3] = hi.y;
            f1[rt][0] = lo.z, f1[rt][1] = hi.z, f1[rt][2] = lo.w, f1[rt][3] = hi.w;
          }
          const uint4 x = load_or_zero(xrow + k, k_ok && has);
#pragma unroll
          for (int rt = 0; rt < 2; ++rt) {
            mma_bf16_16816(acc[rt], f0[rt], x.x, x.y);
            mma_bf16_16816(acc[rt], f1[rt], x.z, x.w);
          }
        }
#pragma unroll
        for (int rt = 0; rt < 2; ++rt) {
          red[warp][rt * 16 + g][2 * tig] = acc[rt][0];
          red[warp][rt * 16 + g][2 * tig + 1] = acc[rt][1];
          red[warp][rt * 16 + g + 8][2 * tig] = acc[rt][2];
          red[warp][rt * 16 + g + 8][2 * tig + 1] = acc[rt][3];
        }
        __syncthreads();
        for (int i = threadIdx.x; i < kDirectRanks * kDirectTok; i += kDirectThreads) {
          const int rr = i / kDirectTok, t = i % kDirectTok;
          if (r0 + rr >= a.R) continue;
          float sum = 0.0f;
#pragma unroll
          for (int w = 0; w < kDirectWarps; ++w) sum += red[w][rr][t];
          s_part[t * a.R + r0 + rr] = sum;
        }
        __syncthreads();  // `red` is reused by the next rank pass
      }
      // Every CTA's partial u is in its shared memory; sum them (CTA order) into u transposed,
      // [rank][token], zero past the shrink rank and the pass's tokens.
      if constexpr (kC > 1) {
        cg::this_cluster().sync();
      } else {
        __syncthreads();
      }
      for (int i = threadIdx.x; i < a.R * kDirectTok; i += kDirectThreads) {
        const int j = i / kDirectTok, t = i % kDirectTok;
        float sum = 0.0f;
        if (j < shrink_rank && t < tc) {
          const int at = t * a.R + j;
          if constexpr (kC > 1) {
            for (int c = 0; c < kC; ++c) sum += cg::this_cluster().map_shared_rank(s_part, c)[at];
          } else {
            sum = s_part[at];
          }
        }
        s_u[i] = sum;
      }
      if (threadIdx.x < kDirectTok) {
        const int t = int(threadIdx.x);
        s_wt[t] = (a.slot_weights != nullptr && t < tc) ? a.slot_weights[s_list[t0 + t]] : 1.0f;
      }
      // The partials are read (the next pass may overwrite them); u is ready.
      if constexpr (kC > 1) {
        cg::this_cluster().sync();
      } else {
        __syncthreads();
      }

      // Expand, four adjacent columns per thread (one half: I % 4 == 0):
      // out[s][col] = w[s] * sum_r B[col][r] * u[s][col_half + r], ranks in order.
      for (int q0 = c0 + 4 * int(threadIdx.x); q0 < c1; q0 += 4 * kDirectThreads) {
        const bool lo = !a.gate_up || q0 < a.N / 2;
        const int rk = lo ? rank_lo : rank_hi, cl = lo ? col_lo : col_hi;
        const __nv_bfloat16* brow = bbase + int64_t(q0) * a.r_max;
        float acc[4][kDirectTok] = {};
        for (int r = 0; r < rk; r += 8) {
          uint4 bq[4];  // ranks r .. r + 7 of the four rows, widened one rank at a time
#pragma unroll
          for (int c = 0; c < 4; ++c)
            bq[c] = __ldg(reinterpret_cast<const uint4*>(brow + c * a.r_max + r));
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (r + i >= rk) break;
            const float4* ur = reinterpret_cast<const float4*>(s_u + (cl + r + i) * kDirectTok);
            const float4 u0 = ur[0], u1 = ur[1];
            const float uj[kDirectTok] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const uint32_t w = reinterpret_cast<const uint32_t*>(&bq[c])[i >> 1];
              const float b = __uint_as_float((i & 1) ? (w & 0xffff0000u) : (w << 16));  // bf16
#pragma unroll
              for (int t = 0; t < kDirectTok; ++t) acc[c][t] = fmaf(b, uj[t], acc[c][t]);
            }
          }
        }
#pragma unroll
        for (int t = 0; t < kDirectTok; ++t)
          if (t < tc)
            *reinterpret_cast<float4*>(a.out + int64_t(s_list[t0 + t]) * a.N + q0) =
                make_float4(s_wt[t] * acc[0][t], s_wt[t] * acc[1][t], s_wt[t] * acc[2][t],
                            s_wt[t] * acc[3][t]);
      }
      __syncthreads();  // s_u and s_list are read before the next pass / unit rewrites them
    }
  }
}

template <int kC>
__global__ void __cluster_dims__(kC, 1, 1) __launch_bounds__(kDirectThreads, 2)
    moe_lora_direct_kernel(const DirectLoraArgs a) {
  direct_body<kC>(a);
}

// One CTA per pair (no cluster: each CTA needs only its own SM's room).
__global__ void __launch_bounds__(kDirectThreads, 2)
    moe_lora_direct_single_kernel(const DirectLoraArgs a) {
  direct_body<1>(a);
}

template <class Kernel>
cudaError_t launch_direct(Kernel kernel, const DirectLoraArgs& a, int ctas, size_t smem,
                          cudaStream_t stream) {
  // Once per instantiation: allow the kernel more than 48 KB of dynamic shared memory.
  static const cudaError_t attr = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kDirectMaxSmem));
  if (attr != cudaSuccess) return attr;
  return launch_pdl(kernel, dim3(unsigned(ctas)), dim3(kDirectThreads), smem, stream, a);
}

}  // namespace

size_t moe_lora_direct_smem(int n, int keys, int R, int num_lora_slots) {
  return size_t(DirectSmem(n, keys, R, num_lora_slots).total) * 4;
}

cudaError_t launch_moe_lora_direct(const DirectLoraArgs& a, int cluster_size, int max_clusters,
                                   cudaStream_t stream) {
  const int keys = a.num_lora_slots * a.num_experts;
  const size_t smem = moe_lora_direct_smem(a.n, keys, a.R, a.num_lora_slots);
  if (smem > kDirectMaxSmem || a.n < 1 || a.K % 8 != 0 || a.r_max % 8 != 0 || a.N % 4 != 0 ||
      (a.gate_up && (a.N / 2) % 4 != 0) || reinterpret_cast<uintptr_t>(a.out) % 16 != 0)
    return cudaErrorInvalidValue;
  // One cluster per possible (adapter, expert) pair, at most max_clusters (they loop).
  const int clusters = int(std::min<int64_t>(std::min<int64_t>(a.n, keys), max_clusters));
  if (clusters < 1) return cudaSuccess;
  switch (cluster_size) {
    case 1:
      return launch_direct(moe_lora_direct_single_kernel, a, clusters, smem, stream);
    case 2:
      return launch_direct(moe_lora_direct_kernel<2>, a, clusters * 2, smem, stream);
    case 4:
      return launch_direct(moe_lora_direct_kernel<4>, a, clusters * 4, smem, stream);
    case 8:
      return launch_direct(moe_lora_direct_kernel<8>, a, clusters * 8, smem, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace moelora::cuda::detail
