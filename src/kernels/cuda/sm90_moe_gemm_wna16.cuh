// Device code of the int4 / int8 grouped expert GEMMs (cuda_wna16), decode-sized batches on
// Hopper. Same structure as the bf16 kernel (sm90_moe_gemm.cuh, whose helpers it uses):
// swapped mma.m16n8k16 (weight rows on M, the block's tokens on N), a cp.async ring of
// kStages tiles, PDL, optional fused SiLU epilogue. What differs is the weight side:
//  - the packed tiles (quant/experts_wna16.cpp) hold, for each lane, exactly its A fragments:
//    one 16-byte shared-memory read per 16 rows x 64 (int4) or 32 (int8) channels, no ldmatrix;
//  - codes become bf16 in registers: int4 by OR-ing a nibble pair into the mantissa of 128.0
//    (0x4300) and subtracting 128 + zero (exact: |code - zero| <= 16; kRaw tiles skip the
//    subtraction and take (128 + zero) x the token sums off per group instead); int8 through f32
//    (0x4B000000 | byte = 2^23 + byte, minus 2^23 + zero, exact) packed to bf16x2;
//  - the products of one scale group accumulate in f32 apart, then acc += scale * part, so the
//    group scale (f32, exactly the checkpoint's) is applied once per group and row, not per
//    weight; per-channel stacks apply it once at the end;
//  - act-order stacks gather the activation columns x[:, perm] into shared memory, so the
//    weights' groups stay contiguous;
//  - kSplit warps share each 16-row MMA tile, each taking every kSplit-th weight tile of a
//    stage, and their sums meet in shared memory at the end: a warp's MMA/dequant chain is
//    serial, so at decode batches the warps must be many and short (one warp per 16 rows over
//    the whole K measured 4x slower than the byte roofline: issue-bound, bench/NOTES.md).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/moe_gemm_wna16_launch.h"
#include "kernels/cuda/moe_silu.cuh"
#include "kernels/cuda/sm90_moe_gemm.cuh"
#include "quant/wna16_layout.h"

namespace moelora::cuda::sm90 {

namespace wna16_detail {

using namespace ::moelora::cuda::sm90::detail;

__device__ __forceinline__ uint32_t bf16x2_bits(__nv_bfloat162 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

// The four A registers of one 16-channel step from the lane's int4 word: register p holds
// nibbles p and p + 4; zero2[0] / zero2[1] hold 128 + zero of rows r / r + 8 (bf16 pairs).
__device__ __forceinline__ void dequant_int4(uint32_t q, const uint32_t (&zero2)[2],
                                             uint32_t (&a)[4]) {
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const uint32_t v = ((q >> (4 * p)) & 0x000f000fu) | 0x43004300u;
    const __nv_bfloat162 d = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v),
                                     *reinterpret_cast<const __nv_bfloat162*>(&zero2[p & 1]));
    a[p] = bf16x2_bits(d);
  }
}

// Two A registers from one int8 word (bytes {0,1}: row r, {2,3}: row r + 8); zero_f holds
// 2^23 + zero of rows r and r + 8.
__device__ __forceinline__ void dequant_int8(uint32_t q, const float (&zero_f)[2], uint32_t& lo,
                                             uint32_t& hi) {
  float f[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(__byte_perm(q, 0x4b000000u, 0x7540u | i));
  lo = bf16x2_bits(__floats2bfloat162_rn(f[0] - zero_f[0], f[1] - zero_f[0]));
  hi = bf16x2_bits(__floats2bfloat162_rn(f[2] - zero_f[1], f[3] - zero_f[1]));
}

}  // namespace wna16_detail

