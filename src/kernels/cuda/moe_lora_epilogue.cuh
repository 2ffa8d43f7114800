// LoRA in the bf16 expert GEMM's epilogue (device code, included by sm90_moe_gemm.cuh; the
// contract is MoeGemmLoraArgs in moe_gemm_launch.h). The base plan groups slots by expert
// only, so one block's tokens may carry different adapters. Before the main loop (hidden
// behind the first tiles' loads) each token's adapter and (rank, column) pairs go into shared
// tables, the LoRA tokens are sorted by adapter and the block's distinct adapters listed;
// during the main loop each thread prefetches its B row of every such adapter into L2.
// The epilogue then costs one round trip: B rows (cp.async into the drained ring) and u (the
// shrink's K-split partials, 16-byte loads all in flight, summed in split order, staged
// transposed as [column][token]) are requested together; each thread (one weight row) then
// adds B . u to the f32 tile for four tokens at a time (one broadcast 16-byte shared load per
// rank feeds four FMAs). Tokens without LoRA on this seam, and ranks past a slot's own, do no
// work; base tokens' tile entries are never touched. (All CTAs of a wave reach their epilogue
// together, so epilogue latency is HBM idle time: measured, bench/NOTES.md.)
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/moe_gemm_launch.h"

namespace moelora::cuda::detail {

// Eight bf16 at p (16-byte aligned), or zeros when !ok (nothing read).
__device__ __forceinline__ uint4 load_or_zero(const __nv_bfloat16* p, bool ok) {
  return ok ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
}

// A slot's (rank, u column) for the gate (lo) and up (hi) halves of the gate_up seam, or the
// down seam's one pair, read from its MoeLoraSlotMeta row [6]; clamped() bounds them to the
// pool the way every MoE LoRA kernel reads them (u columns < ldu, ranks <= r_max).
struct SeamRanks {
  int rank_lo, col_lo, rank_hi, col_hi;

  __device__ __forceinline__ static SeamRanks of(const int32_t* m, bool gate_up) {
    if (gate_up) return {m[1], m[2], m[3], m[4]};
    return {m[5], 0, m[5], 0};
  }
  __device__ __forceinline__ SeamRanks clamped(int ldu, int r_max) const {
    SeamRanks s;
    s.col_lo = max(0, min(col_lo, ldu)), s.col_hi = max(0, min(col_hi, ldu));
    s.rank_lo = max(0, min(rank_lo, min(r_max, ldu - s.col_lo)));
    s.rank_hi = max(0, min(rank_hi, min(r_max, ldu - s.col_hi)));
    return s;
  }
};

__device__ __forceinline__ void bf16x8_to_float(const uint4& v, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x, f[2 * i + 1] = t.y;
  }
}

// Per-token tables (kTokens ints each) and two counts, in shared memory.
struct LoraTables {
  int* ad;     // by token: adapter slot, or -1: no LoRA on this seam (base, or rank 0 on both)
  int* rk_lo;  // by token: (rank, u column) of the gate half (gate_up) or of every row (down)
  int* cl_lo;
  int* rk_hi;  // by token: (rank, u column) of the up half
  int* cl_hi;
  int* order;  // by sorted position: the block's LoRA tokens sorted by (adapter, token)
  int* sad;    // by sorted position: its adapter
  int* seg;    // by sorted position: index of its adapter among the block's distinct ones
  int* dpos;   // by distinct adapter: its first sorted position
  int* count;  // [0]: LoRA tokens, [1]: distinct adapters
};
inline constexpr int kLoraTableInts = 9;  // per token, plus the two counts

template <int kTokens>
__device__ __forceinline__ LoraTables lora_tables(int* base) {
  return {base,
          base + kTokens,
          base + 2 * kTokens,
          base + 3 * kTokens,
          base + 4 * kTokens,
          base + 5 * kTokens,
          base + 6 * kTokens,
          base + 7 * kTokens,
          base + 8 * kTokens,
          base + kLoraTableInts * kTokens};
}

