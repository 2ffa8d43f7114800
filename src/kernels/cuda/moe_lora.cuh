// Device code for LoRA on experts, grouped by virtual expert v = slot * E + expert.
//
// Shrink (u = A . x per aligned slot) runs on tensor cores: mma.sync m16n8k16 with LoRA ranks
// in M and 8 token-slots in N, so one MMA covers a whole rank-16 adapter for 8 slots; warps
// split K and meet in shared memory. The k order inside each 32-wide chunk is permuted the
// same way for A and x, so every thread does plain 16-byte loads of both.
// Expand (out += w . B . u) is FMA work on the (small) rank. moe_lora_expand4_kernel (the
// common shapes) gives each thread four output columns (16-byte read-modify-write), stages
// u transposed so one rank costs two broadcast 16-byte shared loads, and B whole via cp.async;
// moe_lora_expand_kernel (two columns per thread, scalar staging) covers the other shapes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "kernels/cuda/moe_lora_epilogue.cuh"  // bf16x8_to_float, load_or_zero
#include "kernels/cuda/moe_ops_launch.h"
#include "kernels/cuda/pdl_launch.cuh"

namespace moelora::cuda::detail {

// Many warps per CTA split K so a whole A tile is in flight at once (batch 1 has one CTA
// per touched (adapter, expert) pair: latency, not bandwidth, bounds it).
constexpr int kShrinkWarps = 16;
constexpr int kShrinkRanks = 64;       // ranks per CTA (4 MMA row tiles)
constexpr int kShrinkStreamWarps = 8;  // the fast path's shrink: 2+ CTAs per SM
constexpr int kExpandThreads = 128;
constexpr int kExpandCols = 2 * kExpandThreads;
constexpr int kExpandSlots = 8;  // slots staged per step

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Slot tiles of 8 a CTA computes per pass with the same A fragments: a block of 16+ slots
// reads its (adapter, expert)'s A once per pass instead of once per 8 slots (at large batch
// and rank 64 the re-reads were most of the shrink's traffic).
constexpr int kShrinkTiles = 2;

// grid: (plan blocks, ceil(R / (16 * kRt)), splits); block: kWarps warps splitting K. Each CTA
// runs every 8-slot tile of its block (padding tiles, which come last, are skipped), kTiles
// tiles per pass on the same A fragments (kRt 16-rank MMA tiles), kUnroll K chunks of 32 in
// flight per warp. The hook path's shape is <kShrinkWarps, 4, kShrinkTiles, 2>; the fast
// path's (moe_lora_shrink_stream) trades ranks per CTA for slot tiles and occupancy.
template <int kWarps, int kRt, int kTiles, int kUnroll>
__global__ void __launch_bounds__(kWarps * 32)
    moe_lora_shrink_kernel(LoraPlanView plan, ShrinkArgs a) {
  constexpr int kRanks = 16 * kRt;
  __shared__ float red[kWarps][kRanks][8];
  pdl_wait();
  pdl_trigger();
  const int b = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int32_t* slots = plan.sorted_slots + b * plan.block_m;
  // Latency: a CTA streams only a few round trips' worth of A, so the dependent loads before
  // its first A byte cost as much as the stream. Everything that depends on the block index
  // alone (padded size, the block's group, this thread's first slot tile; the plan holds every
  // launched block, so the reads are in bounds even for blocks past the padded size) is
  // requested at once; then the adapter's rank; then A and x together. Read one after
  // another these were five round trips.
  const int num_padded = plan.num_padded[0];
  const int v = plan.block_group[b];
  int tile_slot[kTiles];  // slot of this thread's row g in each tile of the current pass
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    const int pos = t * 8 + g;
    tile_slot[t] = pos < plan.block_m ? slots[pos] : plan.num_slots;
  }
  int lead = slots[0];  // first slot of the pass: padding means the rest is padding too
  if (b * plan.block_m >= num_padded || v < 0) return;
  const int slot = v / plan.num_experts, e = v % plan.num_experts;
  const int rank = min(a.meta[slot * 6 + a.rank_field], a.R);
  const int r0 = blockIdx.y * kRanks;
  if (r0 >= rank) return;
  const int ntiles = (plan.block_m + 7) / 8;
  const int split = int(blockIdx.z);

