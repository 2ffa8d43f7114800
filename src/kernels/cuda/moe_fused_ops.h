// CUDA-only ops that fuse two contract ops into one launch for the decode path (internal;
// host-callable, no CUDA headers). Each gives exactly the results of the ops it replaces.
#pragma once

#include <string>

#include "moelora/core/stream.h"
#include "moelora/moe/types.h"

namespace moelora::cuda {

// moe_route(logits, ...) then moe_align(topk.ids, plan): one kernel for up to 64 tokens (when
// plan.num_groups == cfg.num_experts), the two ops otherwise. plan.block_m set by the caller.
void moe_route_align(const Tensor& logits, const Tensor& correction_bias, const RouterConfig& cfg,
                     TopK& topk, MoeAlignment& plan, const Stream& stream);

// moe_lora_group_ids(ids, token_slot, num_experts, vids) then moe_align(vids, vplan), without
// materializing vids. Virtual ids outside [0, vplan.num_groups) are skipped.
void moe_lora_align(const Tensor& ids, const Tensor& token_slot, int num_experts,
                    MoeAlignment& vplan, const Stream& stream);

// K-split LoRA shrink/expand for the hook path: shrink writes `splits` partial sums
// (u f32 [splits * M*k, R], partial p of slot s in row p * M*k + s), expand sums them while
// staging. splits == 1 is exactly moe_lora_shrink / moe_lora_expand.
inline constexpr int kMaxLoraSplits = 8;  // = detail::kMaxSplits (moe_lora.cuh)
void moe_lora_shrink_split(const Tensor& in, int rows_div, const MoeAlignment& vplan,
                           const Tensor& A, const Tensor& meta, LoraSeam seam, int splits,
                           Tensor& u, const Stream& stream);
void moe_lora_expand_split(const Tensor& u, int splits, const MoeAlignment& vplan, const Tensor& B,
                           const Tensor& meta, LoraSeam seam, const Tensor& slot_weights,
                           Tensor& out, const Stream& stream);
// Splits the hooks use for `num_slots` token-slots (1..kMaxLoraSplits).
int moe_lora_shrink_splits(int64_t num_slots);
// The hooks' optional "delta" variant (off by default: measured slower, bench/NOTES.md): the
// whole LoRA delta is computed on the side stream into d, and the main stream only adds it.
// d [M*k, N] f32: d[s] = w[s] * (B . u)[s] for every slot the plan aligns (zeros where the
// adapter lacks the seam); other rows untouched. Needs moe_lora_delta_supported.
void moe_lora_expand_delta_split(const Tensor& u, int splits, const MoeAlignment& vplan,
                                 const Tensor& B, const Tensor& meta, LoraSeam seam,
                                 const Tensor& slot_weights, Tensor& d, const Stream& stream);
// out[s] += d[s] for the slots moe_lora_align aligns (token_slot[s / k] in [0, num_lora_slots),
// expert in [0, num_experts)); every other row of out is untouched.
void moe_lora_add_delta(const Tensor& d, const Tensor& ids, const Tensor& token_slot,
                        int num_lora_slots, int num_experts, Tensor& out, const Stream& stream);
bool moe_lora_delta_supported(int64_t hidden, int64_t inter, int r_max);
// Rows of u a hook workspace needs for up to `max_slots` slots at any split.
inline int64_t moe_lora_split_rows(int64_t max_slots) {
  return max_slots > 512 ? max_slots : 512;
}

// The LoRA expands folded into the elementwise passes (the hooks' fused path; see
// moe_lora_fused.cu). u13 / u2: the K-split shrink partials (as moe_lora_shrink_split wrote
// them, `splits` partials); B13 / B2 and meta: the pool's. Base slots get exactly
// moe_activation / moe_reduce.
// a bf16 [M*k, I] = silu(h_gate + dg) * (h_up + du) for slots with ids >= 0.
void moe_lora_activation(const Tensor& h, const Tensor& ids, const Tensor& token_slot,
                         const Tensor& u13, int splits, const Tensor& B13, const Tensor& meta,
                         Tensor& a, const Stream& stream);
// y bf16 [M, H] = sum_j (o[t*k+j] + w[t*k+j] * B2 . u2[t*k+j]) (+ gate * shared_o[t]).
void moe_lora_reduce(const Tensor& o, const Tensor& ids, const Tensor& token_slot,
                     const Tensor& slot_weights, const Tensor& u2, int splits, const Tensor& B2,
                     const Tensor& meta, const Tensor& shared_o, const Tensor& shared_gate_logits,
                     Tensor& y, const Stream& stream);

// The hooks' overlap variant: both LoRA deltas are computed on the side stream beside the
// expert GEMMs (moe_lora_expand_delta_split into d13 / d2) and added here, inside passes that
// run anyway. Rows of slots whose token has an adapter (token_slot[s / k] in
// [0, num_lora_slots)) and a valid expert get d added: to h before SiLU * up, and to o before
// the top-k sum; every other slot gets exactly moe_activation / moe_reduce. d is f32 [M*k, N],
// or [splits, M*k, N] partial deltas (the inline variant's K slices) summed in order first.
void moe_activation_lora_delta(const Tensor& h, const Tensor& ids, const Tensor& token_slot,
                               int num_lora_slots, int num_experts, const Tensor& d13, Tensor& a,
                               const Stream& stream);
void moe_reduce_lora_delta(const Tensor& o, const Tensor& ids, const Tensor& token_slot,
                           int num_lora_slots, int num_experts, const Tensor& d2,
                           const Tensor& shared_o, const Tensor& shared_gate_logits, Tensor& y,
                           const Stream& stream);

// The hooks' direct variant (moe_lora_direct.cu): one kernel computes a seam's whole LoRA
// delta from the routing, with no (adapter, expert) alignment and no u in global memory.
// d f32 [M*k, N]: d[s] = w[s] * B . (A . in[s / rows_div]) for every slot s whose token has an
// adapter (token_slot[s / k] in [0, S)) and whose expert is valid (zeros where the adapter
// lacks the seam); other rows untouched. gate_up: in = x [M, H], rows_div = k, A13 / B13;
// down: in = the activation [M*k, I], rows_div = 1, A2 / B2, slot_weights = the routed
// weights [M*k]. cluster_size: CTAs per (adapter, expert) pair (2, 4 or 8), splitting K for
// the shrink and N for the expand; max_clusters bounds the grid (clusters loop over pairs).
void moe_lora_direct(const Tensor& in, int rows_div, const Tensor& ids, const Tensor& token_slot,
                     const Tensor& A, const Tensor& B, const Tensor& meta, LoraSeam seam,
                     const Tensor& slot_weights, Tensor& d, int cluster_size, int max_clusters,
                     const Stream& stream);
// Why the direct variant cannot run a pool of `num_slots` x r_max at `max_slots` token-slots
// (M*k) with this MoE shape; empty when it can.
std::string moe_lora_direct_unsupported(int64_t hidden, int64_t inter, int num_experts,
                                        int num_slots, int r_max, int64_t max_slots);

// Argument checks of moe_route (shared with the fused op).
void check_route_args(const Tensor& logits, const Tensor& correction_bias, const RouterConfig& cfg,
                      const TopK& topk);

}  // namespace moelora::cuda
