// MoeRunner: one MoE layer forward with LoRA seams.
//
//   topk = route(router_logits)   ; hooks.after_route(topk)
//   plan = align(topk)            ; hooks.before_gate_up(x)
//   h = gemm1(x, plan)            ; hooks.after_gate_up(h)
//   a = silu(gate) * up           ; hooks.before_down(a)
//   o = gemm2(a, plan) * routed w ; hooks.after_down(o)
//   y = sum over top-k (+ shared expert)
// The before_* seams let LoRA start its shrink beside the base GEMM (side stream). When the
// backend runs inline LoRA and the hooks ask for it (MoeHooks::inline_lora), the seams give way
// to  topk, plan = route_align; h = gemm1_lora (its grid also writes the gate_up delta);
// a = hooks.gate_up_activation; o = gemm2_lora (+ down delta); y = hooks.down_reduce.
#pragma once

#include <memory>
#include <string>

#include "moelora/lora/moe_lora.h"
#include "moelora/moe/backend.h"

namespace moelora {

struct MoeRunnerConfig {
  MoeShape shape;
  RouterConfig router;
  Device device;
  int64_t max_tokens = 256;
  WeightFormat format = WeightFormat::bf16;
  std::string backend;  // empty: pick the best backend for the device by capability
  // Batches up to this many tokens with no hooks run MoeBackend::small_batch_layer (one kernel
  // on cuda_bf16, bit-identical to the stages) when the backend takes them; 0 = always the
  // staged path. Off by default: on H100 the one-kernel layer still measures slower than the
  // stages (bench/NOTES.md "One-kernel decode layer").
  int64_t small_batch_max_tokens = 0;
};

class MoeRunner {
 public:
  // Picks the backend and allocates every buffer for up to max_tokens tokens.
  explicit MoeRunner(const MoeRunnerConfig& config);

  // y bf16 [M, H]. `hooks` may be null (no LoRA). Allocation-free (graph-capturable on CUDA).
  void run(const MoeInputs& in, const MoeWeights& w, MoeHooks* hooks, Tensor& y,
           const Stream& stream);

  const MoeBackend& backend() const { return *backend_; }
  const MoeRunnerConfig& config() const { return config_; }
  // Results of the last run's stages, first M rows valid (for tests and debugging).
  const TopK& last_topk() const { return topk_view_; }
  const MoeAlignment& last_plan() const { return plan_; }

 private:
  MoeRunnerConfig config_;
  std::unique_ptr<MoeBackend> backend_;
  TopK topk_, topk_view_;
  MoeAlignment plan_;
  Tensor h_, a_, o_;
  // Shared expert: a fixed one-group plan over all tokens.
  MoeAlignment shared_plan_;
  Tensor shared_ids_, shared_h_, shared_a_, shared_o_;
};

}  // namespace moelora