// kBits: 4 or 8; kNt: 8-token MMA columns; kMt: 16-row MMA tiles per warp; kRows: weight rows
// per CTA; kKt: channels per pipeline stage; kStages: ring depth; kSplit: warps along K.
template <int kBits, int kNt, int kMt, int kRows, int kKt, int kStages, int kSplit>
struct Wna16Tile {
  static constexpr int kRowWarps = kRows / (16 * kMt);
  static constexpr int kWarps = kRowWarps * kSplit;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTokens = 8 * kNt;
  static constexpr int kTileK = ::moelora::quant::wna16::tile_k(kBits);
  static constexpr int kKTiles = kKt / kTileK;               // weight tiles per row tile
  static constexpr int kWBytes = kRows * kKt * kBits / 8;    // weights per stage
  static constexpr int kXBytes = kTokens * kKt * 2;          // activations per stage
  static constexpr int kMaxGroups = kKt / 32;                // scale groups per stage
  static constexpr int kSBytes = kRows * kMaxGroups * 4;     // scales (and zeros) per stage
  static constexpr int kStageBytes = kWBytes + kXBytes + 2 * kSBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes + kTokens * 8;
  static constexpr int kAccLd = kTokens + 1;
  static constexpr int kAccRegs = kMt * kNt * 4;
  static_assert(kRows * kAccLd * 4 <= kStages * kStageBytes, "epilogue tile fits the ring");
  static_assert((kSplit - 1) * kRowWarps * 32 * kAccRegs * 4 <= kStages * kStageBytes,
                "split-K partial sums fit the ring");
  static_assert(kKTiles % kSplit == 0, "every warp of a split takes the same tiles");
  static_assert(kKt % kTileK == 0 && kKt / 8 >= 8 && kRows % (16 * kMt) == 0, "tile shape");
  static_assert(kNt == 1 || kNt % 2 == 0, "token columns come in pairs past the first");
};

// kRaw (int4 only): the MMAs take the raw codes as bf16 128 + q and the zero point comes off
// once per group and row: sum_k (q - z) x_k = sum_k (128 + q) x_k - (128 + z) sum_k x_k, the
// token sums sum_k x_k coming from one more MMA per step with an all-ones A (every row gets
// the same column sums). Exact products, f32 sums as before; saves the sub.bf16x2 per
// register, i.e. 16 of ~53 instructions per step at 4 MMA tiles per warp.
template <int kBits, int kNt, int kMt, int kRows, int kKt, int kStages, int kSplit,
          bool kRaw = false>
