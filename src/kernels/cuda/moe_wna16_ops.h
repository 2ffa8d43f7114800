// int4 / int8 expert GEMM ops of cuda_wna16 (host-callable, no CUDA headers). Same contracts
// as moe_gemm1 / moe_gemm2 / moe_gemm1_activation of kernels/moe_ops.inc and
// moe_gemm_config.h, with the weights a packed int4/int8 stack (quant/experts_wna16.cpp)
// dequantized in registers. Each validates the stack (format, logical vs packed sizes, group
// size) and throws naming the tensor.
#pragma once

#include <string>

#include "moelora/core/stream.h"
#include "moelora/moe/types.h"

namespace moelora::cuda {

// h f32 [M*k, N] = x[s / top_k] . dequant(w13[g])^T for each aligned slot s of group g.
void moe_gemm1_wna16(const Tensor& x, int top_k, const MoeAlignment& plan,
                     const ExpertMatrices& w13, Tensor& h, const Stream& stream);
// o f32 [M*k, H] = slot_weights[s] * (a[s] . dequant(w2[g])^T).
void moe_gemm2_wna16(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                     const Tensor& slot_weights, Tensor& o, const Stream& stream);
// moe_gemm1_wna16 then moe_activation without h: a bf16 [M*k, N/2], bit-identical to the two
// ops. Needs N/2 to be a multiple of 16 (moe_wna16_fused_supported).
void moe_gemm1_activation_wna16(const Tensor& x, int top_k, const MoeAlignment& plan,
                                const ExpertMatrices& w13, Tensor& a, const Stream& stream);
bool moe_wna16_fused_supported(const ExpertMatrices& w13);
// moe_gemm2_wna16 streaming weights before it waits on its predecessor: only when the plan was
// complete before the kernel right before this one started (MoeGemmArgs::plan_ready).
void moe_gemm2_wna16_plan_ready(const Tensor& a, const MoeAlignment& plan,
                                const ExpertMatrices& w2, const Tensor& slot_weights, Tensor& o,
                                const Stream& stream);

// Whether the kernels can run a stack of `bits` with group size `group_k` over reduction K;
// the reason (and what can run it instead) in `why` when not.
bool moe_wna16_group_supported(int bits, int64_t group_k, int64_t k, std::string* why);

}  // namespace moelora::cuda
