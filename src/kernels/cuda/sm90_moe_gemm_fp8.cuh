// Device code of the fp8 block-scale expert GEMMs (DeepSeek-V3 / FineGrainedFP8 weights) for
// decode-sized batches on Hopper. Raw pointers only; the launcher is in moe_gemm_fp8.cu.
//
// No L2 evict-first hint on the weight loads (unlike the bf16 kernel): with it, the H100 raised
// "illegal instruction" at the main loop's refill cp.async (compute-sanitizer; the prologue's
// were fine), whether the policy was made once or inside each asm statement. In the SASS
// (ptxas, CUDA 13.0) the refill's LDGSTS take their 64-bit cache descriptor from an odd
// uniform register (desc[UR1]; the prologue's desc[UR8]) -- our best guess at the cause.
// Without the hint all tests pass, memcheck clean.
//
// Same structure as the bf16 kernel (sm90_moe_gemm.cuh, whose helpers it uses): swapped MMA
// (weight rows on the m16 side, the block's tokens on n8), a kStages-deep cp.async ring of
// 16-byte loads, PDL. What differs:
//  - the K tile is the 128-channel quantization block: 128 bytes of e4m3 codes per weight row;
//  - the activations arrive already quantized (fp8_quantize_act_kernel below, once per GEMM
//    input row rather than once per row tile and K tile as in the first version, whose
//    main loop stalled on it): codes stream through the ring like the weights, the tokens'
//    f32 scales beside them (4-byte cp.async);
//  - mma.m16n8k32 e4m3 x e4m3 -> f32 accumulates one K block into a partial sum, which is
//    promoted into the f32 accumulator times w_scale(row, kb) * x_scale(token, kb).
// Weight scales are looked up per row (not per 128-row tile), so any block_n works and a
// scale block never straddles the gate/up boundary (see experts_fp8.cpp for the layout).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "kernels/cuda/moe_gemm_fp8_launch.h"
#include "kernels/cuda/moe_lora_inline.cuh"
#include "kernels/cuda/sm90_moe_gemm.cuh"

