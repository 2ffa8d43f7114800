// The LoRA expands folded into the two elementwise passes of the MoE layer (the hooks' fused
// path for decode-sized batches): the gate_up delta is added inside SiLU(gate) * up, the down
// delta inside the top-k reduction, so no expand kernel and no extra pass over h or o sits on
// the critical path. Each (token-slot) row computes its own delta from the shrink's partial
// sums u and the adapter's B rows (re-read from L2 by slots of the same (adapter, expert)),
// which is cheap at decode sizes and wasteful for large batches — those keep the staged
// expands. Base slots (adapter -1, or a seam the adapter lacks) take exactly the operations of
// moe_activation / moe_reduce, so they are bit-identical to a LoRA-off run.
//
// Launched with programmatic serialization like every kernel of the layer, and they wait
// (griddepcontrol.wait) before reading anything: u arrives from the hooks' side stream over an
// event join, and only a kernel that reads u before its wait is unsafe under graph capture
// (session 1's "early expand"). Each thread issues its B row loads for all of a token's top-k
// slots before using any (one memory latency, not top_k of them).
#include <cuda_bf16.h>

#include "kernels/cuda/moe_lora_fused_launch.h"
#include "kernels/cuda/moe_silu.cuh"
#include "kernels/cuda/pdl_launch.cuh"

namespace moelora::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxU = 512;  // staged u columns per CTA (gate_up: 2 * r_max <= 512)
constexpr int kMaxTopK = 8;  // top-k slots whose B rows the reduction prefetches

struct Meta {
  int shrink, gate_rank, gate_col, up_rank, up_col, down_rank;
};

__device__ __forceinline__ Meta load_meta(const int32_t* m, int slot) {
  const int32_t* p = m + slot * 6;
  return {p[0], p[1], p[2], p[3], p[4], p[5]};
}

// sum_r b[r] * u[r] for r < rank (b bf16 row, u in shared memory).
__device__ __forceinline__ float dot_b(const __nv_bfloat16* b, const float* u, int rank) {
  float acc = 0.f;
  int r = 0;
  for (; r + 8 <= rank; r += 8) {
    const uint4 v = *reinterpret_cast<const uint4*>(b + r);
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(p[i]);
      acc = fmaf(f.x, u[r + 2 * i], acc);
      acc = fmaf(f.y, u[r + 2 * i + 1], acc);
    }
  }
  for (; r < rank; ++r) acc = fmaf(__bfloat162float(b[r]), u[r], acc);
  return acc;
}

// Stages u row `s` (summing the K-split partials) for columns [c0, c0 + count) into dst.
__device__ __forceinline__ void stage_u(const MoeLoraFusedArgs& p, int64_t s, int64_t n, int c0,
                                        int count, float* dst) {
  for (int c = threadIdx.x; c < count; c += blockDim.x) {
    float v = 0.f;
    for (int sp = 0; sp < p.splits; ++sp) v += p.u[(sp * n + s) * p.ldu + c0 + c];
    dst[c] = v;
  }
}

// grid: (slots, ceil(I / kThreads)). One column i of one slot per thread.
__global__ void __launch_bounds__(kThreads) moe_lora_activation_kernel(const MoeLoraFusedArgs p) {
  __shared__ float ug[kMaxU / 2], uu[kMaxU / 2];
  detail::pdl_wait();
  detail::pdl_trigger();
  const int64_t s = blockIdx.x, n = p.m * p.top_k;
  const int e = p.ids[s];
  if (e < 0) return;
  const int inter = p.width;
  const int i = blockIdx.y * kThreads + threadIdx.x;
  const int slot = p.token_slot[s / p.top_k];
  Meta mt{};
  if (slot >= 0 && slot < p.num_slots && e < p.num_experts) mt = load_meta(p.meta, slot);
  const bool lora = mt.gate_rank > 0 || mt.up_rank > 0;
  if (lora) {  // uniform per CTA: stage both halves' live columns
    stage_u(p, s, n, mt.gate_col, mt.gate_rank, ug);
    stage_u(p, s, n, mt.up_col, mt.up_rank, uu);
    __syncthreads();
  }
  if (i >= inter) return;
  float g = p.in[s * 2 * inter + i], u = p.in[s * 2 * inter + inter + i];
  if (lora) {
    const __nv_bfloat16* b = static_cast<const __nv_bfloat16*>(p.b) +
                             ((int64_t(slot) * p.num_experts + e) * 2 * inter) * p.r_max;
    if (mt.gate_rank > 0) g += dot_b(b + int64_t(i) * p.r_max, ug, mt.gate_rank);
    if (mt.up_rank > 0) u += dot_b(b + int64_t(inter + i) * p.r_max, uu, mt.up_rank);
  }
  static_cast<__nv_bfloat16*>(p.out)[s * inter + i] = __float2bfloat16_rn(detail::silu_mul(g, u));
}

