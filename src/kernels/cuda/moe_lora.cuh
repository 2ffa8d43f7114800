// Device code for LoRA on experts, grouped by virtual expert v = slot * E + expert.
//
// Shrink (u = A . x per aligned slot) runs on tensor cores: mma.sync m16n8k16 with LoRA ranks
// in M and 8 token-slots in N, so one MMA covers a whole rank-16 adapter for 8 slots; warps
// split K and meet in shared memory. The k order inside each 32-wide chunk is permuted the
// same way for A and x, so every thread does plain 16-byte loads of both.
// Expand (out += w . B . u) is FMA work on the (small) rank; each thread owns two output
// columns of a block's slots and reads u from shared memory (broadcast).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/moe_ops_launch.h"
#include "kernels/cuda/pdl_launch.cuh"

namespace moelora::cuda::detail {

// Many warps per CTA split K so a whole A tile is in flight at once (batch 1 has one CTA
// per touched (adapter, expert) pair: latency, not bandwidth, bounds it).
constexpr int kShrinkWarps = 16;
constexpr int kShrinkRanks = 64;    // ranks per CTA (4 MMA row tiles)
constexpr int kExpandThreads = 128;
constexpr int kExpandCols = 2 * kExpandThreads;
constexpr int kExpandSlots = 8;     // slots staged per step

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 load_or_zero(const __nv_bfloat16* p, bool ok) {
  return ok ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
}

// grid: (plan blocks, ceil(R / 64), ceil(block_m / 8)); block: kShrinkWarps warps.
__global__ void __launch_bounds__(kShrinkWarps * 32)
    moe_lora_shrink_kernel(LoraPlanView plan, ShrinkArgs a) {
  __shared__ float red[kShrinkWarps][kShrinkRanks][8];
  pdl_wait();
  pdl_trigger();
  const int b = blockIdx.x;
  if (b * plan.block_m >= plan.num_padded[0]) return;
  const int v = plan.block_group[b];
  if (v < 0) return;
  const int slot = v / plan.num_experts, e = v % plan.num_experts;
  const int rank = min(a.meta[slot * 6 + a.rank_field], a.R);
  const int r0 = blockIdx.y * kShrinkRanks;
  if (r0 >= rank) return;
  const int ntiles = (plan.block_m + 7) / 8;
  const int n0 = int(blockIdx.z) % ntiles * 8, split = int(blockIdx.z) / ntiles;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  // This thread's x row (slot column g of the MMA tile).
  const int pos = n0 + g;
  int s = plan.num_slots;
  if (pos < plan.block_m) s = plan.sorted_slots[b * plan.block_m + pos];
  const bool has_row = s < plan.num_slots;
  const __nv_bfloat16* xrow = static_cast<const __nv_bfloat16*>(a.in) + int64_t(has_row ? s / a.rows_div : 0) * a.K;
  const __nv_bfloat16* arow = static_cast<const __nv_bfloat16*>(a.A) + (int64_t(slot) * plan.num_experts + e) * a.R * a.K;

  float acc[4][4] = {};
  const int chunks = (a.K + 31) / 32;
  const int per_split = (chunks + a.splits - 1) / a.splits;
  const int c0 = split * per_split, c1 = min(chunks, c0 + per_split);
  const int per_warp = (c1 - c0 + kShrinkWarps - 1) / kShrinkWarps;
  const int c_end = min(c1, c0 + (warp + 1) * per_warp);
#pragma unroll 4
  for (int c = c0 + warp * per_warp; c < c_end; ++c) {
    const int k = c * 32 + tig * 8;
    const bool k_ok = k < a.K;
    const uint4 x = load_or_zero(xrow + k, k_ok && has_row);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int ra = r0 + t * 16 + g, rb = ra + 8;
      const uint4 lo = load_or_zero(arow + int64_t(ra) * a.K + k, k_ok && ra < rank);
      const uint4 hi = load_or_zero(arow + int64_t(rb) * a.K + k, k_ok && rb < rank);
      const uint32_t f0[4] = {lo.x, hi.x, lo.y, hi.y};
      const uint32_t f1[4] = {lo.z, hi.z, lo.w, hi.w};
      mma_bf16_16816(acc[t], f0, x.x, x.y);
      mma_bf16_16816(acc[t], f1, x.z, x.w);
    }
  }
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    red[warp][t * 16 + g][2 * tig] = acc[t][0];
    red[warp][t * 16 + g][2 * tig + 1] = acc[t][1];
    red[warp][t * 16 + g + 8][2 * tig] = acc[t][2];
    red[warp][t * 16 + g + 8][2 * tig + 1] = acc[t][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kShrinkRanks * 8; i += kShrinkWarps * 32) {
    const int r = i >> 3, col = i & 7;
    if (r0 + r >= rank || n0 + col >= plan.block_m) continue;
    const int sc = plan.sorted_slots[b * plan.block_m + n0 + col];
    if (sc >= plan.num_slots) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kShrinkWarps; ++w) sum += red[w][r][col];
    a.u[split * a.split_stride + int64_t(sc) * a.ldu + r0 + r] = sum;
  }
}

// Eight B values of ranks [r, r + 8) of one output row, zero at ranks >= rank.
template <bool kVec>
__device__ __forceinline__ void load_b8(const __nv_bfloat16* row, int r, int rank, float (&b)[8]) {
  if (r >= rank) {
#pragma unroll
    for (int i = 0; i < 8; ++i) b[i] = 0.0f;
    return;
  }
  if constexpr (kVec) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + r));
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      b[2 * i] = r + 2 * i < rank ? f.x : 0.0f;
      b[2 * i + 1] = r + 2 * i + 1 < rank ? f.y : 0.0f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) b[i] = r + i < rank ? __bfloat162float(row[r + i]) : 0.0f;
  }
}