__global__ void __launch_bounds__(Wna16Tile<kBits, kNt, kMt, kRows, kKt, kStages, kSplit>::kThreads)
    moe_gemm_wna16_kernel(const MoeGemmWna16Args p) {
  using namespace wna16_detail;
  using Tile = Wna16Tile<kBits, kNt, kMt, kRows, kKt, kStages, kSplit>;
  static_assert(!kRaw || kBits == 4, "raw codes: int4 only");
  constexpr int kTokens = Tile::kTokens, kChunks = kKt / 8, kThreads = Tile::kThreads;
  constexpr int kTileK = Tile::kTileK, kKTiles = Tile::kKTiles;
  constexpr int kRowTiles = kRows / 16;

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
  const int tid = threadIdx.x, lane = tid % 32;
  // Warp roles: row warp (which kMt 16-row tiles) and K slice (which tiles of each stage).
  const int row_warp = (tid / 32) / kSplit, kslice = (tid / 32) % kSplit;
  const int row_tiles_total = p.np / 16;
  // Packed row tile of local row tile rt (fused: gate tiles, then the matching up tiles);
  // clamped tiles are loaded but never stored.
  auto packed_tile = [&](int rt) {
    if (!fuse_act) return min(row0 / 16 + rt, row_tiles_total - 1);
    const bool up = rt >= kRowTiles / 2;
    const int t = min(col0 / 16 + rt - (up ? kRowTiles / 2 : 0), half_n / 16 - 1);
    return t + (up ? half_n / 16 : 0);
  };

  extern __shared__ __align__(128) unsigned char smem_raw[];
  int* tok_row = reinterpret_cast<int*>(smem_raw + kStages * Tile::kStageBytes);
  int* tok_slot = tok_row + kTokens;
  auto stage_w = [&](int s) { return smem_raw + s * Tile::kStageBytes; };
  auto stage_x = [&](int s) {
    return reinterpret_cast<__nv_bfloat16*>(stage_w(s) + Tile::kWBytes);
  };
  auto stage_s = [&](int s) {
    return reinterpret_cast<float*>(stage_w(s) + Tile::kWBytes + Tile::kXBytes);
  };
  auto stage_z = [&](int s) { return stage_s(s) + kRows * Tile::kMaxGroups; };

  const int K = p.k;
  const int num_ktiles = (K + kKt - 1) / kKt;
  const bool per_channel = p.num_groups_k == 1;
  const int gk = p.group_k;
  const int gk_shift = 31 - __clz(gk);  // grouped stacks: group_k is a power of two
  // Scale groups a stage holds (grouped stacks: group_k is 32, 64 or 128).
  const int stage_groups = gk >= kKt ? 1 : kKt / gk;
  const unsigned char* wg = static_cast<const unsigned char*>(p.w) +
                            static_cast<int64_t>(group) * row_tiles_total * p.k_tiles *
                                ::moelora::quant::wna16::kTileBytes;
  const float* sg = p.scales + static_cast<int64_t>(group) * p.num_groups_k * p.np;
  const float* zg = p.zeros ? p.zeros + static_cast<int64_t>(group) * p.num_groups_k * p.np
                            : nullptr;
  const int32_t* permg = p.perm ? p.perm + static_cast<int64_t>(group) * K : nullptr;

  // Scales: chunk i of a stage is group i / (kRows / 4), rows 4 (i % (kRows / 4)) .. +3.
  constexpr int kSChunks = Tile::kMaxGroups * kRows / 4;
  constexpr int kSLoads = (kSChunks + kThreads - 1) / kThreads;
  int s_j[kSLoads], s_row[kSLoads], s_dst[kSLoads];
#pragma unroll
  for (int n = 0; n < kSLoads; ++n) {
    const int i = tid + n * kThreads;
    const int j = i / (kRows / 4), r = (i % (kRows / 4)) * 4;
    s_j[n] = i < kSChunks ? j : Tile::kMaxGroups;  // >= stage_groups: no copy
    s_row[n] = packed_tile(r / 16) * 16 + r % 16;
    s_dst[n] = j * kRows + r;
  }
  // Per-thread copy plans, computed once: a stage's copies differ from the first stage's only
  // by a K offset, and the index math (divisions, packed_tile, 64-bit products) was ~30
  // instructions per 16-byte cp.async when redone per stage (bench/NOTES.md, "second pass").
  // Weights: 32 chunks of 16 bytes per 512-byte tile.
  constexpr int kWChunks = kRowTiles * kKTiles * 32;
  constexpr int kWLoads = (kWChunks + kThreads - 1) / kThreads;
  uint32_t w_off[kWLoads];  // byte offset in the group's stack at K tile 0
  uint32_t w_dst[kWLoads];  // byte offset in the stage
  int w_j[kWLoads];         // weight tile within the stage; kKTiles: no copy
#pragma unroll
  for (int n = 0; n < kWLoads; ++n) {
    const int i = tid + n * kThreads;
    const int rt = i / (kKTiles * 32), j = (i / 32) % kKTiles, c = i % 32;
    const bool live = kWChunks % kThreads == 0 || i < kWChunks;
    w_j[n] = live ? j : kKTiles;
    w_off[n] = live ? (static_cast<uint32_t>(packed_tile(rt)) * p.k_tiles * 32 + c) * 16 : 0;
    w_dst[n] = (rt * kKTiles + j) * 512 + c * 16;
  }
  auto load_weights = [&](int kt) {
    unsigned char* ws = stage_w(kt % kStages);
#pragma unroll
    for (int n = 0; n < kWLoads; ++n) {
      if (kWChunks % kThreads != 0 && w_j[n] == kKTiles) continue;
      const int ktile = kt * kKTiles + w_j[n];
      const bool ok = ktile < p.k_tiles;
      // No L2 evict-first hint here: with it, the H100 raised "illegal instruction" on these
      // loads at real sizes (bench/NOTES.md).
      cp_async_16(smem_addr(ws + w_dst[n]), wg + w_off[n] + (ok ? ktile * 512 : 0), ok ? 16 : 0);
    }
    if (per_channel) return;
    // Scales (and zeros) of the stage's groups: 4 rows per 16-byte chunk.
    float* ss = stage_s(kt % kStages);
    float* zs = stage_z(kt % kStages);
    const int fg = (kt * kKt) >> gk_shift;
#pragma unroll
    for (int n = 0; n < kSLoads; ++n) {
      if (s_j[n] >= stage_groups) continue;
      const bool ok = fg + s_j[n] < p.num_groups_k;
      const int64_t off = static_cast<int64_t>(ok ? fg + s_j[n] : 0) * p.np + s_row[n];
      cp_async_16(smem_addr(ss + s_dst[n]), sg + off, ok ? 16 : 0);
      if (zg) cp_async_16(smem_addr(zs + s_dst[n]), zg + off, ok ? 16 : 0);
    }
  };
  // Activations (contiguous columns): row and column of each chunk, set once the token table
  // is known (x_row < 0: a zero-filled column past the block's tokens).
  constexpr int kXChunks = kTokens * kChunks;
  constexpr int kXLoads = (kXChunks + kThreads - 1) / kThreads;
  int x_row[kXLoads], x_col[kXLoads];
  uint32_t x_dst[kXLoads];
  auto load_acts = [&](int kt) {
    __nv_bfloat16* xs = stage_x(kt % kStages);
    const int k0 = kt * kKt;
    const __nv_bfloat16* act = static_cast<const __nv_bfloat16*>(p.act);
    if (permg) {
      // Act-order: gather x[:, perm] element by element (plain loads and stores; the barrier
      // before the stage is consumed orders them like the cp.async groups).
      for (int i = tid; i < kTokens * kKt; i += kThreads) {
        const int r = i / kKt, c = i % kKt, src_row = tok_row[r], col = k0 + c;
        __nv_bfloat16 v = __float2bfloat16_rn(0.f);
        if (src_row >= 0 && col < K) v = act[static_cast<int64_t>(src_row) * K + permg[col]];
        xs[swizzled_offset<kKt>(r, c / 8) + c % 8] = v;
      }
      return;
    }
#pragma unroll
    for (int n = 0; n < kXLoads; ++n) {
      if (kXChunks % kThreads != 0 && tid + n * kThreads >= kXChunks) continue;
      const int col = k0 + x_col[n];
      const bool ok = x_row[n] >= 0 && col < K;
      const __nv_bfloat16* src = act + (ok ? static_cast<int64_t>(x_row[n]) * K + col : 0);
      cp_async_16(smem_addr(xs) + x_dst[n], src, ok ? 16 : 0);
    }
  };

  // Rows of this thread's accumulators: m tile m, half h (rows lane/4 and lane/4 + 8).
  auto local_row = [&](int m, int h) { return (row_warp * kMt + m) * 16 + lane / 4 + 8 * h; };
  auto packed_row = [&](int m, int h) {
    const int lr = local_row(m, h);
    return packed_tile(lr / 16) * 16 + lr % 16;
  };
  // Zero points as the dequantizers want them; symmetric: 2^(bits-1).
  constexpr float kSymZero = float(1 << (kBits - 1));
  auto set_zero = [&](float z, int m, int h, uint32_t (&z2)[kMt][2], float (&zf)[kMt][2]) {
    if constexpr (kRaw) {
      zf[m][h] = 128.f + z;
    } else if constexpr (kBits == 4) {
      z2[m][h] = bf16x2_bits(__float2bfloat162_rn(128.f + z));
    } else {
      zf[m][h] = 8388608.f + z;
    }
  };
  uint32_t zero2[kMt][2];
  float zero_f[kMt][2];
  float pc_scale[kMt][2];  // per-channel scales
#pragma unroll
  for (int m = 0; m < kMt; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float z = kSymZero;
      pc_scale[m][h] = 0.f;
      if (per_channel) {
        pc_scale[m][h] = __ldg(sg + packed_row(m, h));
        if (zg) z = __ldg(zg + packed_row(m, h));
      }
      set_zero(z, m, h, zero2, zero_f);
    }

  // Prologue: weights first (independent of the plan), then the token table, then acts.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s)
    if (s < num_ktiles) load_weights(s);
  if (p.plan_ready) asm volatile("griddepcontrol.wait;\n" ::: "memory");
  // Token table: slot and activation row of each token column; -1 for columns past block_m
  // and for the plan's padding entries (slot == num_slots).
  static_assert(kThreads >= kTokens, "one thread per token column");
  if (tid < kTokens) {
    const int slot = tid < p.block_m ? __ldcg(p.sorted_slots + block * p.block_m + tid) : -1;
    const bool live = 0 <= slot && slot < p.num_slots;
    tok_slot[tid] = live ? slot : -1;
    tok_row[tid] = live ? slot / p.rows_div : -1;
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < kXLoads; ++n) {
    const int i = tid + n * kThreads;
    const int r = (i / kChunks) % kTokens, c = i % kChunks;
    x_row[n] = tok_row[r];
    x_col[n] = c * 8;
    x_dst[n] = 2 * swizzled_offset<kKt>(r, c);
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_ktiles) load_acts(s);
    cp_async_commit();
  }

  float acc[kMt][kNt][4], part[kMt][kNt][4];