  const __nv_bfloat16* arow =
      static_cast<const __nv_bfloat16*>(a.A) + (int64_t(slot) * plan.num_experts + e) * a.R * a.K;
  const int chunks = (a.K + 31) / 32;
  const int per_split = (chunks + a.splits - 1) / a.splits;
  const int c0 = split * per_split, c1 = min(chunks, c0 + per_split);
  const int per_warp = (c1 - c0 + kWarps - 1) / kWarps;
  const int c_end = min(c1, c0 + (warp + 1) * per_warp);

  for (int t0 = 0; t0 < ntiles; t0 += kTiles) {
    if (t0 > 0) {
      lead = slots[t0 * 8];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        const int pos = (t0 + t) * 8 + g;
        tile_slot[t] = pos < plan.block_m ? slots[pos] : plan.num_slots;
      }
    }
    if (lead >= plan.num_slots) break;  // only padding from here on
    const int nt = min(kTiles, ntiles - t0);
    // This thread's x rows (slot column g of each MMA tile).
    const __nv_bfloat16* xrow[kTiles];
    bool has_row[kTiles];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const int s = t < nt ? tile_slot[t] : plan.num_slots;
      has_row[t] = s < plan.num_slots;
      xrow[t] =
          static_cast<const __nv_bfloat16*>(a.in) + int64_t(has_row[t] ? s / a.rows_div : 0) * a.K;
    }
    float acc[kTiles][kRt][4] = {};
#pragma unroll kUnroll
    for (int c = c0 + warp * per_warp; c < c_end; ++c) {
      const int k = c * 32 + tig * 8;
      const bool k_ok = k < a.K;
      uint32_t f0[kRt][4], f1[kRt][4];
#pragma unroll
      for (int t = 0; t < kRt; ++t) {
        const int ra = r0 + t * 16 + g, rb = ra + 8;
        const uint4 lo = load_or_zero(arow + int64_t(ra) * a.K + k, k_ok && ra < rank);
        const uint4 hi = load_or_zero(arow + int64_t(rb) * a.K + k, k_ok && rb < rank);
        f0[t][0] = lo.x, f0[t][1] = hi.x, f0[t][2] = lo.y, f0[t][3] = hi.y;
        f1[t][0] = lo.z, f1[t][1] = hi.z, f1[t][2] = lo.w, f1[t][3] = hi.w;
      }
#pragma unroll
      for (int n = 0; n < kTiles; ++n) {
        if (n >= nt) break;
        const uint4 x = load_or_zero(xrow[n] + k, k_ok && has_row[n]);
#pragma unroll
        for (int t = 0; t < kRt; ++t) {
          mma_bf16_16816(acc[n][t], f0[t], x.x, x.y);
          mma_bf16_16816(acc[n][t], f1[t], x.z, x.w);
        }
      }
    }