// Shared-memory row stride of staged u: the block's live columns plus one rank chunk of
// zeros, so unrolled reads past a rank stay in bounds and read zero.
constexpr int kExpandRankChunk = 64;

// grid: (plan blocks, ceil(N / kExpandCols)); dynamic smem: kExpandSlots * (ldu + 64) floats.
// kVec: r_max % 8 == 0, so B rows take 16-byte loads.
template <bool kVec>
__global__ void __launch_bounds__(kExpandThreads)
    moe_lora_expand_kernel(LoraPlanView plan, ExpandArgs a) {
  extern __shared__ float us[];  // [kExpandSlots][stride]
  pdl_wait();
  pdl_trigger();
  const int b = blockIdx.x;
  if (b * plan.block_m >= plan.num_padded[0]) return;
  const int v = plan.block_group[b];
  if (v < 0) return;
  const int slot = v / plan.num_experts, e = v % plan.num_experts;
  const int32_t* m = a.meta + slot * 6;
  // (rank, u column) of the gate half and of the up half; down uses one pair.
  int rank_lo, col_lo, rank_hi, col_hi;
  if (a.gate_up) {
    rank_lo = m[1], col_lo = m[2], rank_hi = m[3], col_hi = m[4];
  } else {
    rank_lo = rank_hi = m[5];
    col_lo = col_hi = 0;
  }
  col_lo = max(0, min(col_lo, a.ldu)), col_hi = max(0, min(col_hi, a.ldu));
  rank_lo = max(0, min(rank_lo, min(a.r_max, a.ldu - col_lo)));
  rank_hi = max(0, min(rank_hi, min(a.r_max, a.ldu - col_hi)));
  if (rank_lo == 0 && rank_hi == 0) return;
  const int width = max(col_lo + rank_lo, col_hi + rank_hi);
  const int stride = width + kExpandRankChunk;
  const int half = a.gate_up ? a.N / 2 : a.N;

  const int i0 = blockIdx.y * kExpandCols + threadIdx.x * 2;  // this thread's columns i0, i0+1
  const bool active = i0 < a.N;
  int rk[2], cl[2];
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const bool lo = i0 + c < half;
    rk[c] = active ? (lo ? rank_lo : rank_hi) : 0;
    cl[c] = lo ? col_lo : col_hi;
  }
  const int rmax = max(rk[0], rk[1]);
  const __nv_bfloat16* brow =
      static_cast<const __nv_bfloat16*>(a.B) + ((int64_t(slot) * plan.num_experts + e) * a.N + i0) * a.r_max;

  for (int j0 = 0; j0 < plan.block_m; j0 += kExpandSlots) {
    // Output rows first: their loads overlap the staging of u below.
    float2 prev[kExpandSlots];
    int srow[kExpandSlots];
#pragma unroll
    for (int j = 0; j < kExpandSlots; ++j) {
      srow[j] = j0 + j < plan.block_m ? plan.sorted_slots[b * plan.block_m + j0 + j] : plan.num_slots;
      if (active && srow[j] < plan.num_slots)
        prev[j] = *reinterpret_cast<const float2*>(a.out + int64_t(srow[j]) * a.N + i0);
    }
    __syncthreads();  // the previous step's readers are done with `us`
    // Stage u (summing K-split partials); only live columns are read from u, the rest may be
    // unwritten NaN poison. Slots unrolled so all loads of a column are in flight together.
    for (int c = threadIdx.x; c < stride; c += kExpandThreads) {
      const bool live_col =
          (c >= col_lo && c < col_lo + rank_lo) || (c >= col_hi && c < col_hi + rank_hi);
#pragma unroll
      for (int j = 0; j < kExpandSlots; ++j) {
        float v = 0.0f;
        if (live_col && srow[j] < plan.num_slots)
          for (int sp = 0; sp < a.splits; ++sp)
            v += a.u[sp * a.split_stride + int64_t(srow[j]) * a.ldu + c];
        us[j * stride + c] = v;
      }
    }
    __syncthreads();
    if (!active) continue;
    float acc[kExpandSlots][2] = {};
    for (int rc = 0; rc < rmax; rc += kExpandRankChunk) {
#pragma unroll
      for (int q = 0; q < kExpandRankChunk / 8; ++q) {
        const int r = rc + q * 8;
        if (r >= rmax) break;
        float bv[2][8];
        load_b8<kVec>(brow, r, rk[0], bv[0]);
        load_b8<kVec>(brow + a.r_max, r, rk[1], bv[1]);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if (r >= rk[c]) continue;
          const float* ur = us + cl[c] + r;
#pragma unroll
          for (int j = 0; j < kExpandSlots; ++j)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[j][c] += bv[c][i] * ur[j * stride + i];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kExpandSlots; ++j) {
      if (srow[j] >= plan.num_slots) continue;
      const float w = a.slot_weights ? a.slot_weights[srow[j]] : 1.0f;
      prev[j].x += w * acc[j][0];
      prev[j].y += w * acc[j][1];
      *reinterpret_cast<float2*>(a.out + int64_t(srow[j]) * a.N + i0) = prev[j];
    }
  }
}

__global__ void moe_lora_group_ids_kernel(const int32_t* __restrict__ ids,
                                          const int32_t* __restrict__ token_slot, int top_k,
                                          int num_experts, int64_t n, int32_t* __restrict__ vids) {
  pdl_wait();
  pdl_trigger();
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= n) return;
  const int slot = token_slot[s / top_k], e = ids[s];
  vids[s] = (slot >= 0 && e >= 0) ? slot * num_experts + e : -1;
}

}  // namespace moelora::cuda::detail