// grid: (tokens, ceil(H / kThreads)). One output column of one token per thread; the token's
// k rows are added in j order (then the shared expert), as moe_reduce does.
__global__ void __launch_bounds__(kThreads) moe_lora_reduce_kernel(const MoeLoraFusedArgs p) {
  extern __shared__ float ud[];  // [top_k][r_max]
  detail::pdl_wait();
  detail::pdl_trigger();
  const int64_t t = blockIdx.x, n = p.m * p.top_k;
  const int hidden = p.width;
  const int col = blockIdx.y * kThreads + threadIdx.x;
  const int slot = p.token_slot[t];
  Meta mt{};
  if (slot >= 0 && slot < p.num_slots) mt = load_meta(p.meta, slot);
  const int rank = mt.down_rank;
  if (rank > 0) {
    for (int j = 0; j < p.top_k; ++j) stage_u(p, t * p.top_k + j, n, 0, rank, ud + j * p.r_max);
    __syncthreads();
  }
  if (col >= hidden) return;
  // The first 8 ranks of each slot's B row, all in flight together (top_k <= kMaxTopK).
  uint4 b0[kMaxTopK];
  const bool prefetch = rank > 0 && p.top_k <= kMaxTopK;
  if (prefetch) {
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) {
      const int e = j < p.top_k ? p.ids[t * p.top_k + j] : -1;
      if (e >= 0 && e < p.num_experts)
        b0[j] = *reinterpret_cast<const uint4*>(
            static_cast<const __nv_bfloat16*>(p.b) +
            ((int64_t(slot) * p.num_experts + e) * hidden + col) * p.r_max);
    }
  }
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    if (j >= p.top_k) break;
    const int64_t s = t * p.top_k + j;
    const int e = p.ids[s];
    if (e < 0) continue;
    float v = p.in[s * hidden + col];
    if (rank > 0 && e < p.num_experts) {
      const __nv_bfloat16* b = static_cast<const __nv_bfloat16*>(p.b) +
                               ((int64_t(slot) * p.num_experts + e) * hidden + col) * p.r_max;
      const float* u = ud + j * p.r_max;
      float d = 0.f;
      int r0 = 0;
      if (prefetch) {
        const __nv_bfloat162* q = reinterpret_cast<const __nv_bfloat162*>(&b0[j]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 f = __bfloat1622float2(q[i]);
          if (2 * i < rank) d = fmaf(f.x, u[2 * i], d);
          if (2 * i + 1 < rank) d = fmaf(f.y, u[2 * i + 1], d);
        }
        r0 = 8;
      }
      if (rank > r0) d += dot_b(b + r0, u + r0, rank - r0);
      v += p.weights[s] * d;
    }
    acc += v;
  }
  for (int j = kMaxTopK; j < p.top_k; ++j) {  // wide top-k (none of the served models)
    const int64_t s = t * p.top_k + j;
    const int e = p.ids[s];
    if (e < 0) continue;
    float v = p.in[s * hidden + col];
    if (rank > 0 && e < p.num_experts) {
      const __nv_bfloat16* b = static_cast<const __nv_bfloat16*>(p.b) +
                               ((int64_t(slot) * p.num_experts + e) * hidden + col) * p.r_max;
      v += p.weights[s] * dot_b(b, ud + j * p.r_max, rank);
    }
    acc += v;
  }
  if (p.shared_o) {
    const float gate = p.gate_logits ? 1.0f / (1.0f + expf(-p.gate_logits[t])) : 1.0f;
    acc += gate * p.shared_o[t * hidden + col];
  }
  static_cast<__nv_bfloat16*>(p.out)[t * hidden + col] = __float2bfloat16_rn(acc);
}

}  // namespace

cudaError_t launch_moe_lora_activation(const MoeLoraFusedArgs& p, cudaStream_t stream) {
  const int64_t n = p.m * p.top_k;
  if (n == 0) return cudaSuccess;
  if (p.ldu > kMaxU || p.r_max % 8 != 0 || n > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(n), unsigned((p.width + kThreads - 1) / kThreads));
  return detail::launch_pdl(moe_lora_activation_kernel, grid, dim3(kThreads), 0, stream, p);
}

cudaError_t launch_moe_lora_reduce(const MoeLoraFusedArgs& p, cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  if (p.r_max % 8 != 0 || p.m > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(p.m), unsigned((p.width + kThreads - 1) / kThreads));
  const size_t smem = size_t(p.top_k) * p.r_max * sizeof(float);
  return detail::launch_pdl(moe_lora_reduce_kernel, grid, dim3(kThreads), smem, stream, p);
}

}  // namespace moelora::cuda
