// Device code of the inline LoRA CTAs an expert GEMM grid may carry (moe_lora_inline_launch.h).
//
// One CTA handles one part of one plan block of the GEMM it rides with: the gate or up half
// (gate_up) or the whole down seam, one slice of the shrink's K (its partial delta, by
// linearity B . (A . in) summed over K slices, goes to its own buffer; the consumer adds the
// slices in order: deterministic) and one slice of the seam's output columns. For each
// adapter present among the block's slots (ascending slot id, so the result does not depend
// on scheduling), 16 slots and 32 ranks at a time:
//  - shrink u = A . in on tensor cores (mma m16n8k16, ranks in M, slots in N), warps splitting
//    K, the k order inside each 32-wide chunk permuted alike for A and in so every lane does
//    plain 16-byte loads (as moe_lora.cuh's shrink); partial sums meet in shared memory and
//    are added in warp order (deterministic);
//  - expand delta[slot, col] (+)= w(slot) . B[col, r0 : r0 + 32] . u on CUDA cores, one column
//    per thread (16-byte B loads, u broadcast from shared memory), written straight to f32
//    delta rows (the first rank pass stores, later passes add to what this thread stored).
// Slots with an adapter whose rank for this seam is 0 get zero rows, so the consumer (the
// activation / reduction, LoraDeltaView) can add every adapter slot's row.
// The CTA runs with whatever block size its GEMM has (2 to kInlineMaxWarps warps) and borrows
// the GEMM's dynamic shared memory (the launcher makes it at least moe_lora_inline_smem).
#pragma once

#include <climits>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/moe_lora_inline_launch.h"
#include "kernels/cuda/sm90_moe_gemm.cuh"

