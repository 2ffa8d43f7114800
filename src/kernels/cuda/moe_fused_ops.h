// CUDA-only ops that fuse two contract ops into one launch for the decode path (internal;
// host-callable, no CUDA headers). Each gives exactly the results of the ops it replaces.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/moe/types.h"

namespace moelora::cuda {

// moe_route(logits, ...) then moe_align(topk.ids, plan): one kernel for up to 64 tokens (when
// plan.num_groups == cfg.num_experts), the two ops otherwise. plan.block_m set by the caller.
void moe_route_align(const Tensor& logits, const Tensor& correction_bias,
                     const RouterConfig& cfg, TopK& topk, MoeAlignment& plan,
                     const Stream& stream);

// moe_lora_group_ids(ids, token_slot, num_experts, vids) then moe_align(vids, vplan), without
// materializing vids. Virtual ids outside [0, vplan.num_groups) are skipped.
void moe_lora_align(const Tensor& ids, const Tensor& token_slot, int num_experts,
                    MoeAlignment& vplan, const Stream& stream);

// Argument checks of moe_route (shared with the fused op).
void check_route_args(const Tensor& logits, const Tensor& correction_bias,
                      const RouterConfig& cfg, const TopK& topk);

}  // namespace moelora::cuda
