// fp8 block-scale expert GEMM ops on CUDA (host-callable, no CUDA headers). Same contracts as
// moe_gemm1 / moe_gemm2 (kernels/moe_ops.inc) with the weights an fp8_block ExpertMatrices
// (layout: src/quant/experts_fp8.cpp): bf16 activations in, quantized per row and 128
// channels exactly as quant::quantize_fp8_activation does (a small kernel, once per input row,
// into a caller-owned Fp8ActBuffer), e4m3 tensor cores, per-block f32 promotion with
// w_scale * x_scale.
#pragma once

#include <string>

#include "kernels/cuda/moe_gemm_config.h"
#include "moelora/core/stream.h"
#include "moelora/moe/lora_inline.h"
#include "moelora/moe/types.h"

namespace moelora::cuda {

// Storage for a GEMM input's fp8 copy (ops never allocate): codes f8_e4m3 and f32 scales, 1-D,
// used as [rows, K] and [rows, ceil(K / 128)] from their start. One buffer serves the GEMMs of
// a stream one after another (each op rewrites it before its GEMM reads it).
struct Fp8ActBuffer {
  Tensor q;
  Tensor scale;
  static Fp8ActBuffer allocate(int64_t rows, int64_t k, Device d);
  bool fits(int64_t rows, int64_t k) const;
};

// buf as q [M, K], scale [M, ceil(K / 128)] = quant::quantize_fp8_activation(x, 128), bit for
// bit; x bf16 [M, K] with K a multiple of 16. (The GEMM ops call it; exposed for tests.)
void fp8_quantize_act(const Tensor& x, Fp8ActBuffer& buf, const Stream& stream);

// True when the kernels run this stack: block_k 128 (the K tile), any block_n, K a multiple of
// 16 (16-byte rows of codes). Otherwise false with the reason in `why`.
bool moe_fp8_stack_supported(int64_t block_n, int64_t block_k, int64_t k, std::string* why);

// h f32 [M*k, 2I] = x[s / top_k] . w13[g]^T (w13 logical [G, 2I, H]).
// With `lora`, the grid also runs that seam's inline LoRA (moelora/moe/lora_inline.h) into
// lora->delta; h is the base GEMM's either way.
void moe_gemm1_fp8(const Tensor& x, int top_k, const MoeAlignment& plan, const ExpertMatrices& w13,
                   Tensor& h, Fp8ActBuffer& act_buf, const Stream& stream,
                   const MoeLoraInline* lora = nullptr);
// moe_gemm1_fp8 then moe_activation without materializing h: a bf16 [M*k, I].
void moe_gemm1_fp8_activation(const Tensor& x, int top_k, const MoeAlignment& plan,
                              const ExpertMatrices& w13, Tensor& a, Fp8ActBuffer& act_buf,
                              const Stream& stream);
// o f32 [M*k, H] = slot_weights[s] * (a[s] . w2[g]^T) (w2 logical [G, H, I]).
// The GEMMs always stream weights before waiting on their predecessor (MoeGemmArgs::plan_ready):
// that predecessor is the op's own quantization kernel, which lets them start only once it has
// waited for everything before it, the plan included.
void moe_gemm2_fp8(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                   const Tensor& slot_weights, Tensor& o, Fp8ActBuffer& act_buf,
                   const Stream& stream, const MoeLoraInline* lora = nullptr);

// With an explicit tile (tests and benchmarks sweep them).
void moe_gemm1_fp8_tiled(const Tensor& x, int top_k, const MoeAlignment& plan,
                         const ExpertMatrices& w13, Tensor& out, bool fused_activation,
                         Fp8ActBuffer& act_buf, const Stream& stream, const MoeGemmConfig& config,
                         const MoeLoraInline* lora = nullptr);
void moe_gemm2_fp8_tiled(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                         const Tensor& slot_weights, Tensor& o, Fp8ActBuffer& act_buf,
                         const Stream& stream, const MoeGemmConfig& config,
                         const MoeLoraInline* lora = nullptr);

}  // namespace moelora::cuda
