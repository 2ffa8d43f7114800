// The one-kernel bf16 MoE layer for decode batches (internal; host-callable, no CUDA headers).
// Same y and topk as the staged CUDA path (moe_route_align -> moe_gemm1_activation ->
// moe_gemm2 -> moe_reduce, shared expert included), bit for bit; see moe_decode_layer.cu.
#pragma once

#include <string>

#include "moelora/core/stream.h"
#include "moelora/moe/types.h"

namespace moelora::cuda {

// Largest batch the kernel takes (tokens are one 8-wide MMA column tile).
inline constexpr int kMoeDecodeMaxTokens = 8;

// Scratch of one layer call (act, f32 partials, cross-CTA counters). The counters must be zero
// before the first launch (allocate() does that); each launch leaves them zero again.
struct MoeDecodeWorkspace {
  Tensor act;          // bf16 [8 * k, I]
  Tensor part;         // f32 [8 * k, H]
  Tensor shared_act;   // bf16 [8, Is] (shared expert only)
  Tensor shared_part;  // f32 [8, H]
  Tensor counters;     // i32
  bool defined() const { return counters.defined(); }
  static MoeDecodeWorkspace allocate(const MoeShape& shape, Device device);
};

// Whether the kernel can run `shape` at all (E <= 256, M * k slots, sizes); the reason in `why`.
bool moe_decode_shape_supported(const MoeShape& shape, std::string* why);
// Whether it runs this call bit-identically to the staged path: the shape, 1 <= m <= 8,
// m * k <= 64, and a staged alignment tile of at most 16 tokens (wider tiles use 64-wide K
// stages in the staged GEMM, whose zero padding of the K tail differs).
bool moe_decode_layer_supported(const MoeShape& shape, const RouterConfig& router, int64_t m,
                                std::string* why);

// y bf16 [M, H] (and topk [M, k], as moe_route writes it) for the whole layer in one launch.
// deep_prefetch: the token fragments two K stages ahead (the default), else one (the first
// version; bench/NOTES.md "One-kernel decode layer"). Throws naming the tensor when an argument
// is wrong, or when moe_decode_layer_supported is false.
void moe_decode_layer(const MoeInputs& in, const MoeWeights& w, const MoeShape& shape,
                      const RouterConfig& router, TopK& topk, MoeDecodeWorkspace& ws, Tensor& y,
                      const Stream& stream, bool deep_prefetch = true);

}  // namespace moelora::cuda
