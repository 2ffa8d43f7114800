// NVFP4 expert GEMM ops on CUDA (cuda_nvfp4): the contracts of moe_gemm1 / moe_gemm2 in
// kernels/moe_ops.inc with the weights an nvfp4 ExpertMatrices (src/quant/experts_nvfp4.cpp).
// Host-callable, no CUDA headers.
#pragma once

#include "kernels/cuda/moe_gemm_config.h"
#include "moelora/core/stream.h"
#include "moelora/moe/types.h"

namespace moelora::cuda {

// h f32 [M*k, 2I] = x[slot / k] . w13[group]^T for every aligned slot.
void moe_gemm1_nvfp4(const Tensor& x, int top_k, const MoeAlignment& plan,
                     const ExpertMatrices& w13, Tensor& h, const Stream& stream);
// moe_gemm1_nvfp4 then moe_activation without h: a bf16 [M*k, I], bit-identical to the two
// ops. Needs I a multiple of 16 (moe_gemm1_nvfp4_fusable).
void moe_gemm1_activation_nvfp4(const Tensor& x, int top_k, const MoeAlignment& plan,
                                const ExpertMatrices& w13, Tensor& a, const Stream& stream);
bool moe_gemm1_nvfp4_fusable(const ExpertMatrices& w13);
// o f32 [M*k, H] = slot_weights[s] * (a[s] . w2[group]^T); `plan_ready` as MoeGemmConfig's.
void moe_gemm2_nvfp4(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                     const Tensor& slot_weights, Tensor& o, const Stream& stream,
                     bool plan_ready = false);

// With the tile given (tests and benchmarks sweep it).
void moe_gemm1_nvfp4_tiled(const Tensor& x, int top_k, const MoeAlignment& plan,
                           const ExpertMatrices& w13, Tensor& out, const Stream& stream,
                           const MoeGemmConfig& config, bool fuse_activation);
void moe_gemm2_nvfp4_tiled(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                           const Tensor& slot_weights, Tensor& o, const Stream& stream,
                           const MoeGemmConfig& config);

}  // namespace moelora::cuda
