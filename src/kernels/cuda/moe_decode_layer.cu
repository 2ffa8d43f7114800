// The whole bf16 MoE layer for decode batches (M <= 8 tokens, no LoRA) in one persistent
// kernel: routing, gate_up + SiLU*up, down times the routed weight, top-k sum (+ shared
// expert). Raw pointers only; the Tensor op is moe_decode_layer_op.cpp.
//
// Why one kernel: at batch 1 the staged chain (route+align, gemm1, gemm2, reduce) pays ~3 us
// of fixed cost per kernel (launch, plan -> group -> weights dependency, first byte, drain;
// bench/NOTES.md "Layer latency"), a third of the layer. Here every CTA routes the batch itself
// (same device function as moe_route, so the same ids and weights), derives the work list (the
// distinct experts in ascending id, then the shared expert) and streams weights at once.
//
// Work: warps, not CTAs, own units, so the ~10^3 units of a batch-1 layer spread evenly:
//   A unit (position p, 8 intermediate columns): 8 gate rows + the matching 8 up rows as the
//     m16 side of mma.m16n8k16, the batch's tokens as the n8 side, over K = H; the epilogue
//     pairs gate and up in registers and writes act = bf16(silu(g) * u) for the routed tokens.
//   B unit (position p, 16 output rows): w2 rows times act over K = inter, times the routed
//     weight, into f32 partials; the warp that completes a 16-row group sums its partials.
// Each warp streams its units' weights through its own cp.async ring (no CTA barriers), in
// order, so the first stages of a B unit are in flight while the warp waits for the act it
// needs (a per-position counter: the only cross-CTA dependency before the final sums).
//
// Bit-identity with the staged path (moe_gemm1_activation -> moe_gemm2 -> moe_reduce): every
// output element accumulates the same mma.m16n8k16 sequence over K (16 at a time, ascending,
// one f32 accumulator, the K tail zero-padded to the staged kernel's 128-wide stages), the same
// silu_mul and bf16 rounding, acc * weight into f32, then the j-ordered f32 sum starting from 0
// and the shared term last. Row tiling and token columns do not change an element's result.
//
// Status: bit-identical on H100, but slower than the staged path so far (qwen3-30b-a3b batch 1
// 62 vs 39 us; bench/NOTES.md "One-kernel decode layer"), so the runner leaves it off by default.
#include <cstdint>
#include <mutex>

#include <cuda_bf16.h>

#include "kernels/cuda/expert_gemm_launch.cuh"
#include "kernels/cuda/moe_decode_layer_launch.h"
#include "kernels/cuda/moe_route.cuh"
#include "kernels/cuda/moe_silu.cuh"
#include "kernels/cuda/pdl_launch.cuh"
#include "kernels/cuda/sm90_moe_gemm.cuh"