#pragma unroll
  for (int m = 0; m < kMt; ++m)
#pragma unroll
    for (int t = 0; t < kNt; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][t][e] = part[m][t][e] = 0.f;
  // kRaw: token column sums of the current group (C fragment columns 2 (lane % 4) + (e & 1);
  // all rows equal), and the group's sum with the zero point taken off.
  float csum[kRaw ? kNt : 1][4];
#pragma unroll
  for (int t = 0; t < (kRaw ? kNt : 1); ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) csum[t][e] = 0.f;
  constexpr uint32_t kOne2 = 0x3F803F80u;  // bf16x2 (1, 1)
  const uint32_t kOnes[4] = {kOne2, kOne2, kOne2, kOne2};
  auto raw_fix = [&](float v, int m, int t, int e) {
    if constexpr (kRaw) return fmaf(-zero_f[m][e >> 1], csum[kRaw ? t : 0][e & 1], v);
    return v;
  };
  (void)kOnes;

  // Zero refresh at each group (or weight tile) start, scale fold at each group (or tile) end.
  // A weight tile holds whole groups or lies inside one (group_k is a power of two >= 32), so
  // whether step j of a tile starts / ends a group does not depend on the tile: a tile's first
  // step starts one and its last ends one; only 32-channel groups in 64-channel int4 tiles add
  // a boundary in the middle (after step 1). Spelled so that j folds to a constant.
  constexpr int kSteps = kTileK / 16;  // 16-channel steps per weight tile
  static_assert(kSteps == 2 || kSteps == 4, "int8 tiles: 2 steps, int4: 4");
  const bool mid_group = kSteps == 4 && gk == 32;
  const bool do_fold = !per_channel, do_refresh = !per_channel && zg;
  auto step_refresh = [&](int j) {
    return do_refresh && (j == 0 || (j == kSteps / 2 && mid_group));
  };
  auto step_fold = [&](int j) {
    return do_fold && (j == kSteps - 1 || (j == kSteps / 2 - 1 && mid_group));
  };
  // Token-fragment addresses (swizzled_offset, split into a per-lane part, a per-tile part and
  // a per-step constant): chunk c = kTileChunks * ti + 2 j + b_chunk of row r sits at chunk
  // c ^ (r & 7), and the XOR touches the tile part only through r's bits above the step part.
  const int b_tok = (lane & 7) + ((lane >> 4) << 3);
  const int b_chunk = (lane >> 3) & 1;
  const int r7 = lane & 7;  // (t * 8 + b_tok) & 7 and (lane & 7) alike
  constexpr int kTileChunks = kTileK / 8;
  constexpr int kStepBits = kTileChunks - 1;  // chunk bits the steps of one tile use
  int b_step_off[kSteps];