// Shared-memory layout of the epilogue inside the drained ring (bytes from its start): the f32
// tile [kRows][kLd], u transposed [ldu][kTokens + 4], then B rows [adapter][r_max / 8][kRows]
// of 16 bytes. The token tables follow the larger of the ring and (that with one adapter's B).
template <int kRows, int kTokens, int kLd>
struct LoraSmem {
  static constexpr int kTp = kTokens + 4;  // u row stride (16-byte aligned token groups)
  __host__ __device__ static constexpr int u_offset() { return kRows * kLd * 4; }
  __host__ __device__ static constexpr int b_offset(int ldu) {
    return (u_offset() + ldu * kTp * 4 + 15) / 16 * 16;
  }
  __host__ __device__ static constexpr int b_bytes(int r_max) { return r_max / 8 * kRows * 16; }
  __host__ __device__ static constexpr int table_offset(int ring_bytes, int ldu, int r_max) {
    const int need = b_offset(ldu) + b_bytes(r_max);
    return ((need > ring_bytes ? need : ring_bytes) + 15) / 16 * 16;
  }
  __host__ __device__ static constexpr int table_bytes() {
    return (2 + kLoraTableInts) * kTokens * 4 + 16;
  }
};

// The per-token setup runs in phases spread over the main loop's first iterations (each
// after the loop's barrier, so the previous phase's shared writes are visible), so that its
// dependent loads (token -> adapter -> meta) never stall the weight stream:
//   before the loop: each token's adapter is requested (registers);
//   phase 0: the adapter's meta is requested;   phase 2: the tables are written;
//   phase 3: the tokens are sorted;             phase 4: the distinct adapters are listed;
//   phase 5: B rows are prefetched into L2.
// Phases the loop is too short for run after it, each behind a barrier (kLoraPhases - 1:
// the prefetch is then pointless and skipped).
inline constexpr int kLoraPhases = 6;

// Each thread's tokens j = tid, tid + kThreads, ... (whose tok_slot it wrote itself).
template <int kTokens, int kThreads>
struct LoraTokenRegs {
  static constexpr int kPer = (kTokens + kThreads - 1) / kThreads;
  int ad[kPer], rl[kPer], cl[kPer], rh[kPer], ch[kPer];

  __device__ __forceinline__ void fetch_adapters(const MoeGemmLoraArgs& l, const int* tok_slot,
                                                 int tid) {
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int j = tid + q * kThreads;
      const int slot = j < kTokens ? tok_slot[j] : -1;
      ad[q] = slot >= 0 ? __ldcg(l.token_slot + slot / l.top_k) : -1;
    }
  }
  // Phase 0 (written by copies or earlier kernels: L2 loads).
  __device__ __forceinline__ void fetch_meta(const MoeGemmLoraArgs& l) {
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      rl[q] = cl[q] = rh[q] = ch[q] = 0;
      if (ad[q] >= 0 && ad[q] < l.num_adapters) {
        const int* m = l.meta + ad[q] * 6;
        if (l.gate_up) {
          rl[q] = __ldcg(m + 1), cl[q] = __ldcg(m + 2), rh[q] = __ldcg(m + 3),
          ch[q] = __ldcg(m + 4);
        } else {
          rl[q] = rh[q] = __ldcg(m + 5);
        }
      } else {
        ad[q] = -1;
      }
    }
  }
  // Phase 2.
  __device__ __forceinline__ void write(const MoeGemmLoraArgs& l, const LoraTables& t, int tid) {
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int j = tid + q * kThreads;
      if (j >= kTokens) continue;
      // Same clamping as the hook path's expand: never read u past ldu or B past r_max.
      const int c_lo = max(0, min(cl[q], l.ldu)), c_hi = max(0, min(ch[q], l.ldu));
      const int r_lo = max(0, min(rl[q], min(l.r_max, l.ldu - c_lo)));
      const int r_hi = max(0, min(rh[q], min(l.r_max, l.ldu - c_hi)));
      t.ad[j] = ad[q] >= 0 && (r_lo > 0 || r_hi > 0) ? ad[q] : -1;
      t.rk_lo[j] = r_lo, t.cl_lo[j] = c_lo, t.rk_hi[j] = r_hi, t.cl_hi[j] = c_hi;
    }
  }
};