namespace moelora::cuda::detail {
namespace {

namespace mma = ::moelora::cuda::sm90::detail;  // cp.async, ldmatrix, mma, swizzle helpers
using bf16 = __nv_bfloat16;

constexpr int kWarps = kDecodeThreads / 32;
constexpr int kKt = 64;                 // K per ring stage
constexpr int kStageElems = 16 * kKt;   // one stage: a warp's 16 weight rows
constexpr int kSteps = kKt / 16;        // MMA k-steps per stage
constexpr int kRefKt = 128;             // the staged GEMM's stage at block_m <= 16 (moe_gemm.cu)
constexpr int kTok = kDecodeMaxTokens;

// Routing results and the work list (shared memory, after the rings).
struct Tables {
  int32_t ids[kDecodeMaxSlots];
  float wts[kDecodeMaxSlots];
  int32_t pos_of_expert[kDecodeMaxExperts];  // first a "touched" flag, then the position
  int32_t expert[kDecodeMaxPositions];
  int32_t slot[kDecodeMaxPositions][kTok];  // token -> row of act / part (-1: not routed)
  float scale[kDecodeMaxPositions][kTok];   // routed weight (1 for the shared expert)
  int32_t warp_count[kWarps];
};

template <int kStages>
constexpr int ring_bytes() {
  return kWarps * kStages * kStageElems * 2;
}
template <int kStages>
constexpr int smem_bytes() {
  return ring_bytes<kStages>() + int(sizeof(Tables));
}

// Per-launch sizes every warp derives from the routing.
struct Work {
  int D;     // distinct routed experts
  int P;     // positions: D (+1 shared)
  int tA;    // A units per routed expert (8 columns each)
  int nA_routed, nA, U;
  int tB;    // B units per position (16 rows each)
};

struct Unit {
  const bf16* w;  // the position's gate_up [2 * inter, H] or down [H, inter]
  int pos;
  int row0;       // A: first intermediate column; B: first output row
  int K;
  int inter;
  bool down;
};

__device__ __forceinline__ Unit decode_unit(const DecodeLayerArgs& a, const Tables& tb,
                                            const Work& wk, int u) {
  Unit x;
  if (u < wk.nA) {
    x.down = false;
    x.K = a.hidden;
    if (u < wk.nA_routed) {
      x.pos = u / wk.tA;
      x.row0 = (u - x.pos * wk.tA) * 8;
      x.inter = a.inter;
      x.w = static_cast<const bf16*>(a.w13) +
            int64_t(tb.expert[x.pos]) * 2 * a.inter * int64_t(a.hidden);
    } else {
      x.pos = wk.D;
      x.row0 = (u - wk.nA_routed) * 8;
      x.inter = a.shared_inter;
      x.w = static_cast<const bf16*>(a.shared_w13);
    }
  } else {
    const int b = u - wk.nA;
    x.down = true;
    x.pos = b / wk.tB;
    x.row0 = (b - x.pos * wk.tB) * kDecodeRowGroup;
    const bool shared = x.pos == wk.D;
    x.inter = shared ? a.shared_inter : a.inter;
    x.K = x.inter;
    x.w = shared ? static_cast<const bf16*>(a.shared_w2)
                 : static_cast<const bf16*>(a.w2) +
                       int64_t(tb.expert[x.pos]) * a.hidden * int64_t(a.inter);
  }
  return x;
}

// Weight row of MMA row r (0..15) of a unit; rows past the matrix are clamped (loaded, never
// stored). A units: rows 0-7 gate columns, 8-15 the same columns' up rows.
__device__ __forceinline__ int64_t unit_row(const Unit& x, int hidden, int r) {
  if (x.down) return min(x.row0 + r, hidden - 1);
  return min(x.row0 + (r & 7), x.inter - 1) + (r >= 8 ? x.inter : 0);
}

__device__ __forceinline__ int ld_acquire(const int32_t* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A strong load that does not order later loads (no L1 invalidation per poll: the acquire is
// one fence once the value is seen).
__device__ __forceinline__ int ld_relaxed(const int32_t* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The B fragments (token columns) of one stage: lane holds column lane / 4, k pairs
// 2 * (lane % 4) and +8 of each 16-step (what ldmatrix gives the staged kernel). x is read-only
// in this kernel (L1 path); act was written by other CTAs in this launch (L2 path). Branch-free
// (lanes without a token load `fallback` and drop it): the MMAs after it need a converged warp.
template <bool kCoherent>
__device__ __forceinline__ void load_b(const bf16* src, const bf16* fallback, int kt, int K,
                                       uint32_t (&b)[kSteps][2]) {
  const int k0 = kt * kKt + 2 * (threadIdx.x & 3);
  const bool live = src != nullptr;
  const bf16* base = live ? src : fallback;
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = k0 + s * 16 + h * 8;
      const bool ok = live && k < K;
      const auto* p = reinterpret_cast<const unsigned int*>(base + (k < K ? k : 0));
      const uint32_t v = kCoherent ? __ldcg(p) : __ldg(p);
      b[s][h] = ok ? v : 0u;
    }
  }
}

// kDeep: the token fragments of a stage are loaded two stages ahead (one otherwise) and the
// act counters are polled relaxed with one fence after (an acquire load per poll otherwise).
template <int kStages, bool kDeep>
__global__ void __launch_bounds__(kDecodeThreads) moe_decode_layer_kernel(const DecodeLayerArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  Tables& tb = *reinterpret_cast<Tables*>(smem + ring_bytes<kStages>());
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m = a.m, H = a.hidden, k = a.route.top_k, E = a.route.num_experts;
  const bool has_shared = a.shared_inter > 0;

  pdl_wait();  // logits, x and the counters' reset come from earlier kernels

  // --- routing: every CTA routes the batch (scratch in the rings, unused until later) ---
  {
    const int team = route_team(E), teams = kDecodeThreads / team, tslot = tid / team;
    unsigned char* scratch = smem + tslot * route_team_smem(E, a.route.n_group);
    for (int t0 = 0; t0 < m; t0 += teams) {
      // Threads past the last whole team route "token m" (nothing) to keep the barriers.
      const int t = tslot < teams ? t0 + tslot : m;
      route_token_team(a.logits, a.bias, a.route, t, m, tslot * team, scratch, tb.ids, tb.wts,
                       nullptr);
    }
  }
  const int nslots = m * k;
  if (blockIdx.x == 0)
    for (int s = tid; s < nslots; s += kDecodeThreads) {
      a.topk_ids[s] = tb.ids[s];
      a.topk_weights[s] = tb.wts[s];
    }

  // --- work list: distinct experts in ascending id, then the shared expert ---
  for (int e = tid; e < E; e += kDecodeThreads) tb.pos_of_expert[e] = 0;
  for (int i = tid; i < kDecodeMaxPositions * kTok; i += kDecodeThreads) (&tb.slot[0][0])[i] = -1;
  __syncthreads();
  for (int s = tid; s < nslots; s += kDecodeThreads) {
    const int id = tb.ids[s];
    if (id >= 0 && id < E) tb.pos_of_expert[id] = 1;
  }
  __syncthreads();
  const bool touched = tid < E && tb.pos_of_expert[tid] != 0;  // E <= kDecodeThreads
  const unsigned ballot = __ballot_sync(0xffffffffu, touched);
  if (lane == 0) tb.warp_count[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, D = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? tb.warp_count[w] : 0;
    D += tb.warp_count[w];
  }
  if (touched) {
    const int p = before + __popc(ballot & ((1u << lane) - 1));
    tb.expert[p] = tid;
    tb.pos_of_expert[tid] = p;
  }
  __syncthreads();
  for (int s = tid; s < nslots; s += kDecodeThreads) {
    const int id = tb.ids[s];
    if (id < 0 || id >= E) continue;
    const int p = tb.pos_of_expert[id];
    tb.slot[p][s / k] = s;
    tb.scale[p][s / k] = tb.wts[s];
  }
  if (has_shared)
    for (int t = tid; t < m; t += kDecodeThreads) {
      tb.slot[D][t] = t;
      tb.scale[D][t] = 1.0f;
    }
  __syncthreads();

  Work wk;
  wk.D = D;
  wk.P = D + (has_shared ? 1 : 0);
  wk.tA = (a.inter + 7) / 8;
  wk.nA_routed = D * wk.tA;
  wk.nA = wk.nA_routed + (has_shared ? (a.shared_inter + 7) / 8 : 0);
  wk.tB = (H + kDecodeRowGroup - 1) / kDecodeRowGroup;
  wk.U = wk.nA + wk.P * wk.tB;
  int32_t* pos_done = a.counters;
  int32_t* rows_done = a.counters + kDecodeMaxPositions * kDecodeCounterStride;
  int32_t* cta_done = rows_done + wk.tB;

  // --- this warp's units: g, g + W, ... (consecutive g on different CTAs) ---
  const int W = gridDim.x * kWarps;
  const int g = warp * gridDim.x + blockIdx.x;
  bf16* ring = reinterpret_cast<bf16*>(smem) + warp * kStages * kStageElems;
  const uint32_t ring_addr = mma::smem_addr(ring);

  // Producer: runs kStages - 1 tiles ahead of the consumer, across unit boundaries. Lane
  // copies chunk (lane % 8) of rows lane / 8 + 4 i.
  int pu = g, pkt = 0, pnkt = 0, pK = 0, pq = 0;
  const bf16* prow[4];
  auto producer_begin = [&](int u) {
    pu = u;
    pkt = 0;
    if (u >= wk.U) return;
    const Unit x = decode_unit(a, tb, wk, u);
    pK = x.K;
    pnkt = (x.K + kKt - 1) / kKt;
#pragma unroll
    for (int i = 0; i < 4; ++i) prow[i] = x.w + unit_row(x, H, (lane >> 3) + 4 * i) * x.K;
  };
  auto produce = [&] {
    if (pu >= wk.U) return;
    bf16* st = ring + (pq % kStages) * kStageElems;
    const int col = pkt * kKt + (lane & 7) * 8;
    const bool ok = col < pK;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      mma::cp_async_16(
          mma::smem_addr(st + mma::swizzled_offset<kKt>((lane >> 3) + 4 * i, lane & 7)),
          prow[i] + (ok ? col : 0), ok ? 16 : 0);
    ++pq;
    if (++pkt == pnkt) producer_begin(pu + W);
  };
  producer_begin(g);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    produce();
    mma::cp_async_commit();
  }

  int q = 0;  // consumer's tile count (ring slot q % kStages)
  const int t_col = lane >> 2;  // this lane's token column in the B fragment
  for (int u = g; u < wk.U; u += W) {
    const Unit x = decode_unit(a, tb, wk, u);
    const bool shared = x.pos == wk.D;
    const bf16* bsrc = nullptr;
    if (!x.down) {
      if (t_col < m) bsrc = static_cast<const bf16*>(a.x) + int64_t(t_col) * H;
    } else {
      // The act rows of this position: complete once all its A units have signalled.
      const int target = shared ? (a.shared_inter + 7) / 8 : wk.tA;
      const int32_t* flag = pos_done + x.pos * kDecodeCounterStride;
      if constexpr (kDeep) {
        while (ld_relaxed(flag) < target) __nanosleep(100);
        __threadfence();
      } else {
        while (ld_acquire(flag) < target) __nanosleep(100);
      }
      __syncwarp();
      const int s = t_col < m ? tb.slot[x.pos][t_col] : -1;
      if (s >= 0)
        bsrc = static_cast<const bf16*>(shared ? a.shared_act : a.act) + int64_t(s) * x.inter;
    }
    const int nkt = (x.K + kKt - 1) / kKt;
    const bf16* fallback = static_cast<const bf16*>(a.x);
    auto load_tile = [&](int kt, uint32_t(&b)[kSteps][2]) {
      if (x.down)
        load_b<true>(bsrc, fallback, kt, x.K, b);
      else
        load_b<false>(bsrc, fallback, kt, x.K, b);
    };
    // Token fragments: bc for this stage, bn (and bn2 when kDeep) for the next ones.
    uint32_t bc[kSteps][2], bn[kSteps][2] = {}, bn2[kSteps][2] = {};
    load_tile(0, bc);
    if (kDeep && nkt > 1) load_tile(1, bn);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int kt = 0; kt < nkt; ++kt) {
      mma::cp_async_wait<kStages - 2>();
      __syncwarp();
      produce();  // refills the slot consumed last iteration
      mma::cp_async_commit();
      if (kDeep && kt + 2 < nkt) load_tile(kt + 2, bn2);
      if (!kDeep && kt + 1 < nkt) load_tile(kt + 1, bn);
      // ldmatrix / mma are .aligned: the whole warp must arrive together.
      __syncwarp();
      const uint32_t st = ring_addr + (q % kStages) * kStageElems * 2;
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        uint32_t af[4];
        mma::ldmatrix_x4(st + 2 * mma::swizzled_offset<kKt>(lane & 15, 2 * s + (lane >> 4)), af);
        mma::mma_bf16_16816(acc, af, bc[s][0], bc[s][1]);
      }
      ++q;
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        bc[s][0] = bn[s][0], bc[s][1] = bn[s][1];
        if constexpr (kDeep) bn[s][0] = bn2[s][0], bn[s][1] = bn2[s][1];
      }
    }
    // The staged kernel's last 128-wide stage may hold one more all-zero 64-wide half.
    const int ref_steps = (x.K + kRefKt - 1) / kRefKt * (kRefKt / 16);
    __syncwarp();
    for (int s = nkt * kSteps; s < ref_steps; ++s) {
      const uint32_t zero[4] = {0u, 0u, 0u, 0u};
      mma::mma_bf16_16816(acc, zero, 0u, 0u);
    }