#pragma unroll
  for (int j = 0; j < kSteps; ++j)
    b_step_off[j] = 2 * (((2 * j + b_chunk) ^ (r7 & kStepBits)) << 3);
  const int b_row_off = 2 * (kNt == 1 ? r7 : b_tok) * kKt;

  for (int kt = 0; kt < num_ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (kt + kStages - 1 < num_ktiles) {
      load_weights(kt + kStages - 1);
      load_acts(kt + kStages - 1);
    }
    cp_async_commit();

    const unsigned char* ws = stage_w(kt % kStages);
    const uint32_t xs_addr = smem_addr(stage_x(kt % kStages));
    const float* ss = stage_s(kt % kStages);
    const float* zs = stage_z(kt % kStages);
#pragma unroll
    for (int tt = 0; tt < kKTiles / kSplit; ++tt) {
      const int ti = tt * kSplit + kslice;
      const uint32_t b_tile =
          xs_addr + b_row_off + 2 * (((ti * kTileChunks) ^ (r7 & ~kStepBits)) << 3);
      uint4 wq[kMt];
#pragma unroll
      for (int m = 0; m < kMt; ++m)
        wq[m] = *reinterpret_cast<const uint4*>(ws + ((row_warp * kMt + m) * kKTiles + ti) * 512 +
                                                lane * 16);
#pragma unroll
      for (int j = 0; j < kTileK / 16; ++j) {
        const int kpos = 16 * (ti * kSteps + j);  // channel offset in the stage
        const int lg = gk < kKt ? kpos >> gk_shift : 0;
        if (step_refresh(j)) {
#pragma unroll
          for (int m = 0; m < kMt; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h)
              set_zero(zs[lg * kRows + local_row(m, h)], m, h, zero2, zero_f);
        }
        uint32_t a[kMt][4];
#pragma unroll
        for (int m = 0; m < kMt; ++m) {
          const uint32_t w4[4] = {wq[m].x, wq[m].y, wq[m].z, wq[m].w};
          if constexpr (kRaw) {
#pragma unroll
            for (int q = 0; q < 4; ++q) a[m][q] = ((w4[j] >> (4 * q)) & 0x000f000fu) | 0x43004300u;
          } else if constexpr (kBits == 4) {
            dequant_int4(w4[j], zero2[m], a[m]);
          } else {
            dequant_int8(w4[2 * j], zero_f[m], a[m][0], a[m][1]);
            dequant_int8(w4[2 * j + 1], zero_f[m], a[m][2], a[m][3]);
          }
        }
        if constexpr (kNt == 1) {
          uint32_t b0, b1;
          ldmatrix_x2(b_tile + b_step_off[j], b0, b1);
#pragma unroll
          for (int m = 0; m < kMt; ++m) mma_bf16_16816(part[m][0], a[m], b0, b1);
          if constexpr (kRaw) mma_bf16_16816(csum[0], kOnes, b0, b1);
        } else {
#pragma unroll
          for (int t = 0; t < kNt; t += 2) {
            uint32_t b[4];
            ldmatrix_x4(b_tile + 2 * t * 8 * kKt + b_step_off[j], b);
#pragma unroll
            for (int m = 0; m < kMt; ++m) {
              mma_bf16_16816(part[m][t], a[m], b[0], b[1]);
              mma_bf16_16816(part[m][t + 1], a[m], b[2], b[3]);
            }
            if constexpr (kRaw) {
              mma_bf16_16816(csum[t], kOnes, b[0], b[1]);
              mma_bf16_16816(csum[t + 1], kOnes, b[2], b[3]);
            }
          }
        }
        // End of this warp's run in a scale group (a group's end, or its tile's end when the
        // group spans tiles that other warps take): fold the partial sums in with the scale.
        if (step_fold(j)) {
#pragma unroll
          for (int m = 0; m < kMt; ++m) {
            const float s0 = ss[lg * kRows + local_row(m, 0)];
            const float s1 = ss[lg * kRows + local_row(m, 1)];
#pragma unroll
            for (int t = 0; t < kNt; ++t)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                acc[m][t][e] = fmaf(e < 2 ? s0 : s1, raw_fix(part[m][t][e], m, t, e), acc[m][t][e]);
                part[m][t][e] = 0.f;
              }
          }
          if constexpr (kRaw) {
#pragma unroll
            for (int t = 0; t < kNt; ++t)
#pragma unroll
              for (int e = 0; e < 4; ++e) csum[t][e] = 0.f;
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  asm volatile("griddepcontrol.launch_dependents;\n");
  if (per_channel) {
#pragma unroll
    for (int m = 0; m < kMt; ++m)
#pragma unroll
      for (int t = 0; t < kNt; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc[m][t][e] = pc_scale[m][e >> 1] * raw_fix(part[m][t][e], m, t, e);
  }
  if constexpr (kSplit > 1) {
    // K slices 1.. hand their sums to slice 0 through the drained ring (fixed order: the
    // result does not depend on timing).
    float* red = reinterpret_cast<float*>(smem_raw);
    constexpr int kRegs = Tile::kAccRegs;
    __syncthreads();
    if (kslice > 0) {
      float* dst = red + (((kslice - 1) * Tile::kRowWarps + row_warp) * 32 + lane) * kRegs;
#pragma unroll
      for (int m = 0; m < kMt; ++m)
#pragma unroll
        for (int t = 0; t < kNt; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) dst[(m * kNt + t) * 4 + e] = acc[m][t][e];
    }
    __syncthreads();
    if (kslice == 0) {
#pragma unroll
      for (int q = 1; q < kSplit; ++q) {
        const float* src = red + (((q - 1) * Tile::kRowWarps + row_warp) * 32 + lane) * kRegs;
#pragma unroll
        for (int m = 0; m < kMt; ++m)
#pragma unroll
          for (int t = 0; t < kNt; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m][t][e] += src[(m * kNt + t) * 4 + e];
      }
    }
  }

  // C fragment: rows lane/4 (+8) of each m tile, token columns 2 (lane % 4) (+1).
  if (fuse_act) {
    float* acc_tile = reinterpret_cast<float*>(smem_raw);
    constexpr int kLd = Tile::kAccLd;
    __syncthreads();  // every warp is done reading the ring (and the split-K sums)
    if (kslice == 0) {
#pragma unroll
      for (int m = 0; m < kMt; ++m)
#pragma unroll
        for (int t = 0; t < kNt; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc_tile[local_row(m, e >> 1) * kLd + t * 8 + (lane % 4) * 2 + (e & 1)] = acc[m][t][e];
    }
    __syncthreads();
    // Gate column c is tile row c, its up column tile row c + kRows / 2 (packed_tile's order).
    constexpr int kHalf = kRows / 2;
    for (int i = tid; i < kHalf * kTokens; i += kThreads) {
      const int c = i % kHalf, j = i / kHalf;
      const int col = col0 + c, slot = tok_slot[j];
      if (slot >= 0 && col < half_n) {
        const float gate = acc_tile[c * kLd + j], up = acc_tile[(c + kHalf) * kLd + j];
        static_cast<__nv_bfloat16*>(p.act_out)[static_cast<int64_t>(slot) * half_n + col] =
            __float2bfloat16_rn(::moelora::cuda::detail::silu_mul(gate, up));
      }
    }
    return;
  }
  if (kslice != 0) return;
#pragma unroll
  for (int m = 0; m < kMt; ++m)
#pragma unroll
    for (int t = 0; t < kNt; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int slot = tok_slot[t * 8 + (lane % 4) * 2 + (e & 1)];
        const int n = row0 + local_row(m, e >> 1);
        if (slot < 0 || n >= p.n) continue;
        const float w = p.slot_scale ? p.slot_scale[slot] : 1.f;
        p.out[static_cast<int64_t>(slot) * p.n + n] = acc[m][t][e] * w;
      }
}

}  // namespace moelora::cuda::sm90
