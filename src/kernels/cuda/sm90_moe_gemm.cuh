// Device code of the grouped expert GEMMs (gemm1 gate_up, gemm2 down) for decode-sized
// batches on Hopper. Raw pointers only; the launcher is in moe_gemm.cu.
//
// out[s, n] = scale(s) * sum_k act[s / rows_div, k] * w[g, n, k]  for each aligned slot s.
//
// Decode is memory-bound: every touched expert's weights stream from HBM once while a
// handful of tokens ride along. So the MMA is "swapped": weight rows fill the m16 side of
// mma.m16n8k16 and the block's tokens the n8 side, and no tensor-core work goes to padding
// rows. A CTA owns kRows weight rows of one aligned block (one expert, block_m tokens) and
// streams its whole K through a cp.async ring of kStages tiles (16-byte loads, weights marked
// L2 evict-first since they are read once; activations stay in L2 for the other row tiles).
// Each warp owns 16 (or, for wide token tiles, 32) weight rows and all of the block's tokens.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/moe_gemm_launch.h"
#include "kernels/cuda/moe_lora_epilogue.cuh"
#include "kernels/cuda/moe_silu.cuh"

namespace moelora::cuda::sm90 {

// Kernel arguments: the launcher's, unchanged (bf16 pointers are cast on use).
using MoeGemmParams = MoeGemmArgs;

namespace detail {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 zero-fills the destination without reading.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

// Same, with an L2 cache policy (weights: evict-first) and a 256-byte L2 prefetch.
__device__ __forceinline__ void cp_async_16_policy(uint32_t dst, const void* src, int src_bytes,
                                                   uint64_t policy) {
  asm volatile(
      "cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;\n" ::"r"(dst),
      "l"(src), "r"(src_bytes), "l"(policy));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr));
}

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Tiles are [rows][kKt] bf16 in 16-byte chunks; chunk c of row r sits at c ^ (r & 7) so the
// 8 rows an ldmatrix reads hit 8 different bank groups.
template <int kKt>
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return row * kKt + ((chunk ^ (row & 7)) << 3);
}

}  // namespace detail

// kNt: 8-token MMA columns per block (block_m <= 8 * kNt); kMt: 16-row MMA tiles per warp
// (2 for wide token tiles, so each B fragment read from shared memory feeds two MMAs);
// kRows: weight rows per CTA; kKt: K per pipeline stage; kStages: ring depth.
template <int kNt, int kMt, int kRows, int kKt, int kStages>
struct MoeGemmTile {
  static constexpr int kWarps = kRows / (16 * kMt);
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTokens = 8 * kNt;
  static constexpr int kChunks = kKt / 8;  // 16-byte chunks per tile row
  static constexpr int kStageElems = (kRows + kTokens) * kKt;
  static constexpr int kSmemBytes = kStages * kStageElems * 2 + kTokens * 8;
  // Fused-activation epilogue: the f32 accumulators staged in the (drained) ring.
  static constexpr int kAccLd = kTokens + 1;
  static_assert(kRows * kAccLd * 4 <= kStages * kStageElems * 2, "epilogue tile fits the ring");
  static_assert(kRows % (16 * kMt) == 0 && kChunks >= 8 && kChunks % 8 == 0, "tile shape");
  static_assert(kNt == 1 || kNt % 2 == 0, "token columns come in pairs past the first");
  // LoRA epilogue (MoeGemmLoraArgs): the drained ring holds the f32 tile, u and B rows
  // (detail::LoraSmem); the token tables follow the larger of the ring and what one adapter
  // needs there (so only a wide u or B grows the kernel's shared memory).
  static constexpr int kRingBytes = kStages * kStageElems * 2;
  using LoraSmem = ::moelora::cuda::detail::LoraSmem<kRows, kTokens, kAccLd>;
  __host__ __device__ static constexpr int lora_table_offset(int ldu, int r_max) {
    return LoraSmem::table_offset(kRingBytes, ldu, r_max);
  }
  __host__ __device__ static constexpr int lora_smem_bytes(int ldu, int r_max) {
    return lora_table_offset(ldu, r_max) + LoraSmem::table_bytes();
  }
};

