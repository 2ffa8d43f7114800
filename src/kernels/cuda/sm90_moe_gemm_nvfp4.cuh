// Device code of the NVFP4 expert GEMMs on Hopper (no FP4 tensor cores): e2m1 codes and e4m3
// block scales stream from HBM, are dequantized to bf16 in registers and feed the same swapped
// mma.m16n8k16 as the bf16 kernel (sm90_moe_gemm.cuh, whose helpers this reuses): weight rows
// on the M side, the block's tokens on N.
//
// Weights stream with plain cp.async.cg (MoeGemmNvfp4Args::evict_first says why not
// evict-first). Codes are pre-arranged (src/quant/experts_nvfp4.cpp) so that a lane's one 16-byte shared
// load holds its A fragments for four K steps; each 32-bit word becomes the four A registers
// with shifts and masks (the bf16 bit pattern of e2m1 * 2^-126), then one bf16x2 multiply by
// the e4m3 block scale * 2^119. Both steps are exact: e2m1 * e4m3 has at most 6 significant
// bits, so the MMA sees exactly code * scale * 2^-7; the f32 product is scaled by the global
// scale * 2^7 in the epilogue.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "kernels/cuda/moe_gemm_nvfp4_launch.h"
#include "kernels/cuda/sm90_moe_gemm.cuh"

namespace moelora::cuda::sm90 {
namespace nvfp4 {

constexpr float kScaleUp = 0x1p119f;   // applied to the block scale (bf16, still finite)
constexpr float kGlobalUp = 0x1p7f;    // 2^126 / 2^119, applied with the global scale
constexpr uint32_t kMask = 0x81C081C0u;  // sign and exponent/mantissa bits of e2m1 in bf16

// A registers of one K step from a packed word (bit positions: kNibbleBits in
// experts_nvfp4.cpp): a0 rows r0 / lo k, a1 r1 / lo k, a2 r0 / hi k, a3 r1 / hi k.
__device__ __forceinline__ void unpack_codes(uint32_t w, uint32_t (&a)[4]) {
  a[0] = w & kMask;
  a[1] = (w << 3) & kMask;
  a[2] = (w << 6) & kMask;
  a[3] = ((w << 1) & 0x80008000u) | ((w >> 5) & 0x01000100u) | ((w >> 4) & 0x00C000C0u);
}

// Two e4m3 scales (low byte: row r0, high byte: row r1) as bf16x2 {s0, s0} and {s1, s1},
// each times 2^119 (exact: e4m3 has 4 significant bits and 448 * 2^119 < bf16 max).
__device__ __forceinline__ void scale_pair(uint16_t bits, uint32_t& s0, uint32_t& s1) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(bits),
                                                   __NV_E4M3);
  const float2 f = __half22float2(__half2(h));
  const __nv_bfloat162 b0 = __floats2bfloat162_rn(f.x * kScaleUp, f.x * kScaleUp);
  const __nv_bfloat162 b1 = __floats2bfloat162_rn(f.y * kScaleUp, f.y * kScaleUp);
  s0 = *reinterpret_cast<const uint32_t*>(&b0);
  s1 = *reinterpret_cast<const uint32_t*>(&b1);
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                   *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}

}  // namespace nvfp4

// kNt: 8-token MMA columns (block_m <= 8 kNt); kRows: weight rows per CTA (16 per warp row);
// kKt: K per pipeline stage (multiple of 64); kStages: ring depth; kSplit: warps sharing one
// 16-row tile, each taking every kSplit-th 64-wide K chunk of a stage (dequantization is
// latency-bound at small batches: more warps per SM hide it), summed in a fixed order at the end.
template <int kNt, int kRows, int kKt, int kStages, int kSplit>
struct MoeGemmNvfp4Tile {
  static constexpr int kWarpsM = kRows / 16;
  static constexpr int kWarps = kWarpsM * kSplit;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTokens = 8 * kNt;
  static constexpr int kKc = kKt / 64;                  // 64-wide K chunks per stage
  static constexpr int kCodeBytes = kRows * kKt / 2;    // = kWarps * kKc * 512
  static constexpr int kScaleBytes = kRows * kKt / 16;  // = kWarps * kKc * 64
  static constexpr int kActBytes = kTokens * kKt * 2;
  static constexpr int kStageBytes = kCodeBytes + kScaleBytes + kActBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes + kTokens * 8;
  static constexpr int kAccLd = kTokens + 1;
  static constexpr int kRedFloats = (kSplit - 1) * kWarpsM * 32 * kNt * 4;
  static_assert(kRows * kAccLd * 4 <= kStages * kStageBytes, "epilogue tile fits the ring");
  static_assert(kRedFloats * 4 <= kStages * kStageBytes, "split-K partials fit the ring");
  static_assert(kKt % 64 == 0 && kRows % 32 == 0 && kKc % kSplit == 0, "tile shape");
  static_assert(kNt == 1 || kNt % 2 == 0, "token columns come in pairs past the first");
};