namespace moelora::cuda::sm90 {

namespace detail {

__device__ __forceinline__ void mma_e4m3_16832(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats to two e4m3 codes (x in the low byte): round to nearest even, saturating to
// +-448 -- the same as clamping first, as the reference does.
__device__ __forceinline__ uint32_t e4m3x2(float x, float y) {
  return static_cast<uint32_t>(
      __nv_cvt_float2_to_fp8x2(make_float2(x, y), __NV_SATFINITE, __NV_E4M3));
}

// 4-byte async copy (cp.async.cg takes 16 only); src_bytes = 0 zero-fills.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

}  // namespace detail

// One (row, 128-channel block) per 16 lanes, 8 channels per lane: s = max(amax, 1e-10) / 448,
// q = e4m3(x / s) rounded to nearest even and saturated (= the reference's clamp, then
// round), with an IEEE divide as the reference does. Rows of x, q: k elements (k % 16 == 0).
__global__ void __launch_bounds__(256)
    fp8_quantize_act_kernel(const __nv_bfloat16* __restrict__ x, int rows, int k,
                            uint8_t* __restrict__ q, float* __restrict__ scale) {
  // The input may come from the predecessor; the successor may start once every CTA is past
  // this wait (see launch_fp8_quantize_act: what plan_ready relies on).
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n");
  const int k_blocks = (k + 127) / 128;
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 16;
  const int lane16 = threadIdx.x % 16;
  // Surplus lanes stay for the full-warp shuffles below and store nothing.
  const bool live = group < static_cast<int64_t>(rows) * k_blocks;
  const int row = live ? static_cast<int>(group / k_blocks) : 0;
  const int kb = live ? static_cast<int>(group % k_blocks) : 0;
  const int col = kb * 128 + lane16 * 8;
  const bool ok = live && col < k;  // k % 16 == 0: a lane's 8 channels are all in or all out
  float v[8];
  float amax = 0.f;
  if (ok) {
    const uint4 raw = *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(row) * k + col);
    const __nv_bfloat162* v2 = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(v2[j]);
      v[2 * j] = f.x, v[2 * j + 1] = f.y;
      amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
    }
  }
  // The 16 lanes of a group are aligned within the warp (blockDim a multiple of 16).
#pragma unroll
  for (int o = 8; o >= 1; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float s = fmaxf(amax, 1e-10f) / 448.0f;
  if (live && lane16 == 0) scale[static_cast<int64_t>(row) * k_blocks + kb] = s;
  if (!ok) return;
  uint2 out;
  out.x = detail::e4m3x2(v[0] / s, v[1] / s) | (detail::e4m3x2(v[2] / s, v[3] / s) << 16);
  out.y = detail::e4m3x2(v[4] / s, v[5] / s) | (detail::e4m3x2(v[6] / s, v[7] / s) << 16);
  *reinterpret_cast<uint2*>(q + static_cast<int64_t>(row) * k + col) = out;
}

// Tile of the fp8 kernel: 128-byte code rows (8 chunks), swizzled like the bf16 kernel's
// 64-element bf16 rows (swizzled_offset<64> counts 2-byte units).
template <int kNt, int kMt, int kRows, int kStages>
struct MoeGemmFp8Tile {
  static constexpr int kKt = 128;        // K per stage = the quantization block
  static constexpr int kRowBytes = kKt;  // e4m3 codes per weight / token row
  static constexpr int kWarps = kRows / (16 * kMt);
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTokens = 8 * kNt;
  static constexpr int kWeightBytes = kRows * kRowBytes;
  static constexpr int kStageBytes = kWeightBytes + kTokens * kRowBytes;  // weight + token codes
  static constexpr int kRingBytes = kStages * kStageBytes;
  // After the ring: the tokens' scales of every stage, then each token's source row and slot.
  static constexpr int kSmemBytes = kRingBytes + kStages * kTokens * 4 + kTokens * 8;
  static constexpr int kAccLd = kTokens + 1;
  static_assert(kRows * kAccLd * 4 <= kRingBytes, "epilogue tile fits the ring");
  static_assert(kRows % (16 * kMt) == 0, "tile shape");
  static_assert(kNt == 1 || kNt % 2 == 0, "token columns come in pairs past the first");
};

// kLora: the grid also carries p.lora's inline LoRA CTAs, first on the block axis.
template <int kNt, int kMt, int kRows, int kStages, bool kLora = false>
__global__ void __launch_bounds__(MoeGemmFp8Tile<kNt, kMt, kRows, kStages>::kThreads)
    moe_gemm_fp8_kernel(const MoeGemmFp8Args p) {
  using Tile = MoeGemmFp8Tile<kNt, kMt, kRows, kStages>;
  constexpr int kTokens = Tile::kTokens;
  constexpr int kThreads = Tile::kThreads;
  constexpr int kKt = Tile::kKt;
  constexpr int kChunks = 8;  // 16-byte chunks per code row

  extern __shared__ __align__(128) unsigned char smem_raw[];
  if (!p.plan_ready) asm volatile("griddepcontrol.wait;\n" ::: "memory");

  int bx = blockIdx.x, by = blockIdx.y;
  if constexpr (kLora) {
    if (inline_lora_cta(p, bx, by, smem_raw)) return;
  }
  const int block = p.row_tiles_fastest ? by : bx;
  const int tile = p.row_tiles_fastest ? bx : by;
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
  auto weight_row = [&](int r) {
    if (!fuse_act) return min(row0 + r, p.n - 1);
    const bool up = r >= kRows / 2;
    return min(col0 + r - (up ? kRows / 2 : 0), half_n - 1) + (up ? half_n : 0);
  };

  float* x_scales = reinterpret_cast<float*>(smem_raw + Tile::kRingBytes);  // [kStages][kTokens]
  int* tok_row = reinterpret_cast<int*>(x_scales + kStages * kTokens);
  int* tok_slot = tok_row + kTokens;

  const int K = p.k;
  const int num_ktiles = (K + kKt - 1) / kKt;
  const uint8_t* wg = p.w + static_cast<int64_t>(group) * p.n * K;
  // Narrow token tiles (registers to spare): per-thread copy plans computed once, since the
  // loads run every stage. kThreads is a multiple of the 8 chunks of a row, so a thread always
  // copies chunk tid % 8 of rows tid / 8 + it * kRowStep; kRowStep is a multiple of 8, so the
  // swizzle is the same for all of them: one destination plus a compile-time stride, and only
  // the K offset changes from stage to stage. Wide tiles keep the loops below (their
  // accumulators and per-block partial sums take ~128 registers; a plan made ptxas spill).
  constexpr bool kPlan = kNt * kMt <= 4;
  constexpr int kRowStep = kThreads / kChunks;
  constexpr int kWIters = kRows / kRowStep;
  constexpr int kAIters = kTokens >= kRowStep ? kTokens / kRowStep : 1;
  constexpr int kDstStride = kRowStep * kKt;
  static_assert(!kPlan || (kThreads % kChunks == 0 && kRows % kRowStep == 0 && kRowStep % 8 == 0),
                "copy plan");
  const int cp_chunk = tid % kChunks, cp_row = tid / kChunks;
  const uint32_t cp_dst = 2 * detail::swizzled_offset<kKt / 2>(cp_row, cp_chunk);
  int w_off[kPlan ? kWIters : 1] = {};  // row offsets in the expert's codes (n * k < 2^31)
  const uint8_t* a_src[kPlan ? kAIters : 1] = {};  // token rows' codes; nullptr: padding
  if constexpr (kPlan) {
#pragma unroll
    for (int it = 0; it < kWIters; ++it) w_off[it] = weight_row(cp_row + it * kRowStep) * K;
  }
  auto load_weights = [&](int kt) {
    unsigned char* ws = smem_raw + (kt % kStages) * Tile::kStageBytes;
    const int k0 = kt * kKt;
    if constexpr (kPlan) {
      const uint32_t stage = detail::smem_addr(ws);
      const int col = k0 + cp_chunk * 16;
      const bool ok = col < K;
#pragma unroll
      for (int it = 0; it < kWIters; ++it)
        detail::cp_async_16(stage + cp_dst + it * kDstStride, wg + (w_off[it] + (ok ? col : 0)),
                            ok ? 16 : 0);
    } else {
#pragma unroll
      for (int i = tid; i < kRows * kChunks; i += kThreads) {
        const int r = i / kChunks, c = i % kChunks;
        const int col = k0 + c * 16;
        const bool ok = col < K;
        const uint8_t* src = wg + static_cast<int64_t>(weight_row(r)) * K + (ok ? col : 0);
        detail::cp_async_16(detail::smem_addr(ws + 2 * detail::swizzled_offset<kKt / 2>(r, c)), src,
                            ok ? 16 : 0);
      }
    }
  };
  // The tokens' codes (swizzled like the weights) and their scales of K block kt; padding
  // tokens read as zero codes with a zero scale.
  auto load_acts = [&](int kt) {
    unsigned char* xs = smem_raw + (kt % kStages) * Tile::kStageBytes + Tile::kWeightBytes;
    const int k0 = kt * kKt;
    if constexpr (kPlan) {
      const uint32_t stage = detail::smem_addr(xs);
      const int col = k0 + cp_chunk * 16;
#pragma unroll
      for (int it = 0; it < kAIters; ++it) {
        if (kTokens < kRowStep && cp_row >= kTokens) break;  // more threads than token chunks
        const bool ok = a_src[it] != nullptr && col < K;
        detail::cp_async_16(stage + cp_dst + it * kDstStride, ok ? a_src[it] + col : p.act_q,
                            ok ? 16 : 0);
      }
    } else {
#pragma unroll
      for (int i = tid; i < kTokens * kChunks; i += kThreads) {
        const int r = i / kChunks, c = i % kChunks;
        const int src_row = tok_row[r];
        const int col = k0 + c * 16;
        const bool ok = src_row >= 0 && col < K;
        const uint8_t* src = p.act_q + (ok ? static_cast<int64_t>(src_row) * K + col : 0);
        detail::cp_async_16(detail::smem_addr(xs + 2 * detail::swizzled_offset<kKt / 2>(r, c)), src,
                            ok ? 16 : 0);
      }
    }
    for (int j = tid; j < kTokens; j += kThreads) {
      const int src_row = tok_row[j];
      const float* src =
          p.act_scale + (src_row >= 0 ? static_cast<int64_t>(src_row) * p.k_blocks + kt : 0);
      detail::cp_async_4(detail::smem_addr(x_scales + (kt % kStages) * kTokens + j), src,
                         src_row >= 0 ? 4 : 0);
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
  if constexpr (kPlan) {
#pragma unroll
    for (int it = 0; it < kAIters; ++it) {
      const int src_row = tok_row[min(cp_row + it * kRowStep, kTokens - 1)];
      a_src[it] = src_row >= 0 ? p.act_q + static_cast<int64_t>(src_row) * K : nullptr;
    }
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_ktiles) load_acts(s);
    detail::cp_async_commit();
  }

  const int warp = tid / 32, lane = tid % 32;
  // Weight-scale rows of this thread's accumulator rows (C fragment rows lane/4 and +8).
  const float* wsc_row[kMt][2];
#pragma unroll
  for (int m = 0; m < kMt; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = weight_row(warp * 16 * kMt + 16 * m + lane / 4 + 8 * h);
      const int srow = (n / p.part_rows) * p.part_blocks + (n % p.part_rows) / p.block_n;
      wsc_row[m][h] =
          p.w_scale +
          (static_cast<int64_t>(group) * (p.n / p.part_rows) * p.part_blocks + srow) * p.k_blocks;
    }
  float wsc[kMt][2];
#pragma unroll
  for (int m = 0; m < kMt; ++m) wsc[m][0] = __ldg(wsc_row[m][0]), wsc[m][1] = __ldg(wsc_row[m][1]);

  float acc[kMt][kNt][4];
#pragma unroll
  for (int m = 0; m < kMt; ++m)
#pragma unroll
    for (int t = 0; t < kNt; ++t) acc[m][t][0] = acc[m][t][1] = acc[m][t][2] = acc[m][t][3] = 0.f;

  const int a_row = warp * 16 * kMt + (lane & 15);
  const int a_chunk = lane >> 4;
  const int b_tok = (lane & 7) + ((lane >> 4) << 3);
  const int b_chunk = (lane >> 3) & 1;

  for (int kt = 0; kt < num_ktiles; ++kt) {
    detail::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed; every warp is done with stage kt-1
    // Refill the slot consumed last iteration (every warp is past it after the barrier).
    if (kt + kStages - 1 < num_ktiles) {
      load_weights(kt + kStages - 1);
      load_acts(kt + kStages - 1);
    }
    detail::cp_async_commit();
    // Next K block's weight scales (used next iteration: the load latency hides behind this
    // one's MMAs).
    float wsc_next[kMt][2];
    const int kn = min(kt + 1, num_ktiles - 1);
#pragma unroll
    for (int m = 0; m < kMt; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) wsc_next[m][h] = __ldg(wsc_row[m][h] + kn);

    float part[kMt][kNt][4];
#pragma unroll
    for (int m = 0; m < kMt; ++m)
#pragma unroll
      for (int t = 0; t < kNt; ++t)
        part[m][t][0] = part[m][t][1] = part[m][t][2] = part[m][t][3] = 0.f;
    const uint32_t ws_addr = detail::smem_addr(smem_raw + (kt % kStages) * Tile::kStageBytes);
    const uint32_t q_addr = ws_addr + Tile::kWeightBytes;
#pragma unroll
    for (int kk = 0; kk < kChunks; kk += 2) {
      uint32_t a[kMt][4];
#pragma unroll
      for (int m = 0; m < kMt; ++m)
        detail::ldmatrix_x4(
            ws_addr + 2 * detail::swizzled_offset<kKt / 2>(a_row + 16 * m, kk + a_chunk), a[m]);
      if constexpr (kNt == 1) {
        uint32_t b0, b1;
        detail::ldmatrix_x2(q_addr + 2 * detail::swizzled_offset<kKt / 2>(lane & 7, kk + b_chunk),
                            b0, b1);
#pragma unroll
        for (int m = 0; m < kMt; ++m) detail::mma_e4m3_16832(part[m][0], a[m], b0, b1);
      } else {
#pragma unroll
        for (int t = 0; t < kNt; t += 2) {
          uint32_t b[4];
          detail::ldmatrix_x4(
              q_addr + 2 * detail::swizzled_offset<kKt / 2>(t * 8 + b_tok, kk + b_chunk), b);
#pragma unroll
          for (int m = 0; m < kMt; ++m) {
            detail::mma_e4m3_16832(part[m][t], a[m], b[0], b[1]);
            detail::mma_e4m3_16832(part[m][t + 1], a[m], b[2], b[3]);
          }
        }
      }
    }
    // Promote the block's partial sums: acc += part * w_scale(row) * x_scale(token).
#pragma unroll
    for (int t = 0; t < kNt; ++t) {
      const float* x_scale = x_scales + (kt % kStages) * kTokens;
      const float xs0 = x_scale[t * 8 + (lane % 4) * 2], xs1 = x_scale[t * 8 + (lane % 4) * 2 + 1];
#pragma unroll
      for (int m = 0; m < kMt; ++m) {
        acc[m][t][0] += part[m][t][0] * (wsc[m][0] * xs0);
        acc[m][t][1] += part[m][t][1] * (wsc[m][0] * xs1);
        acc[m][t][2] += part[m][t][2] * (wsc[m][1] * xs0);
        acc[m][t][3] += part[m][t][3] * (wsc[m][1] * xs1);
      }
    }
#pragma unroll
    for (int m = 0; m < kMt; ++m) wsc[m][0] = wsc_next[m][0], wsc[m][1] = wsc_next[m][1];
  }
  detail::cp_async_wait<0>();
  asm volatile("griddepcontrol.launch_dependents;\n");

  if (fuse_act) {
    float* acc_tile = reinterpret_cast<float*>(smem_raw);
    constexpr int kLd = Tile::kAccLd;
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kMt; ++m) {
      const int r_base = warp * 16 * kMt + 16 * m + lane / 4;
#pragma unroll
      for (int t = 0; t < kNt; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc_tile[(r_base + (e >> 1) * 8) * kLd + t * 8 + (lane % 4) * 2 + (e & 1)] = acc[m][t][e];
    }
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
  for (int m = 0; m < kMt; ++m) {
    const int n_base = row0 + warp * 16 * kMt + 16 * m + lane / 4;
#pragma unroll
    for (int t = 0; t < kNt; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = t * 8 + (lane % 4) * 2 + (e & 1);
        const int n = n_base + (e >> 1) * 8;
        const int slot = tok_slot[j];
        if (slot < 0 || n >= p.n) continue;
        const float scale = p.slot_scale ? p.slot_scale[slot] : 1.f;
        p.out[static_cast<int64_t>(slot) * p.n + n] = acc[m][t][e] * scale;
      }
    }
  }
}

}  // namespace moelora::cuda::sm90