// Phase 3: the LoRA tokens sorted by (adapter, token) and their count.
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
    if (ad >= 0) t.order[pos] = j, t.sad[pos] = ad;
    if (j == 0) t.count[0] = cnt;
  }
}

// Phase 4: each sorted position's distinct-adapter index, the first position of each distinct
// adapter and their count.
template <int kTokens, int kThreads>
__device__ __forceinline__ void lora_list_adapters(const LoraTables& t, int tid) {
  const int cnt = t.count[0];
  if (tid == 0 && cnt == 0) t.count[1] = 0;
  for (int i = tid; i < cnt; i += kThreads) {
    int heads = 0;
    for (int i2 = 0; i2 <= i; ++i2) heads += i2 == 0 || t.sad[i2] != t.sad[i2 - 1];
    t.seg[i] = heads - 1;
    if (i == 0 || t.sad[i] != t.sad[i - 1]) t.dpos[heads - 1] = i;
    if (i == cnt - 1) t.count[1] = heads;
  }
}

// B row `wr` of adapter a, expert `group`.
__device__ __forceinline__ const __nv_bfloat16* lora_b_row(const MoeGemmLoraArgs& l, int a,
                                                           int group, int n, int wr) {
  return static_cast<const __nv_bfloat16*>(l.b) +
         ((int64_t(a) * l.num_experts + group) * n + wr) * l.r_max;
}

// Phase 5: the calling thread's B row (weight row wr) of each adapter in the block,
// prefetched into L2.
__device__ __forceinline__ void lora_prefetch_b(const MoeGemmLoraArgs& l, const LoraTables& t,
                                                int group, int n, int wr) {
  const int distinct = t.count[1];
  for (int d = 0; d < distinct; ++d) {
    const char* row = reinterpret_cast<const char*>(lora_b_row(l, t.sad[t.dpos[d]], group, n, wr));
    for (int off = 0; off < l.r_max * 2; off += 128)
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(row + off));
  }
}

__device__ __forceinline__ void lora_cp_async_16(void* dst, const void* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}

// 16-byte u loads in flight per thread per step of the staging loop.
inline constexpr int kLoraStageBatch = 8;

