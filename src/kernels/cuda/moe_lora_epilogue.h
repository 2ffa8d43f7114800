// The bf16 expert GEMMs with the LoRA expand fused into their epilogue (CUDA-only ops for the
// fast LoRA path; host-callable, no CUDA headers). Same contracts as moe_gemm1 /
// moe_gemm1_activation / moe_gemm2 (kernels/moe_ops.inc) plus, for each aligned slot s whose
// token carries an adapter a = token_slot[s / top_k] in [0, S), the LoRA delta of the seam:
//   gate_up row i: + sum_{r < rank(i)} B13[a, g, i, r] * u13[s, col(i) + r]
//     (before the activation; gate rows use (gate_rank, gate_col), up rows (up_rank, up_col))
//   down row i:    + sum_{r < down_rank} B2[a, g, i, r] * u2[s, r]   (before the routed weight:
//     o = (acc + delta) * w, where the hook path computes acc * w + w * delta: same value up to
//     rounding)
// u is what moe_lora_shrink_split writes (`splits` K-split partials, summed here in split
// order). Slots of base tokens (and adapters without this seam) get exactly the LoRA-off op's
// values, bit for bit.
#pragma once

#include "kernels/cuda/moe_gemm_config.h"
#include "moelora/core/stream.h"
#include "moelora/moe/lora_epilogue.h"
#include "moelora/moe/types.h"

namespace moelora::cuda {

// token_slot i32 [M]; u f32 [splits * M*k, ldu] with ldu >= 2*r_max (gate_up) or r_max (down),
// a multiple of 4; splits 1..kMaxLoraSplits; b bf16 [S, E, N, r_max] (the pool's b13 or b2),
// r_max % 8 == 0; meta i32 [S, 6].
using MoeGemmLora = ::moelora::MoeLoraEpilogue;

// a bf16 [M*k, I] = silu(gate + dg) * (up + du) for every aligned slot; w13 bf16 [E, 2I, H].
void moe_gemm1_activation_lora(const Tensor& x, int top_k, const MoeAlignment& plan,
                               const Tensor& w13, const MoeGemmLora& lora, Tensor& a,
                               const Stream& stream);
void moe_gemm1_activation_lora_tiled(const Tensor& x, int top_k, const MoeAlignment& plan,
                                     const Tensor& w13, const MoeGemmLora& lora, Tensor& a,
                                     const Stream& stream, const MoeGemmConfig& config);
// h f32 [M*k, 2I] = x . w13^T + delta (the staged variant, for tests and other activations).
void moe_gemm1_lora_tiled(const Tensor& x, int top_k, const MoeAlignment& plan,
                          const Tensor& w13, const MoeGemmLora& lora, Tensor& h,
                          const Stream& stream, const MoeGemmConfig& config);
// o f32 [M*k, H] = (a . w2^T + delta) * slot_weights for every aligned slot; `top_k` maps a
// slot to its token (s / top_k). plan_ready as in moe_gemm2_plan_ready.
void moe_gemm2_lora(const Tensor& a, int top_k, const MoeAlignment& plan, const Tensor& w2,
                    const Tensor& slot_weights, const MoeGemmLora& lora, Tensor& o,
                    const Stream& stream, bool plan_ready = false);
void moe_gemm2_lora_tiled(const Tensor& a, int top_k, const MoeAlignment& plan,
                          const Tensor& w2, const Tensor& slot_weights, const MoeGemmLora& lora,
                          Tensor& o, const Stream& stream, const MoeGemmConfig& config);

// The fast path's shrink: moe_lora_shrink_split's contract (u f32 [splits * M*k, R], partial
// p of slot s in row p * M*k + s; columns past a slot's rank not written), a kernel shape with
// more CTAs per SM and rank tiles sized to A's rows. Meant for a vplan aligned with
// moe_lora_stream_block_m, so that each (adapter, expert) pair's A is read once.
void moe_lora_shrink_stream(const Tensor& in, int rows_div, const MoeAlignment& vplan,
                            const Tensor& A, const Tensor& meta, LoraSeam seam, int splits,
                            Tensor& u, const Stream& stream);
// vplan block_m for the fast path: a pair's slots fit one block at decode sizes.
int moe_lora_stream_block_m(int64_t num_tokens, int top_k, int num_experts);
// K splits of the fast path's shrink for a batch of `num_tokens` (1..kMaxLoraSplits).
int moe_lora_stream_splits(int64_t num_tokens, int top_k, int num_experts);

}  // namespace moelora::cuda
