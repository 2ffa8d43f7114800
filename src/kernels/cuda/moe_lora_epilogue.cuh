// LoRA in the bf16 expert GEMM's epilogue (device code, included by sm90_moe_gemm.cuh; the
// contract is MoeGemmLoraArgs in moe_gemm_launch.h). The base plan groups slots by expert
// only, so one block's tokens may carry different adapters: before the main loop each token's
// adapter and (rank, column) pairs go into shared tables and the LoRA tokens are sorted by
// adapter, so that in the epilogue each thread (one weight row) loads its B row once per
// adapter (16-byte loads, prefetched into L2 during the main loop) and adds B . u for that
// adapter's tokens to the staged f32 tile. u (summed over the shrink's K-split partials in
// split order) is staged once per block. Tokens without LoRA on this seam, and rows past a
// slot's rank, do no work; base tokens' tile entries are never touched.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/moe_gemm_launch.h"

namespace moelora::cuda::detail {

__device__ __forceinline__ void bf16x8_to_float(const uint4& v, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x, f[2 * i + 1] = t.y;
  }
}

// Per-token tables (kTokens ints each) and the LoRA token count, in shared memory.
struct LoraTables {
  int* ad;     // adapter slot, or -1: no LoRA on this seam (base, or rank 0 on both halves)
  int* order;  // the block's LoRA tokens sorted by (adapter, column)
  int* rk_lo;  // (rank, u column) of the gate half (gate_up) or of every row (down)
  int* cl_lo;
  int* rk_hi;  // (rank, u column) of the up half
  int* cl_hi;
  int* count;  // [1]
};
inline constexpr int kLoraTableInts = 6;  // per token, plus the count

template <int kTokens>
__device__ __forceinline__ LoraTables lora_tables(int* base) {
  return {base,
          base + kTokens,
          base + 2 * kTokens,
          base + 3 * kTokens,
          base + 4 * kTokens,
          base + 5 * kTokens,
          base + kLoraTableInts * kTokens};
}

// Before the main loop: each thread fills the entries of the tokens j = tid, tid + kThreads,
// ... (whose tok_slot it wrote itself). Reads the token's adapter and the adapter's meta
// (written by copies or earlier kernels: L2 loads).
template <int kTokens, int kThreads>
__device__ __forceinline__ void lora_load_tokens(const MoeGemmLoraArgs& l, const int* tok_slot,
                                                 const LoraTables& t, int tid) {
  for (int j = tid; j < kTokens; j += kThreads) {
    const int slot = tok_slot[j];
    int ad = -1, rl = 0, cl = 0, rh = 0, ch = 0;
    if (slot >= 0) {
      const int a = __ldcg(l.token_slot + slot / l.top_k);
      if (a >= 0 && a < l.num_adapters) {
        const int* m = l.meta + a * 6;
        if (l.gate_up) {
          rl = __ldcg(m + 1), cl = __ldcg(m + 2), rh = __ldcg(m + 3), ch = __ldcg(m + 4);
        } else {
          rl = rh = __ldcg(m + 5);
        }
        // Same clamping as the hook path's expand: never read u past ldu or B past r_max.
        cl = max(0, min(cl, l.ldu)), ch = max(0, min(ch, l.ldu));
        rl = max(0, min(rl, min(l.r_max, l.ldu - cl)));
        rh = max(0, min(rh, min(l.r_max, l.ldu - ch)));
        if (rl > 0 || rh > 0) ad = a;
      }
    }
    t.ad[j] = ad, t.rk_lo[j] = rl, t.cl_lo[j] = cl, t.rk_hi[j] = rh, t.cl_hi[j] = ch;
  }
}

// After a barrier following lora_load_tokens: the LoRA tokens' positions sorted by
// (adapter, token), and their count. Visible to all after the next barrier.
template <int kTokens, int kThreads>
__device__ __forceinline__ void lora_sort_tokens(const LoraTables& t, int tid) {
  for (int j = tid; j < kTokens; j += kThreads) {
    const int ad = t.ad[j];
    int pos = 0, cnt = 0;
#pragma unroll 8
    for (int j2 = 0; j2 < kTokens; ++j2) {
      const int a2 = t.ad[j2];
      cnt += a2 >= 0;
      pos += a2 >= 0 && (a2 < ad || (a2 == ad && j2 < j));
    }
    if (ad >= 0) t.order[pos] = j;
    if (j == 0) *t.count = cnt;
  }
}