    // C fragment: MMA rows lane / 4 (acc 0, 1) and lane / 4 + 8 (acc 2, 3), token columns
    // 2 * (lane % 4) and +1.
    const int t0 = 2 * (lane & 3);
    if (!x.down) {
      const int col = x.row0 + (lane >> 2);
      bf16* act = static_cast<bf16*>(shared ? a.shared_act : a.act);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int t = t0 + e;
        const int s = t < m ? tb.slot[x.pos][t] : -1;
        if (s >= 0 && col < x.inter)
          act[int64_t(s) * x.inter + col] = __float2bfloat16_rn(silu_mul(acc[e], acc[2 + e]));
      }
      __threadfence();
      __syncwarp();
      if (lane == 0) atomicAdd(pos_done + x.pos * kDecodeCounterStride, 1);
      continue;
    }
    float* part = shared ? a.shared_part : a.part;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = t0 + (e & 1), row = x.row0 + (lane >> 2) + (e >> 1) * 8;
      const int s = t < m ? tb.slot[x.pos][t] : -1;
      if (s >= 0 && row < H) part[int64_t(s) * H + row] = acc[e] * tb.scale[x.pos][t];
    }
    __threadfence();
    __syncwarp();
    const int group = x.row0 / kDecodeRowGroup;
    int last = 0;
    if (lane == 0) last = atomicAdd(rows_done + group, 1) == wk.P - 1;
    if (!__shfl_sync(0xffffffffu, last, 0)) continue;
    // Last unit of this row group: y = sum over j of the partials (as moe_reduce).
    __threadfence();
    for (int i = lane; i < kDecodeRowGroup * m; i += 32) {
      const int t = i / kDecodeRowGroup, row = x.row0 + i % kDecodeRowGroup;
      if (row >= H) continue;
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) {
        if (tb.ids[t * k + j] < 0) continue;
        sum += __ldcg(a.part + int64_t(t * k + j) * H + row);
      }
      if (has_shared) {
        const float gate = a.shared_gate ? 1.0f / (1.0f + expf(-a.shared_gate[t])) : 1.0f;
        sum += gate * __ldcg(a.shared_part + int64_t(t) * H + row);
      }
      static_cast<bf16*>(a.y)[int64_t(t) * H + row] = __float2bfloat16_rn(sum);
    }
  }
  mma::cp_async_wait<0>();
  __syncwarp();

  // --- exit: the last CTA out resets the counters for the next launch ---
  __syncthreads();
  pdl_trigger();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(cta_done, 1) == int(gridDim.x) - 1) {
      for (int p = 0; p < wk.P; ++p) pos_done[p * kDecodeCounterStride] = 0;
      for (int r = 0; r < wk.tB; ++r) rows_done[r] = 0;
      *cta_done = 0;
    }
  }
}