// kLora: with the LoRA epilogue (p.lora set); false is the kernel without it.
template <int kNt, int kMt, int kRows, int kKt, int kStages, bool kLora>
__global__ void __launch_bounds__(MoeGemmTile<kNt, kMt, kRows, kKt, kStages>::kThreads)
    moe_gemm_kernel(const MoeGemmParams p) {
  using Tile = MoeGemmTile<kNt, kMt, kRows, kKt, kStages>;
  constexpr int kTokens = Tile::kTokens;
  constexpr int kChunks = Tile::kChunks;
  constexpr int kThreads = Tile::kThreads;

  // Programmatic dependent launch: this grid may start while its predecessor drains; wait
  // for everything the predecessor wrote (plan, activations) -- or, when the plan is known
  // to be older than the predecessor, only before the activations (below).
  if (!p.plan_ready) asm volatile("griddepcontrol.wait;\n" ::: "memory");

  const int block = p.row_tiles_fastest ? blockIdx.y : blockIdx.x;
  const int tile = p.row_tiles_fastest ? blockIdx.x : blockIdx.y;
  // Both reads are issued before either is used: one memory latency, not two. L2 reads
  // (.cg): this CTA may have started before the plan's writer finished on this SM's L1 view.
  const int num_padded = __ldcg(p.num_padded);
  const int group = __ldcg(p.block_group + block);
  // Device-side counts: the grid is sized for the worst case, surplus CTAs leave here. They
  // still wait on the predecessor so that this grid's completion implies its predecessor's
  // (the chain of waits is what orders the next layer's writes after this layer's reads).
  if (block * p.block_m >= num_padded || group < 0) {
    if (p.plan_ready) asm volatile("griddepcontrol.wait;\n" ::: "memory");
    return;
  }
  // Fused activation: this CTA owns intermediate columns [col0, col0 + kRows / 2); local rows
  // below kRows / 2 are their gate rows, the others their up rows (n / 2 further on).
  const bool fuse_act = p.act_out != nullptr;
  const int half_n = p.n / 2;
  const int col0 = tile * (kRows / 2);
  const int row0 = tile * kRows;
  const int tid = threadIdx.x;
  // Weight row of local row r (clamped rows are loaded but never stored).
  auto weight_row = [&](int r) {
    if (!fuse_act) return min(row0 + r, p.n - 1);
    const bool up = r >= kRows / 2;
    return min(col0 + r - (up ? kRows / 2 : 0), half_n - 1) + (up ? half_n : 0);
  };

  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  // Per token column: the source row into act (-1 = padding) and its slot.
  [[maybe_unused]] const int lora_tables_at =
      kLora ? Tile::lora_table_offset(p.lora.ldu, p.lora.r_max) : Tile::kRingBytes;
  int* tok_row = reinterpret_cast<int*>(smem_raw + lora_tables_at);
  int* tok_slot = tok_row + kTokens;
  // LoRA epilogue: this thread's row (tid % kRows) and whether it is stored, and the tables.
  [[maybe_unused]] const int lora_c = tid % kRows;
  [[maybe_unused]] const int lora_wr = weight_row(lora_c);
  [[maybe_unused]] const bool lora_row_ok =
      fuse_act ? col0 + lora_c % (kRows / 2) < half_n : row0 + lora_c < p.n;
  [[maybe_unused]] const ::moelora::cuda::detail::LoraTables lt =
      ::moelora::cuda::detail::lora_tables<kTokens>(tok_slot + kTokens);

  const int K = p.k;
  const int num_ktiles = (K + kKt - 1) / kKt;
  const __nv_bfloat16* wg =
      static_cast<const __nv_bfloat16*>(p.w) + static_cast<int64_t>(group) * p.n * K;
  const uint64_t policy = detail::evict_first_policy();

  auto load_weights = [&](int kt) {
    __nv_bfloat16* ws = smem + (kt % kStages) * Tile::kStageElems;
    const int k0 = kt * kKt;
#pragma unroll
    for (int i = tid; i < kRows * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int row = weight_row(r);
      const int col = k0 + c * 8;
      const bool ok = col < K;
      const __nv_bfloat16* src = wg + static_cast<int64_t>(row) * K + (ok ? col : 0);
      detail::cp_async_16_policy(detail::smem_addr(ws + detail::swizzled_offset<kKt>(r, c)), src,
                                 ok ? 16 : 0, policy);
    }
  };
  auto load_acts = [&](int kt) {
    __nv_bfloat16* xs = smem + (kt % kStages) * Tile::kStageElems + kRows * kKt;
    const int k0 = kt * kKt;
#pragma unroll
    for (int i = tid; i < kTokens * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int src_row = tok_row[r];
      const int col = k0 + c * 8;
      const bool ok = src_row >= 0 && col < K;
      const __nv_bfloat16* src =
          static_cast<const __nv_bfloat16*>(p.act) + (ok ? static_cast<int64_t>(src_row) * K + col : 0);
      detail::cp_async_16(detail::smem_addr(xs + detail::swizzled_offset<kKt>(r, c)), src,
                          ok ? 16 : 0);
    }
  };

  // Prologue. The weights of the first stages go out before the token table is read (they
  // do not depend on it), so HBM starts streaming one latency earlier. Group 0 holds
  // weights 0..S-2 and acts 0; group s holds acts s: stage 0 waits for a little more than
  // it needs, which costs nothing as those loads were issued together.
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
  // LoRA epilogue: the tokens' adapters are requested now; the rest of the setup runs in
  // phases during the main loop (detail::kLoraPhases).
  [[maybe_unused]] ::moelora::cuda::detail::LoraTokenRegs<kTokens, kThreads> lora_regs;
  if constexpr (kLora) lora_regs.fetch_adapters(p.lora, tok_slot, tid);
  [[maybe_unused]] auto lora_phase = [&](int phase) {
    switch (phase) {
      case 0: lora_regs.fetch_meta(p.lora); break;
      case 2: lora_regs.write(p.lora, lt, tid); break;
      case 3: ::moelora::cuda::detail::lora_sort_tokens<kTokens, kThreads>(lt, tid); break;
      case 4: ::moelora::cuda::detail::lora_list_adapters<kTokens, kThreads>(lt, tid); break;
      case 5:
        if (tid < kRows && lora_row_ok)
          ::moelora::cuda::detail::lora_prefetch_b(p.lora, lt, group, p.n, lora_wr);
        break;
      default: break;
    }
  };

  float acc[kMt][kNt][4];
#pragma unroll
  for (int m = 0; m < kMt; ++m)
#pragma unroll
    for (int t = 0; t < kNt; ++t) acc[m][t][0] = acc[m][t][1] = acc[m][t][2] = acc[m][t][3] = 0.f;

  const int warp = tid / 32, lane = tid % 32;
  // ldmatrix row/chunk roles: A x4 covers rows 0-15 at k-chunks {0,1}; B x4 covers tokens
  // 0-7 at chunks {0,1} then tokens 8-15 at chunks {0,1}.
  const int a_row = warp * 16 * kMt + (lane & 15);
  const int a_chunk = lane >> 4;
  const int b_tok = (lane & 7) + ((lane >> 4) << 3);
  const int b_chunk = (lane >> 3) & 1;

  for (int kt = 0; kt < num_ktiles; ++kt) {
    detail::cp_async_wait<kStages - 2>();
    __syncthreads();
    // Refill the slot consumed last iteration (every warp is past it after the barrier).
    if (kt + kStages - 1 < num_ktiles) {
      load_weights(kt + kStages - 1);
      load_acts(kt + kStages - 1);
    }
    detail::cp_async_commit();
    if constexpr (kLora) {
      if (kt < ::moelora::cuda::detail::kLoraPhases) lora_phase(kt);
    }

    const __nv_bfloat16* ws = smem + (kt % kStages) * Tile::kStageElems;
    const uint32_t ws_addr = detail::smem_addr(ws);
    const uint32_t xs_addr = detail::smem_addr(ws + kRows * kKt);
#pragma unroll
    for (int kk = 0; kk < kChunks; kk += 2) {
      uint32_t a[kMt][4];
#pragma unroll
      for (int m = 0; m < kMt; ++m)
        detail::ldmatrix_x4(
            ws_addr + 2 * detail::swizzled_offset<kKt>(a_row + 16 * m, kk + a_chunk), a[m]);
      if constexpr (kNt == 1) {
        uint32_t b0, b1;
        detail::ldmatrix_x2(xs_addr + 2 * detail::swizzled_offset<kKt>(lane & 7, kk + b_chunk),
                            b0, b1);
#pragma unroll
        for (int m = 0; m < kMt; ++m) detail::mma_bf16_16816(acc[m][0], a[m], b0, b1);
      } else {
#pragma unroll
        for (int t = 0; t < kNt; t += 2) {
          uint32_t b[4];
          detail::ldmatrix_x4(
              xs_addr + 2 * detail::swizzled_offset<kKt>(t * 8 + b_tok, kk + b_chunk), b);
#pragma unroll
          for (int m = 0; m < kMt; ++m) {
            detail::mma_bf16_16816(acc[m][t], a[m], b[0], b[1]);
            detail::mma_bf16_16816(acc[m][t + 1], a[m], b[2], b[3]);
          }
        }
      }
    }
  }
  detail::cp_async_wait<0>();
  // The successor may launch once every CTA is past its stream (triggering at the start let
  // waiting successor CTAs take the slots this grid's own later CTAs needed: measured slower).
  asm volatile("griddepcontrol.launch_dependents;\n");
  if constexpr (kLora) {
    // Setup phases the loop was too short for, then publish the tables.
    for (int phase = num_ktiles; phase < ::moelora::cuda::detail::kLoraPhases - 1; ++phase) {
      __syncthreads();
      lora_phase(phase);
    }
    __syncthreads();
  }

  // C fragment: rows lane/4 and lane/4 + 8 of each 16-row tile (output columns), token
  // columns 2*(lane%4) and +1.
  // LoRA tokens in this block (uniform over the CTA; published by the main loop's barriers).
  const int lora_count = kLora ? lt.count[0] : 0;
  if (fuse_act || lora_count > 0) {
    // Stage the tile in the drained ring (every warp is past its last ldmatrix after the
    // barrier), then pair gate row c with up row kRows / 2 + c.
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
          acc_tile[(r_base + (e >> 1) * 8) * kLd + t * 8 + (lane % 4) * 2 + (e & 1)] =
              acc[m][t][e];
    }
    __syncthreads();
    if constexpr (kLora) {
      if (lora_count > 0)
        ::moelora::cuda::detail::lora_add<kRows, kTokens, kThreads, kLd>(
            p.lora, lt, tok_slot, smem_raw, lora_tables_at, group, p.n, lora_wr, lora_row_ok,
            tid);
      if (!fuse_act) {
        // o = (acc + B . u) * scale; base tokens: acc * scale, as the register path below.
        for (int i = tid; i < kRows * kTokens; i += kThreads) {
          const int j = i / kRows, c = i % kRows;
          const int slot = tok_slot[j];
          const int n = row0 + c;
          if (slot < 0 || n >= p.n) continue;
          const float scale = p.slot_scale ? p.slot_scale[slot] : 1.f;
          p.out[static_cast<int64_t>(slot) * p.n + n] = acc_tile[c * kLd + j] * scale;
        }
        return;
      }
    }
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