namespace moelora::cuda::sm90 {

// The plan the GEMM runs: blocks of block_m slots, each block's group is its expert.
struct InlinePlan {
  const int32_t* sorted_slots;
  const int32_t* block_group;
  const int32_t* num_padded;
  int block_m;
  int num_slots;
};

// Inlined: a call (noinline) made ptxas spill 600-800 bytes in the wide-tile GEMMs.
__device__ __forceinline__ void moe_lora_inline_unit(const MoeLoraInlineArgs& L,
                                                     const InlinePlan& plan, int unit,
                                                     unsigned char* smem) {
  using ::moelora::cuda::detail::bf16x8_to_float;
  using ::moelora::cuda::detail::load_or_zero;
  constexpr int kRk = kInlineRanks, kRw = kInlineRows;
  const int tid = threadIdx.x, nthreads = blockDim.x, warps = nthreads / 32;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const int halves = L.gate_up ? 2 : 1;
  const int b = unit / L.parts, part = unit % L.parts;
  const int half = part % halves, ks = (part / halves) % L.k_splits;
  const int chunk = part / (halves * L.k_splits), nsplit = L.parts / (halves * L.k_splits);
  if (b * plan.block_m >= __ldcg(plan.num_padded)) return;
  const int e = __ldcg(plan.block_group + b);
  if (e < 0) return;

  float* red = reinterpret_cast<float*>(smem);  // [warps][kRk][kRw]
  float* us = red + warps * kRk * kRw;          // [kRk][kRw]
  int* row_slot = reinterpret_cast<int*>(us + kRk * kRw);
  int* row_ad = row_slot + plan.block_m;
  int* list = row_ad + plan.block_m;                     // [kRw] slots of this pass
  float* list_w = reinterpret_cast<float*>(list + kRw);  // [kRw] their weights
  int* count = reinterpret_cast<int*>(list_w + kRw);     // [2] rows, scan position

  for (int j = tid; j < plan.block_m; j += nthreads) {
    const int s = __ldcg(plan.sorted_slots + b * plan.block_m + j);
    int ad = -1;
    if (s >= 0 && s < plan.num_slots) {
      const int t = L.token_slot[s / L.top_k];
      if (t >= 0 && t < L.num_lora_slots) ad = t;
    }
    row_slot[j] = s;
    row_ad[j] = ad;
  }
  __syncthreads();

  const int nh = L.N / halves;  // this half's columns
  const int per = (nh + nsplit - 1) / nsplit;
  const int n_lo = chunk * per, n_hi = min(nh, n_lo + per);
  const int out_off = half * nh;
  const int chunks = (L.K + 31) / 32;
  const int per_split = (chunks + L.k_splits - 1) / L.k_splits;
  const int c_lo = ks * per_split, c_hi = min(chunks, c_lo + per_split);
  const __nv_bfloat16* in = static_cast<const __nv_bfloat16*>(L.in);
  float* delta = L.delta + ks * L.split_stride;

  for (int prev = -1;;) {
    int a = INT_MAX;  // the next adapter (every thread finds the same)
    for (int j = 0; j < plan.block_m; ++j) {
      const int v = row_ad[j];
      if (v > prev && v < a) a = v;
    }
    if (a == INT_MAX) break;
    prev = a;
    const int32_t* m = L.meta + a * 6;
    int rank = L.gate_up ? (half ? m[3] : m[1]) : m[5];
    int col = L.gate_up ? (half ? m[4] : m[2]) : 0;
    col = max(0, min(col, L.R));
    rank = max(0, min(rank, min(L.r_max, L.R - col)));
    const int64_t pair = int64_t(a) * L.num_experts + e;
    const __nv_bfloat16* A = static_cast<const __nv_bfloat16*>(L.A) + (pair * L.R + col) * L.K;
    const __nv_bfloat16* B =
        static_cast<const __nv_bfloat16*>(L.B) + (pair * L.N + out_off) * L.r_max;
    const int passes = max(1, (rank + kRk - 1) / kRk);

    for (int j_scan = 0; j_scan < plan.block_m;) {
      __syncthreads();  // the previous pass's readers are done with list, us
      if (tid == 0) {
        int c = 0, j = j_scan;
        for (; j < plan.block_m && c < kRw; ++j)
          if (row_ad[j] == a) {
            const int s = row_slot[j];
            list[c] = s;
            list_w[c] = L.slot_weights ? L.slot_weights[s] : 1.0f;
            ++c;
          }
        count[0] = c;
        count[1] = j;
      }
      __syncthreads();
      const int nrows = count[0];
      j_scan = count[1];
      if (nrows == 0) break;

      for (int p = 0; p < passes; ++p) {
        const int r0 = p * kRk;
        const int rk = min(kRk, max(0, rank - r0));
        float acc[2][2][4] = {};  // [slot tile][rank tile][fragment]
        if (rk > 0) {
          const bool two_rt = rk > 16, two_nt = nrows > 8;
          const __nv_bfloat16* xr[2];
          bool hx[2];
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            const int i = n * 8 + g;
            hx[n] = i < nrows;
            xr[n] = in + int64_t(hx[n] ? list[i] / L.rows_div : 0) * L.K;
          }
#pragma unroll 2
          for (int c = c_lo + warp; c < c_hi; c += warps) {
            const int k = c * 32 + tig * 8;
            const bool k_ok = k < L.K;
            uint32_t f0[2][4], f1[2][4];
#pragma unroll
            for (int t = 0; t < 2; ++t) {
              const int ra = r0 + t * 16 + g, rb = ra + 8;
              const bool on = t == 0 || two_rt;
              const uint4 lo = load_or_zero(A + int64_t(ra) * L.K + k, on && k_ok && ra < rank);
              const uint4 hi = load_or_zero(A + int64_t(rb) * L.K + k, on && k_ok && rb < rank);
              f0[t][0] = lo.x, f0[t][1] = hi.x, f0[t][2] = lo.y, f0[t][3] = hi.y;
              f1[t][0] = lo.z, f1[t][1] = hi.z, f1[t][2] = lo.w, f1[t][3] = hi.w;
            }
#pragma unroll
            for (int n = 0; n < 2; ++n) {
              if (n == 1 && !two_nt) break;
              const uint4 x = load_or_zero(xr[n] + k, k_ok && hx[n]);
#pragma unroll
              for (int t = 0; t < 2; ++t) {
                if (t == 1 && !two_rt) break;
                detail::mma_bf16_16816(acc[n][t], f0[t], x.x, x.y);
                detail::mma_bf16_16816(acc[n][t], f1[t], x.z, x.w);
              }
            }
          }
        }
        // Partial sums: red[warp][rank][slot].
        float* rw = red + warp * kRk * kRw;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int t = 0; t < 2; ++t) {
            const int r = t * 16 + g, s = n * 8 + 2 * tig;
            rw[r * kRw + s] = acc[n][t][0];
            rw[r * kRw + s + 1] = acc[n][t][1];
            rw[(r + 8) * kRw + s] = acc[n][t][2];
            rw[(r + 8) * kRw + s + 1] = acc[n][t][3];
          }
        __syncthreads();
        for (int i = tid; i < kRk * kRw; i += nthreads) {
          float sum = 0.0f;
          for (int w = 0; w < warps; ++w) sum += red[w * kRk * kRw + i];
          us[i] = sum;
        }
        __syncthreads();
        // Expand this CTA's columns, two per thread at a time with every B load of both
        // issued before the FMAs; B is zero past the rank inside r_max (the pool pads it),
        // and rank <= r_max with r_max % 8 == 0, so 8-rank loads stay inside the row.
        for (int n0 = n_lo + tid; n0 < n_hi; n0 += 2 * nthreads) {
          const int n1 = n0 + nthreads;
          const bool has1 = n1 < n_hi;
          float o0[kRw] = {}, o1[kRw] = {};
          const __nv_bfloat16* b0 = B + int64_t(n0) * L.r_max + r0;
          const __nv_bfloat16* b1 = B + int64_t(has1 ? n1 : n0) * L.r_max + r0;
          uint4 bq0[kRk / 8], bq1[kRk / 8];
#pragma unroll
          for (int q = 0; q < kRk / 8; ++q) {
            bq0[q] = q * 8 < rk ? __ldg(reinterpret_cast<const uint4*>(b0 + q * 8))
                                : make_uint4(0, 0, 0, 0);
            bq1[q] = q * 8 < rk ? __ldg(reinterpret_cast<const uint4*>(b1 + q * 8))
                                : make_uint4(0, 0, 0, 0);
          }
#pragma unroll
          for (int q = 0; q < kRk / 8; ++q) {
            if (q * 8 >= rk) break;
            float bv0[8], bv1[8];
            bf16x8_to_float(bq0[q], bv0);
            bf16x8_to_float(bq1[q], bv1);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              const float* ur = us + (q * 8 + i) * kRw;
#pragma unroll
              for (int r = 0; r < kRw; ++r) {
                o0[r] = fmaf(bv0[i], ur[r], o0[r]);
                o1[r] = fmaf(bv1[i], ur[r], o1[r]);
              }
            }
          }
#pragma unroll
          for (int r = 0; r < kRw; ++r) {
            if (r >= nrows) break;
            float* dst = delta + int64_t(list[r]) * L.N + out_off;
            const float v0 = list_w[r] * o0[r], v1 = list_w[r] * o1[r];
            dst[n0] = p == 0 ? v0 : dst[n0] + v0;
            if (has1) dst[n1] = p == 0 ? v1 : dst[n1] + v1;
          }
        }
      }
    }
  }
}

// For a GEMM kernel whose grid carries inline LoRA CTAs (the first p.lora_blocks entries of its
// block axis): runs this CTA's LoRA unit and returns true when it is one of them; otherwise
// shifts the CTA's block coordinate past them and returns false.
template <class Params>
__device__ __forceinline__ bool inline_lora_cta(const Params& p, int& bx, int& by,
                                                unsigned char* smem) {
  const int lb = p.lora_blocks;
  int& block = p.row_tiles_fastest ? by : bx;
  if (block >= lb) {
    block -= lb;
    return false;
  }
  const int unit = p.row_tiles_fastest ? by * int(gridDim.x) + bx : by * lb + bx;
  if (unit < p.lora_units)
    moe_lora_inline_unit(
        p.inline_lora,
        InlinePlan{p.sorted_slots, p.block_group, p.num_padded, p.block_m, p.num_slots}, unit,
        smem);
  // Finish only after the predecessor, as the GEMM CTAs do: a successor's plan_ready relies
  // on this grid's completion implying its predecessor's.
  if (p.plan_ready) asm volatile("griddepcontrol.wait;\n" ::: "memory");
  return true;
}

}  // namespace moelora::cuda::sm90