// B row `wr` of adapter a, expert `group`.
__device__ __forceinline__ const __nv_bfloat16* lora_b_row(const MoeGemmLoraArgs& l, int a,
                                                           int group, int n, int wr) {
  return static_cast<const __nv_bfloat16*>(l.b) +
         ((int64_t(a) * l.num_experts + group) * n + wr) * l.r_max;
}

// During the main loop (once the sorted tables are visible): the calling thread's B row
// (weight row wr) of each adapter in the block, prefetched into L2 so the epilogue's loads do
// not wait on HBM.
__device__ __forceinline__ void lora_prefetch_b(const MoeGemmLoraArgs& l, const LoraTables& t,
                                                int group, int n, int wr) {
  const int cnt = *t.count;
  int prev = -1;
  for (int i = 0; i < cnt; ++i) {
    const int a = t.ad[t.order[i]];
    if (a == prev) continue;
    prev = a;
    const char* row = reinterpret_cast<const char*>(lora_b_row(l, a, group, n, wr));
    for (int off = 0; off < l.r_max * 2; off += 128)
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(row + off));
  }
}

// Epilogue, after the f32 tile acc_tile[row][token] (row stride kLd) is staged and a barrier:
// stages u of the LoRA tokens into `us` ([count][ldu] floats, zero outside live columns),
// then adds B . u to the tile. One thread per (row, token parity); `wr` is local row
// tid % kRows's weight row and `row_ok` whether it is stored at all. Ends with a barrier.
template <int kRows, int kThreads, int kLd>
__device__ __forceinline__ void lora_add(const MoeGemmLoraArgs& l, const LoraTables& t,
                                         const int* tok_slot, float* acc_tile, float* us,
                                         int group, int n, int wr, bool row_ok, int tid) {
  static_assert(kThreads % kRows == 0, "whole rows per thread group");
  constexpr int kParts = kThreads / kRows;
  const int cnt = *t.count;
  const int ldu = l.ldu;
  for (int idx = tid; idx < cnt * ldu; idx += kThreads) {
    const int i = idx / ldu, c = idx - i * ldu;
    const int j = t.order[i];
    const bool live = (c >= t.cl_lo[j] && c < t.cl_lo[j] + t.rk_lo[j]) ||
                      (c >= t.cl_hi[j] && c < t.cl_hi[j] + t.rk_hi[j]);
    float v = 0.0f;
    if (live) {
      const float* up = l.u + int64_t(tok_slot[j]) * ldu + c;
#pragma unroll
      for (int sp = 0; sp < kMaxLoraEpilogueSplits; ++sp)
        if (sp < l.splits) v += __ldcg(up + sp * l.split_stride);
    }
    us[idx] = v;
  }
  __syncthreads();
  const int c = tid % kRows, part = tid / kRows;
  const bool hi = l.gate_up && wr >= n / 2;
  if (row_ok) {
    // Ranks in chunks of 64 (one pass for r_max <= 64): B of one chunk in registers.
    for (int r0 = 0; r0 < l.r_max; r0 += 64) {
      int cur = -1;
      uint4 bq[8];
      for (int i = part; i < cnt; i += kParts) {
        const int j = t.order[i];
        const int rk = hi ? t.rk_hi[j] : t.rk_lo[j];
        if (rk <= r0) continue;
        const int a = t.ad[j];
        if (a != cur) {  // the tokens are sorted by adapter: once per adapter
          cur = a;
          const uint4* brow = reinterpret_cast<const uint4*>(lora_b_row(l, a, group, n, wr) + r0);
#pragma unroll
          for (int q = 0; q < 8; ++q)
            bq[q] = r0 + 8 * q < rk ? __ldcg(brow + q) : make_uint4(0, 0, 0, 0);
        }
        const float* ur = us + i * ldu + (hi ? t.cl_hi[j] : t.cl_lo[j]);
        float d = 0.0f;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          if (r0 + 8 * q >= rk) break;
          float bf[8];
          bf16x8_to_float(bq[q], bf);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const int r = r0 + 8 * q + e;
            if (r < rk) d = fmaf(bf[e], ur[r], d);
          }
        }
        acc_tile[c * kLd + j] += d;
      }
    }
  }
  __syncthreads();
}

}  // namespace moelora::cuda::detail
