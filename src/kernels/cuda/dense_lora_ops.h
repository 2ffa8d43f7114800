// CUDA dense LoRA ops (host-callable, no CUDA headers): same signatures as the CPU ones.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/lora/dense_lora.h"

#include <vector>

namespace moelora::cuda {
#include "kernels/dense_lora_ops.inc"

// The fast decode path's folded expands (CUDA only). y' = y + the LoRA delta of each token
// with an adapter, exactly as dense_lora_expand would leave y (y itself is not changed; u,
// token_slot, B and ranks may all be undefined: no LoRA, y' = y), then
//  - split: outs[s] f32 [M, width_s] = y'[:, slice s] (the fused q/k/v projection's split;
//    one output per slice);
//  - residual: x f32 [M, N] += y'.
// One kernel either way: the expand costs the fast path no launch of its own.
void dense_lora_expand_split(const Tensor& y, const Tensor& u, const Tensor& token_slot,
                             const Tensor& B, const Tensor& ranks, const DenseLoraSlices& slices,
                             const std::vector<Tensor*>& outs, const Stream& stream);
void dense_lora_expand_residual(const Tensor& y, const Tensor& u, const Tensor& token_slot,
                                const Tensor& B, const Tensor& ranks, const DenseLoraSlices& slices,
                                Tensor& x, const Stream& stream);
}  // namespace moelora::cuda