// Split-K tiles of up to 16 tokens are held to 64 registers (two 512-thread CTAs per SM):
// occupancy was meant to hide the dequantization latency (a few bytes spill; measured slower).
template <int kNt, int kRows, int kKt, int kStages, int kSplit>
__global__ void __launch_bounds__(MoeGemmNvfp4Tile<kNt, kRows, kKt, kStages, kSplit>::kThreads,
                                  kSplit > 1 && kNt <= 2 ? 1024 / MoeGemmNvfp4Tile<kNt, kRows, kKt, kStages,
                                                   kSplit>::kThreads
                                                   : 1)
    moe_gemm_nvfp4_kernel(const MoeGemmNvfp4Args p) {
  using Tile = MoeGemmNvfp4Tile<kNt, kRows, kKt, kStages, kSplit>;
  constexpr int kTokens = Tile::kTokens;
  constexpr int kThreads = Tile::kThreads;
  constexpr int kKc = Tile::kKc;
  constexpr int kWarpsM = Tile::kWarpsM;
  constexpr int kChunks = kKt / 8;  // 16-byte activation chunks per token row

  if (!p.plan_ready) asm volatile("griddepcontrol.wait;\n" ::: "memory");
  const int block = p.row_tiles_fastest ? blockIdx.y : blockIdx.x;
  const int tile = p.row_tiles_fastest ? blockIdx.x : blockIdx.y;
  const int num_padded = __ldcg(p.num_padded);
  const int group = __ldcg(p.block_group + block);
  if (block * p.block_m >= num_padded || group < 0) {
    if (p.plan_ready) asm volatile("griddepcontrol.wait;\n" ::: "memory");
    return;
  }
  const bool fuse_act = p.act_out != nullptr;
  const int half_n = p.n / 2;
  const int col0 = tile * (kRows / 2);
  const int row0 = tile * kRows;
  const int tid = threadIdx.x;
  // 16-row tile of warp-tile w (clamped tiles are loaded but never stored).
  auto row_tile = [&](int w) {
    if (!fuse_act) return min(row0 / 16 + w, p.row_tiles16 - 1);
    const int half_tiles = half_n / 16;
    const bool up = w >= kWarpsM / 2;
    return min(col0 / 16 + w - (up ? kWarpsM / 2 : 0), half_tiles - 1) + (up ? half_tiles : 0);
  };

  extern __shared__ __align__(128) unsigned char smem_raw[];
  int* tok_row = reinterpret_cast<int*>(smem_raw + kStages * Tile::kStageBytes);
  int* tok_slot = tok_row + kTokens;

  const int K = p.k;
  const int kcs = p.k_chunks64;
  const int num_ktiles = (kcs + kKc - 1) / kKc;
  const int64_t group_tiles = static_cast<int64_t>(group) * p.row_tiles16;
  const uint64_t policy = detail::evict_first_policy();

  auto load_weights = [&](int kt) {
    unsigned char* st = smem_raw + (kt % kStages) * Tile::kStageBytes;
    const int kc0 = kt * kKc;
#pragma unroll
    for (int i = tid; i < Tile::kCodeBytes / 16; i += kThreads) {
      const int w = i / (kKc * 32), rest = i % (kKc * 32);
      const bool ok = kc0 + rest / 32 < kcs;
      const uint8_t* src =
          p.codes + ((group_tiles + row_tile(w)) * kcs + (ok ? kc0 : 0)) * 512 + (ok ? rest * 16 : 0);
      if (p.evict_first)
        detail::cp_async_16_policy(detail::smem_addr(st + i * 16), src, ok ? 16 : 0, policy);
      else
        detail::cp_async_16(detail::smem_addr(st + i * 16), src, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = tid; i < Tile::kScaleBytes / 16; i += kThreads) {
      const int w = i / (kKc * 4), rest = i % (kKc * 4);
      const bool ok = kc0 + rest / 4 < kcs;
      const uint8_t* src =
          p.scales + ((group_tiles + row_tile(w)) * kcs + (ok ? kc0 : 0)) * 64 + (ok ? rest * 16 : 0);
      if (p.evict_first)
        detail::cp_async_16_policy(detail::smem_addr(st + Tile::kCodeBytes + i * 16), src,
                                   ok ? 16 : 0, policy);
      else
        detail::cp_async_16(detail::smem_addr(st + Tile::kCodeBytes + i * 16), src, ok ? 16 : 0);
    }
  };
  auto load_acts = [&](int kt) {
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(
        smem_raw + (kt % kStages) * Tile::kStageBytes + Tile::kCodeBytes + Tile::kScaleBytes);
    const int k0 = kt * kKt;
#pragma unroll
    for (int i = tid; i < kTokens * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int src_row = tok_row[r];
      const int col = k0 + c * 8;
      const bool ok = src_row >= 0 && col < K;
      const __nv_bfloat16* src = static_cast<const __nv_bfloat16*>(p.act) +
                                 (ok ? static_cast<int64_t>(src_row) * K + col : 0);
      detail::cp_async_16(detail::smem_addr(xs + detail::swizzled_offset<kKt>(r, c)), src,
                          ok ? 16 : 0);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s)
    if (s < num_ktiles) load_weights(s);
  if (p.plan_ready) asm volatile("griddepcontrol.wait;\n" ::: "memory");
  for (int j = tid; j < kTokens; j += kThreads) {
    int slot = p.num_slots;
    if (j < p.block_m) slot = __ldcg(p.sorted_slots + block * p.block_m + j);
    const bool live = slot >= 0 && slot < p.num_slots;
    tok_slot[j] = live ? slot : -1;
    tok_row[j] = live ? slot / p.rows_div : -1;
  }
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_ktiles) load_acts(s);
    detail::cp_async_commit();
  }

  float acc[kNt][4];
#pragma unroll
  for (int t = 0; t < kNt; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

  const int warp = tid / 32 % kWarpsM, ks = tid / 32 / kWarpsM, lane = tid % 32;
  const int b_tok = (lane & 7) + ((lane >> 4) << 3);
  const int b_chunk = (lane >> 3) & 1;

  for (int kt = 0; kt < num_ktiles; ++kt) {
    detail::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (kt + kStages - 1 < num_ktiles) {
      load_weights(kt + kStages - 1);
      load_acts(kt + kStages - 1);
    }
    detail::cp_async_commit();

    const unsigned char* st = smem_raw + (kt % kStages) * Tile::kStageBytes;
    const uint32_t xs_addr = detail::smem_addr(st + Tile::kCodeBytes + Tile::kScaleBytes);
#pragma unroll
    for (int kci = 0; kci < kKc / kSplit; ++kci) {
      const int kc = kci * kSplit + ks;
      const uint4 cw =
          *reinterpret_cast<const uint4*>(st + ((warp * kKc + kc) * 32 + lane) * 16);
      const uint2 sw = *reinterpret_cast<const uint2*>(st + Tile::kCodeBytes +
                                                       (warp * kKc + kc) * 64 + (lane / 4) * 8);
      const uint32_t words[4] = {cw.x, cw.y, cw.z, cw.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t a[4], s0, s1;
        nvfp4::unpack_codes(words[j], a);
        nvfp4::scale_pair(static_cast<uint16_t>(((j < 2) ? sw.x : sw.y) >> (16 * (j & 1))), s0,
                          s1);
        a[0] = nvfp4::bf16x2_mul(a[0], s0);
        a[1] = nvfp4::bf16x2_mul(a[1], s1);
        a[2] = nvfp4::bf16x2_mul(a[2], s0);
        a[3] = nvfp4::bf16x2_mul(a[3], s1);
        const int kk = (kc * 4 + j) * 2;  // 8-element chunk of this K step
        if constexpr (kNt == 1) {
          uint32_t b0, b1;
          detail::ldmatrix_x2(xs_addr + 2 * detail::swizzled_offset<kKt>(lane & 7, kk + b_chunk),
                              b0, b1);
          detail::mma_bf16_16816(acc[0], a, b0, b1);
        } else {
#pragma unroll
          for (int t = 0; t < kNt; t += 2) {
            uint32_t b[4];
            detail::ldmatrix_x4(
                xs_addr + 2 * detail::swizzled_offset<kKt>(t * 8 + b_tok, kk + b_chunk), b);
            detail::mma_bf16_16816(acc[t], a, b[0], b[1]);
            detail::mma_bf16_16816(acc[t + 1], a, b[2], b[3]);
          }
        }
      }
    }
  }
  detail::cp_async_wait<0>();
  asm volatile("griddepcontrol.launch_dependents;\n");
  if constexpr (kSplit > 1) {
    // Partials of warps ks > 0 through the drained ring; warp ks = 0 adds them in ks order.
    float* red = reinterpret_cast<float*>(smem_raw);
    __syncthreads();
    if (ks > 0)
#pragma unroll
      for (int t = 0; t < kNt; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          red[((((ks - 1) * kWarpsM + warp) * 32 + lane) * kNt + t) * 4 + e] = acc[t][e];
    __syncthreads();
    if (ks == 0)
      for (int r = 1; r < kSplit; ++r)
#pragma unroll
        for (int t = 0; t < kNt; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc[t][e] += red[((((r - 1) * kWarpsM + warp) * 32 + lane) * kNt + t) * 4 + e];
  }

  // C fragment rows lane/4 and lane/4 + 8 of the warp's tile; the global scale of each row.
  const int tile_row = row_tile(warp) * 16 + lane / 4;
  float gsc[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = min(tile_row + 8 * h, p.n - 1);
    gsc[h] = __ldg(p.gscale + static_cast<int64_t>(group) * p.gs_group_stride +
                   static_cast<int64_t>(n) * p.gs_row_stride) *
             nvfp4::kGlobalUp;
  }
  if (fuse_act) {
    float* acc_tile = reinterpret_cast<float*>(smem_raw);
    constexpr int kLd = Tile::kAccLd;
    __syncthreads();
    const int r_base = warp * 16 + lane / 4;
    if (ks == 0)
#pragma unroll
    for (int t = 0; t < kNt; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        acc_tile[(r_base + (e >> 1) * 8) * kLd + t * 8 + (lane % 4) * 2 + (e & 1)] =
            acc[t][e] * gsc[e >> 1];
    __syncthreads();
    constexpr int kHalf = kRows / 2;
    __nv_bfloat16* act_out = static_cast<__nv_bfloat16*>(p.act_out);
    for (int i = tid; i < kHalf * kTokens; i += kThreads) {
      const int j = i / kHalf, c = i % kHalf;
      const int slot = tok_slot[j];
      if (slot < 0 || col0 + c >= half_n) continue;
      const float g = acc_tile[c * kLd + j], u = acc_tile[(kHalf + c) * kLd + j];
      act_out[static_cast<int64_t>(slot) * half_n + col0 + c] =
          __float2bfloat16_rn(::moelora::cuda::detail::silu_mul(g, u));
    }
    return;
  }
#pragma unroll
  for (int t = 0; t < kNt; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = t * 8 + (lane % 4) * 2 + (e & 1);
      const int n = tile_row + (e >> 1) * 8;
      const int slot = tok_slot[j];
      if (ks > 0 || slot < 0 || n >= p.n || (warp + row0 / 16) >= p.row_tiles16) continue;
      const float v = acc[t][e] * gsc[e >> 1];
      const float scale = p.slot_scale ? p.slot_scale[slot] : 1.f;
      p.out[static_cast<int64_t>(slot) * p.n + n] = v * scale;
    }
  }
}

}  // namespace moelora::cuda::sm90