// Epilogue, after the f32 tile acc_tile[row][token] (row stride kLd) is staged in `smem` and a
// barrier: adds B . u to the tile's LoRA tokens (layout: LoraSmem). One thread per (row,
// group parity); `wr` is local row tid % kRows's weight row and `row_ok` whether it is stored
// at all. Ends with a barrier.
template <int kRows, int kTokens, int kThreads, int kLd>
__device__ __forceinline__ void lora_add(const MoeGemmLoraArgs& l, const LoraTables& t,
                                         const int* tok_slot, unsigned char* smem, int table_offset,
                                         int group, int n, int wr, bool row_ok, int tid) {
  using Smem = LoraSmem<kRows, kTokens, kLd>;
  static_assert(kThreads % kRows == 0, "whole rows per thread group");
  constexpr int kParts = kThreads / kRows;
  constexpr int kTp = Smem::kTp;
  float* acc_tile = reinterpret_cast<float*>(smem);
  float* us = reinterpret_cast<float*>(smem + Smem::u_offset());
  uint4* sb = reinterpret_cast<uint4*>(smem + Smem::b_offset(l.ldu));
  const int cnt = t.count[0], distinct = t.count[1];
  const int ldu = l.ldu, nq = l.r_max / 8;
  const int c = tid % kRows, part = tid / kRows;
  const bool hi = l.gate_up && wr >= n / 2;
  // Adapters whose B rows fit the ring past u (at least one: LoraSmem); the rest read B from
  // global memory (L2, prefetched).
  const int staged = min(distinct, (table_offset - Smem::b_offset(ldu)) / Smem::b_bytes(l.r_max));

  // 1. B rows of the staged adapters, this thread's row (ranks split over the row's threads).
  if (row_ok) {
    for (int d = 0; d < staged; ++d) {
      const int j = t.order[t.dpos[d]];
      const int rk = hi ? t.rk_hi[j] : t.rk_lo[j];
      const __nv_bfloat16* brow = lora_b_row(l, t.sad[t.dpos[d]], group, n, wr);
      for (int q = part; q * 8 < rk; q += kParts)
        lora_cp_async_16(sb + (d * nq + q) * kRows + c, brow + q * 8);
    }
  }
  // 2. u of the LoRA tokens, transposed: us[col * kTp + position]. Consecutive threads take
  // consecutive positions (conflict-free stores); every load of a step is issued first.
  const int nvec = ldu / 4, total = cnt * nvec;
  const int64_t vstride = l.split_stride / 4;
  for (int base = tid; base < total; base += kThreads * kLoraStageBatch) {
    float4 v[kLoraStageBatch];
#pragma unroll
    for (int b = 0; b < kLoraStageBatch; ++b) {
      const int idx = base + b * kThreads;
      v[b] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (idx < total) {
        const int i = idx % cnt, c4 = idx / cnt;
        const float4* up =
            reinterpret_cast<const float4*>(l.u + int64_t(tok_slot[t.order[i]]) * ldu) + c4;
#pragma unroll
        for (int sp = 0; sp < kMaxLoraEpilogueSplits; ++sp) {
          if (sp < l.splits) {
            const float4 p = __ldcg(up + sp * vstride);
            v[b].x += p.x, v[b].y += p.y, v[b].z += p.z, v[b].w += p.w;
          }
        }
      }
    }
#pragma unroll
    for (int b = 0; b < kLoraStageBatch; ++b) {
      const int idx = base + b * kThreads;
      if (idx < total) {
        const int i = idx % cnt, col = 4 * (idx / cnt);
        us[col * kTp + i] = v[b].x, us[(col + 1) * kTp + i] = v[b].y;
        us[(col + 2) * kTp + i] = v[b].z, us[(col + 3) * kTp + i] = v[b].w;
      }
    }
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();

  // 3. Four sorted positions at a time; a group spanning two adapters takes one pass each.
  if (row_ok) {
    for (int g = part; 4 * g < cnt; g += kParts) {
      const int i0 = 4 * g;
      int todo = 0;
#pragma unroll
      for (int e = 0; e < 4; ++e) todo |= (i0 + e < cnt) << e;
      while (todo) {
        const int first = __ffs(todo) - 1;
        const int d = t.seg[i0 + first], a = t.sad[i0 + first];
        int mask = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) mask |= ((todo >> e) & 1 && t.sad[i0 + e] == a) << e;
        todo &= ~mask;
        const int j = t.order[t.dpos[d]];
        const int rk = hi ? t.rk_hi[j] : t.rk_lo[j];
        const int cl = hi ? t.cl_hi[j] : t.cl_lo[j];
        if (rk == 0) continue;
        float dsum[4] = {0.f, 0.f, 0.f, 0.f};
        const __nv_bfloat16* brow = lora_b_row(l, a, group, n, wr);
        for (int r0 = 0; r0 < rk; r0 += 64) {  // one pass for ranks <= 64
          uint4 bq[8];
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            const int qq = r0 / 8 + q;
            bq[q] = r0 + 8 * q >= rk ? make_uint4(0, 0, 0, 0)
                    : d < staged     ? sb[(d * nq + qq) * kRows + c]
                                     : __ldcg(reinterpret_cast<const uint4*>(brow) + qq);
          }
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            if (r0 + 8 * q >= rk) break;
            float bf[8];
            bf16x8_to_float(bq[q], bf);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              const int r = r0 + 8 * q + e;
              if (r < rk) {
                const float4 u4 = *reinterpret_cast<const float4*>(us + (cl + r) * kTp + i0);
                dsum[0] = fmaf(bf[e], u4.x, dsum[0]);
                dsum[1] = fmaf(bf[e], u4.y, dsum[1]);
                dsum[2] = fmaf(bf[e], u4.z, dsum[2]);
                dsum[3] = fmaf(bf[e], u4.w, dsum[3]);
              }
            }
          }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if ((mask >> e) & 1) acc_tile[c * kLd + t.order[i0 + e]] += dsum[e];
      }
    }
  }
  __syncthreads();
}

}  // namespace moelora::cuda::detail