struct GridCache {
  std::mutex mu;
  int ctas[64] = {};  // co-resident CTAs per device (0: not computed yet)
};

template <int kStages, bool kDeep>
cudaError_t launch_variant(const DecodeLayerArgs& a, cudaStream_t stream) {
  constexpr auto kernel = &moe_decode_layer_kernel<kStages, kDeep>;
  constexpr int smem = smem_bytes<kStages>();
  if (cudaError_t e = allow_smem<kernel>(smem); e != cudaSuccess) return e;
  static GridCache cache;
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  int resident = 0;
  {
    const std::lock_guard<std::mutex> lock(cache.mu);
    resident = cache.ctas[device & 63];
    if (resident == 0) {
      int per_sm = 0, sms = 0;
      if (cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel,
                                                                       kDecodeThreads, smem);
          e != cudaSuccess)
        return e;
      if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
          e != cudaSuccess)
        return e;
      resident = cache.ctas[device & 63] = per_sm * sms;
    }
  }
  if (resident <= 0) return cudaErrorInvalidConfiguration;
  // No more CTAs than the largest work list has warps for.
  const int E = a.route.num_experts, k = a.route.top_k;
  const int64_t routed = a.m * k < E ? a.m * k : E;
  const int64_t shared = a.shared_inter > 0 ? 1 : 0;
  const int64_t units = routed * ((a.inter + 7) / 8) + shared * ((a.shared_inter + 7) / 8) +
                        (routed + shared) * ((a.hidden + kDecodeRowGroup - 1) / kDecodeRowGroup);
  const int64_t want = (units + kWarps - 1) / kWarps;
  const int grid = int(want < resident ? want : resident);
  return launch_pdl(kernel, dim3(grid), dim3(kDecodeThreads), size_t(smem), stream, a);
}

}  // namespace

cudaError_t launch_moe_decode_layer(const DecodeLayerArgs& a, bool deep_prefetch,
                                    cudaStream_t stream) {
  const int E = a.route.num_experts;
  if (a.m < 1 || a.m > kDecodeMaxTokens || a.m * a.route.top_k > kDecodeMaxSlots ||
      E < 1 || E > kDecodeMaxExperts || a.hidden % 8 != 0 || a.inter % 8 != 0 ||
      a.shared_inter % 8 != 0 ||
      size_t(kDecodeThreads + route_team(E) - 1) / route_team(E) *
              route_team_smem(E, a.route.n_group) >
          size_t(ring_bytes<kDecodeStages>()))
    return cudaErrorInvalidValue;
  return deep_prefetch ? launch_variant<kDecodeStages, true>(a, stream)
                       : launch_variant<kDecodeStages, false>(a, stream);
}

}  // namespace moelora::cuda::detail
