// Tile choice for the CUDA expert GEMMs (host-only header: no CUDA includes), and the ops
// with an explicit tile so tests and benchmarks can sweep every variant.
#pragma once

#include <cstdint>

#include "moelora/core/stream.h"
#include "moelora/moe/types.h"

namespace moelora::cuda {

struct MoeGemmConfig {
  int rows = 64;    // weight rows per CTA: 32, 64 or 128
  bool pdl = true;  // programmatic dependent launch (see bench/NOTES.md)
  // The plan is older than the predecessor kernel: start streaming weights before waiting
  // on it (MoeGemmArgs::plan_ready says when that is safe; gemm2 in the MoE layer).
  bool plan_ready = false;
  // Grid order (MoeGemmArgs::row_tiles_fastest): false keeps the surplus blocks of the
  // worst-case grid interleaved with the live ones, true dispatches them last.
  bool row_tiles_fastest = false;
  // Split K across the warps of a CTA (cuda_nvfp4 only; measured slower, so off by default:
  // bench/NOTES.md "nvfp4"). Tests run both.
  bool split_k = false;
};

// Weight rows per CTA for a GEMM with `n` output columns and reduction `k`, for a plan with
// `num_slots` token-slots over `num_groups` groups in blocks of `block_m`, on `num_sms` SMs.
MoeGemmConfig moe_gemm_config(int64_t n, int64_t k, int block_m, int64_t num_slots,
                              int num_groups, int num_sms);

// moe_gemm1 / moe_gemm2 (kernels/moe_ops.inc) with the tile given instead of chosen.
void moe_gemm1_tiled(const Tensor& x, int top_k, const MoeAlignment& plan, const Tensor& w13,
                     Tensor& h, const Stream& stream, const MoeGemmConfig& config);
void moe_gemm2_tiled(const Tensor& a, const MoeAlignment& plan, const Tensor& w2,
                     const Tensor& slot_weights, Tensor& o, const Stream& stream,
                     const MoeGemmConfig& config);

// moe_gemm1 then moe_activation(h, ids, a) without materializing h, for callers with no LoRA
// seam in between: a bf16 [M*k, I] for every aligned slot (other rows untouched), bit-identical
// to the two ops. w13 [G, 2I, H].
void moe_gemm1_activation(const Tensor& x, int top_k, const MoeAlignment& plan,
                          const Tensor& w13, Tensor& a, const Stream& stream);
void moe_gemm1_activation_tiled(const Tensor& x, int top_k, const MoeAlignment& plan,
                                const Tensor& w13, Tensor& a, const Stream& stream,
                                const MoeGemmConfig& config);
// moe_gemm2 with the heuristic tile and plan_ready set: only when the plan was complete
// before the kernel right before this one started (see MoeGemmArgs::plan_ready).
void moe_gemm2_plan_ready(const Tensor& a, const MoeAlignment& plan, const Tensor& w2,
                          const Tensor& slot_weights, Tensor& o, const Stream& stream);

}  // namespace moelora::cuda