#pragma unroll
    for (int n = 0; n < kTiles; ++n) {
      if (n >= nt) break;
      __syncthreads();  // the previous tile's readers are done with `red`
#pragma unroll
      for (int t = 0; t < kRt; ++t) {
        red[warp][t * 16 + g][2 * tig] = acc[n][t][0];
        red[warp][t * 16 + g][2 * tig + 1] = acc[n][t][1];
        red[warp][t * 16 + g + 8][2 * tig] = acc[n][t][2];
        red[warp][t * 16 + g + 8][2 * tig + 1] = acc[n][t][3];
      }
      __syncthreads();
      const int n0 = (t0 + n) * 8;
      for (int i = threadIdx.x; i < kRanks * 8; i += kWarps * 32) {
        const int r = i >> 3, col = i & 7;
        if (r0 + r >= rank || n0 + col >= plan.block_m) continue;
        const int sc = slots[n0 + col];
        if (sc >= plan.num_slots) continue;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += red[w][r][col];
        a.u[split * a.split_stride + int64_t(sc) * a.ldu + r0 + r] = sum;
      }
    }
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
  // (rank, u column) of the gate half and of the up half; down uses one pair.
  const SeamRanks sr = SeamRanks::of(a.meta + slot * 6, a.gate_up).clamped(a.ldu, a.r_max);
  const int rank_lo = sr.rank_lo, col_lo = sr.col_lo, rank_hi = sr.rank_hi, col_hi = sr.col_hi;
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
  const __nv_bfloat16* brow = static_cast<const __nv_bfloat16*>(a.B) +
                              ((int64_t(slot) * plan.num_experts + e) * a.N + i0) * a.r_max;

  for (int j0 = 0; j0 < plan.block_m; j0 += kExpandSlots) {
    // Output rows first: their loads overlap the staging of u below.
    float2 prev[kExpandSlots];
    int srow[kExpandSlots];
#pragma unroll
    for (int j = 0; j < kExpandSlots; ++j) {
      srow[j] =
          j0 + j < plan.block_m ? plan.sorted_slots[b * plan.block_m + j0 + j] : plan.num_slots;
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

// Vectorized expand (the common case: N and the gate/up half multiples of 4, r_max % 8 == 0).
// Each thread owns four adjacent output columns (16-byte read-modify-write of out rows), and
// u is staged transposed, [column][8 slots], so one rank costs two broadcast 16-byte shared
// loads for 32 FMAs (the scalar-staged kernel above spends one shared load per FMA, which
// bounds it at rank 64 and large batch). B rows past a slot's rank are zero-padded by the
// pool; staged u is zero outside the live columns (they may hold NaN poison).
// kDelta: write w * delta to the block's rows of out without reading them (the hooks' delta
// buffer); adapters without this seam write zeros, so every aligned slot's row is written.
constexpr int kExpand4Threads = 128;
constexpr int kExpand4Cols = 4 * kExpand4Threads;
constexpr int kExpand4Pad = 8;  // zero rows after the ldu staged columns (rank rounding)

// K-split partials the expand sums (the ops check splits <= kMaxLoraSplits, moe_fused_ops.h;
// keep the two equal).
constexpr int kMaxSplits = 8;

// Ranks up to which B is staged whole in shared memory (r_max KB per CTA).
constexpr int kExpandStageRanks = 64;

__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// grid: (plan blocks, ceil(N / kExpand4Cols)); dynamic smem: (ldu + kExpand4Pad) * 8 floats of
// staged u, then (kStageB) r_max / 8 * 4 * kExpand4Threads uint4 of B.
// kStageB (r_max <= kExpandStageRanks): every B value a thread needs is requested at once
// with cp.async as soon as the adapter's rank is known, so a rank-64 adapter costs one memory
// round trip instead of one per 8 ranks. Each thread reads back only what it copied (no
// barrier needed, just its own wait). Otherwise B is read per 8 ranks from global memory.
// Latency (batch 1-4 has one slot per CTA, so the kernel is a chain of dependent loads): the
// plan's three reads (num_padded, block_group, the first 8 sorted slots) are issued together,
// and the first slot group's u, out rows and weights are requested before the adapter's meta
// is used (they depend on the slots only), so the chain is plan -> meta/u/out -> B instead of
// six round trips one after another.
template <bool kDelta, bool kStageB>
__global__ void __launch_bounds__(kExpand4Threads)
    moe_lora_expand4_kernel(LoraPlanView plan, ExpandArgs a) {
  extern __shared__ float4 us4[];  // [ldu + pad][2]: 8 slots of one u column; then B
  pdl_wait();
  pdl_trigger();
  const int b = blockIdx.x;
  // Every CTA of the worst-case grid may read its block's entries (they exist, possibly stale).
  const int padded = plan.num_padded[0];
  const int v = plan.block_group[b];
  int srow[kExpandSlots];
#pragma unroll
  for (int j = 0; j < kExpandSlots; ++j)
    srow[j] = j < plan.block_m ? plan.sorted_slots[b * plan.block_m + j] : plan.num_slots;
  if (b * plan.block_m >= padded || v < 0) return;
  const int slot = v / plan.num_experts, e = v % plan.num_experts;
  // SeamRanks spelled out: its raw values are read here, clamped twice below (the staging
  // loop needs them before the rest); kept inline because the helper changed this kernel's
  // register allocation (241 -> 248 with kDelta) and it could not be re-measured (session 7).
  const int32_t* m = a.meta + slot * 6;
  int rank_lo, col_lo, rank_hi, col_hi;
  if (a.gate_up) {
    rank_lo = m[1], col_lo = m[2], rank_hi = m[3], col_hi = m[4];
  } else {
    rank_lo = rank_hi = m[5];
    col_lo = col_hi = 0;
  }
  const int half = a.gate_up ? a.N / 2 : a.N;
  const int i0 = blockIdx.y * kExpand4Cols + threadIdx.x * 4;  // columns i0 .. i0+3
  const bool active = i0 < a.N;
  const int rows = a.ldu + kExpand4Pad;

  for (int j0 = 0; j0 < plan.block_m; j0 += kExpandSlots) {
    if (j0 > 0) {
#pragma unroll
      for (int j = 0; j < kExpandSlots; ++j)
        srow[j] =
            j0 + j < plan.block_m ? plan.sorted_slots[b * plan.block_m + j0 + j] : plan.num_slots;
    }
    if (srow[0] >= plan.num_slots) break;  // padding follows
    float4 prev[kExpandSlots];
    float w[kExpandSlots];
#pragma unroll
    for (int j = 0; j < kExpandSlots; ++j) {
      const bool live = srow[j] < plan.num_slots;
      w[j] = a.slot_weights && live ? a.slot_weights[srow[j]] : 1.0f;
      prev[j] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (!kDelta && active && live)
        prev[j] = *reinterpret_cast<const float4*>(a.out + int64_t(srow[j]) * a.N + i0);
    }
    if (j0 > 0) __syncthreads();  // the previous step's readers are done with us
    // Stage u transposed, summing K-split partials. Loads of every column < ldu are issued
    // regardless of the adapter's meta (in bounds; dead columns may hold NaN poison and are
    // replaced by zero below, by selection, never by arithmetic).
    for (int c = threadIdx.x; c < rows; c += kExpand4Threads) {
      float val[kExpandSlots];
#pragma unroll
      for (int j = 0; j < kExpandSlots; ++j) {
        float t = 0.0f;
        if (c < a.ldu && srow[j] < plan.num_slots) {
          const float* up = a.u + int64_t(srow[j]) * a.ldu + c;
#pragma unroll
          for (int sp = 0; sp < kMaxSplits; ++sp)
            if (sp < a.splits) t += up[sp * a.split_stride];
        }
        val[j] = t;
      }
      // Meta is needed from here on (it was loaded together with u above).
      const int cl_lo = max(0, min(col_lo, a.ldu)), cl_hi = max(0, min(col_hi, a.ldu));
      const int rk_lo = max(0, min(rank_lo, min(a.r_max, a.ldu - cl_lo)));
      const int rk_hi = max(0, min(rank_hi, min(a.r_max, a.ldu - cl_hi)));
      const bool live_col =
          c < a.ldu && ((c >= cl_lo && c < cl_lo + rk_lo) || (c >= cl_hi && c < cl_hi + rk_hi));
#pragma unroll
      for (int j = 0; j < kExpandSlots; ++j) val[j] = live_col ? val[j] : 0.0f;
      us4[2 * c] = make_float4(val[0], val[1], val[2], val[3]);
      us4[2 * c + 1] = make_float4(val[4], val[5], val[6], val[7]);
    }
    col_lo = max(0, min(col_lo, a.ldu)), col_hi = max(0, min(col_hi, a.ldu));
    rank_lo = max(0, min(rank_lo, min(a.r_max, a.ldu - col_lo)));
    rank_hi = max(0, min(rank_hi, min(a.r_max, a.ldu - col_hi)));
    if (!kDelta && rank_lo == 0 && rank_hi == 0) return;  // uniform over the CTA
    const bool lo = i0 < half;
    const int rk = active ? (lo ? rank_lo : rank_hi) : 0;
    const int cl = lo ? col_lo : col_hi;
    const __nv_bfloat16* brow =
        static_cast<const __nv_bfloat16*>(a.B) +
        ((int64_t(slot) * plan.num_experts + e) * a.N + (active ? i0 : 0)) * a.r_max;
    uint4* sb = reinterpret_cast<uint4*>(us4 + 2 * rows);  // [r / 8][4 columns][threads]
    // B of ranks < rk, this thread's four rows: requested once, on the first slot group
    // (each thread reads back only what it copied: no barrier, just its own wait).
    if (kStageB && j0 == 0) {
      for (int q = 0; q * 8 < rk; ++q)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          cp_async_16(&sb[(q * 4 + c) * kExpand4Threads + threadIdx.x], brow + c * a.r_max + q * 8);
    }
    __syncthreads();
    if (!active) continue;
    float acc[kExpandSlots][4] = {};
    if constexpr (kStageB) cp_async_wait_all();
    for (int r = 0; r < rk; r += 8) {
      uint4 bq[4];
      if constexpr (kStageB) {
#pragma unroll
        for (int c = 0; c < 4; ++c) bq[c] = sb[((r >> 3) * 4 + c) * kExpand4Threads + threadIdx.x];
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c)
          bq[c] = __ldg(reinterpret_cast<const uint4*>(brow + c * a.r_max + r));
      }
      float bv[4][8];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        bf16x8_to_float(bq[c], bv[c]);
#pragma unroll
        for (int i = 0; i < 8; ++i) bv[c][i] = r + i < rk ? bv[c][i] : 0.0f;
      }
      const float4* ur = us4 + 2 * (cl + r);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float4 u0 = ur[2 * i], u1 = ur[2 * i + 1];
        const float uj[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
#pragma unroll
        for (int j = 0; j < kExpandSlots; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[j][c] = fmaf(bv[c][i], uj[j], acc[j][c]);
      }
    }
#pragma unroll
    for (int j = 0; j < kExpandSlots; ++j) {
      if (srow[j] >= plan.num_slots) continue;
      float4 o = prev[j];
      o.x += w[j] * acc[j][0], o.y += w[j] * acc[j][1];
      o.z += w[j] * acc[j][2], o.w += w[j] * acc[j][3];
      *reinterpret_cast<float4*>(a.out + int64_t(srow[j]) * a.N + i0) = o;
    }
  }
}

// h[s] += d[s] for the slots that carry an adapter (token_slot[s / k] in [0, num_lora_slots)
// and a valid expert): the critical-path half of the hooks' small-batch path, whose delta d
// was computed on the side stream. One 16-byte column group per thread; every load is
// independent of the others, so the kernel costs one memory round trip.
__global__ void moe_lora_add_delta_kernel(const float4* __restrict__ d,
                                          const int32_t* __restrict__ ids,
                                          const int32_t* __restrict__ token_slot, int top_k,
                                          int num_experts, int num_lora_slots, int64_t n, int n4,
                                          float4* __restrict__ out) {
  pdl_wait();
  pdl_trigger();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * n4) return;
  const int64_t s = i / n4;
  const int ts = token_slot[s / top_k], e = ids[s];
  const float4 dv = d[i];
  float4 o = out[i];
  if (ts < 0 || ts >= num_lora_slots || e < 0 || e >= num_experts) return;
  o.x += dv.x, o.y += dv.y, o.z += dv.z, o.w += dv.w;
  out[i] = o;
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
