#include "moelora/moe/runner.h"

namespace moelora {

MoeRunner::MoeRunner(const MoeRunnerConfig& config) : config_(config) {
  const MoeShape& s = config_.shape;
  s.validate();
  config_.router.validate();
  MOELORA_CHECK(config_.router.num_experts == s.num_experts && config_.router.top_k == s.top_k,
                "MoeRunner: router has E={}, top_k={} but shape '{}' has E={}, top_k={}",
                config_.router.num_experts, config_.router.top_k, s.name, s.num_experts, s.top_k);
  MOELORA_CHECK(config_.max_tokens > 0, "MoeRunner: max_tokens must be > 0, found {}",
                config_.max_tokens);

  MoeProblem problem{s, config_.format, DType::bf16, config_.device, config_.max_tokens};
  backend_ = config_.backend.empty() ? pick_moe_backend(problem)
                                     : make_moe_backend(config_.backend, problem);

  const Device d = config_.device;
  const int64_t M = config_.max_tokens, k = s.top_k, H = s.hidden, I = s.inter;
  topk_.ids = Tensor::empty({M, k}, DType::i32, d);
  topk_.weights = Tensor::empty({M, k}, DType::f32, d);
  plan_ = MoeAlignment::allocate(M * k, s.num_experts, kMaxBlockM, d);
  h_ = Tensor::empty({M * k, 2 * I}, DType::f32, d);
  a_ = Tensor::empty({M * k, I}, DType::bf16, d);
  o_ = Tensor::empty({M * k, H}, DType::f32, d);
  if (s.shared_inter > 0) {
    const int64_t Is = s.shared_inter;
    shared_ids_ = Tensor::zeros({M, 1}, DType::i32, d);  // every token to group 0
    shared_plan_ = MoeAlignment::allocate(M, 1, kMaxBlockM, d);
    shared_h_ = Tensor::empty({M, 2 * Is}, DType::f32, d);
    shared_a_ = Tensor::empty({M, Is}, DType::bf16, d);
    shared_o_ = Tensor::empty({M, H}, DType::f32, d);
  }
}

void MoeRunner::run(const MoeInputs& in, const MoeWeights& w, MoeHooks* hooks, Tensor& y,
                    const Stream& stream) {
  const MoeShape& s = config_.shape;
  const Device d = config_.device;
  check_dtype(in.x, DType::bf16, "MoE input x");
  check_device(in.x, d, "MoE input x");
  check_contiguous(in.x, "MoE input x");
  MOELORA_CHECK(in.x.dim() == 2 && in.x.size(1) == s.hidden,
                "MoE input x: expected [M, {}], found {}", s.hidden, in.x.describe());
  const int64_t m = in.x.size(0);
  MOELORA_CHECK(m >= 1 && m <= config_.max_tokens,
                "MoE input x: {} tokens, the runner was sized for 1..{}", m, config_.max_tokens);
  check_dtype(in.router_logits, DType::f32, "MoE router_logits");
  check_device(in.router_logits, d, "MoE router_logits");
  check_shape(in.router_logits, {m, s.num_experts}, "MoE router_logits");
  check_dtype(y, DType::bf16, "MoE output y");
  check_device(y, d, "MoE output y");
  check_shape(y, {m, s.hidden}, "MoE output y");
  if (s.shared_gate) {
    check_dtype(in.shared_gate_logits, DType::f32, "MoE shared_gate_logits");
    check_device(in.shared_gate_logits, d, "MoE shared_gate_logits");
    check_shape(in.shared_gate_logits, {m}, "MoE shared_gate_logits");
  }
  MOELORA_CHECK(w.format == config_.format,
                "MoE weights: format {}, but the runner was built for {} (backend '{}')",
                format_name(w.format), format_name(config_.format), backend_->name());
  MOELORA_CHECK(w.w13.defined() && w.w2.defined(), "MoE weights: w13 and w2 must be given");
  check_device(w.w13.w, d, "MoE weights w13 (gate_up)");
  check_device(w.w2.w, d, "MoE weights w2 (down)");
  MOELORA_CHECK(!config_.router.use_correction_bias || w.correction_bias.defined(),
                "MoE weights: the router uses e_score_correction_bias but none was given");

  const int64_t slots = m * s.top_k;
  topk_view_.ids = topk_.ids.first_rows(m);
  topk_view_.weights = topk_.weights.first_rows(m);
  // Decode-sized batches with no seams: the whole layer in one call when the backend can
  // (the plan, h, a and o are then left unwritten; topk is written as route writes it).
  if (!hooks && m <= config_.small_batch_max_tokens &&
      backend_->small_batch_layer(in, w, s, config_.router, topk_view_, y, stream))
    return;
  plan_.block_m = backend_->block_m(m, s);
  // Inline LoRA (the hooks' deltas computed inside the expert GEMM grids): no seam needs the
  // routing before the alignment, so route and align may fuse as without hooks.
  const MoeLoraInlineSeams* inline_lora =
      hooks && backend_->runs_inline_lora() ? hooks->inline_lora(topk_view_, m) : nullptr;
  if (hooks && !inline_lora) {
    // The hooks fork their side stream (LoRA grouping) right after routing, before the
    // alignment: moving the fork past a fused route+align measured 1-2 % slower with LoRA.
    backend_->route(in.router_logits, w.correction_bias, config_.router, topk_view_, stream);
    hooks->after_route(topk_view_, m, stream);
    backend_->align(topk_view_.ids, plan_, stream);
  } else {
    backend_->route_align(in.router_logits, w.correction_bias, config_.router, topk_view_, plan_,
                          stream);
  }

  Tensor h = h_.first_rows(slots), a = a_.first_rows(slots), o = o_.first_rows(slots);
  const Tensor slot_weights = topk_view_.weights.view({slots});
  const bool fused_reduce = hooks && (inline_lora || hooks->fuses_reduce(m));
  if (inline_lora) {
    MOELORA_CHECK(hooks->fuses_activation(m) && hooks->fuses_reduce(m),
                  "MoE hooks: inline LoRA for {} tokens needs the fused activation and "
                  "reduction seams (fuses_activation / fuses_reduce)",
                  m);
    backend_->gemm1_lora(in.x, s.top_k, plan_, w.w13, inline_lora->gate_up, h, stream);
    hooks->gate_up_activation(in.x, topk_view_, h, a, stream);
    backend_->gemm2_lora(a, plan_, w.w2, slot_weights, inline_lora->down, o, stream);
  } else if (hooks) {
    hooks->before_gate_up(in.x, topk_view_, stream);
    backend_->gemm1(in.x, s.top_k, plan_, w.w13, h, stream);
    if (hooks->fuses_activation(m)) {
      hooks->gate_up_activation(in.x, topk_view_, h, a, stream);
    } else {
      hooks->after_gate_up(in.x, topk_view_, h, stream);
      backend_->activation(h, topk_view_.ids, a, stream);
    }
    hooks->before_down(a, topk_view_, stream);
    backend_->gemm2(a, plan_, w.w2, slot_weights, o, stream);
    if (!fused_reduce) hooks->after_down(a, topk_view_, o, stream);
  } else {
    // No seams to honour: the backend may fuse (same o bit for bit, see MoeBackend).
    backend_->expert_mlp(in.x, s.top_k, topk_view_.ids, plan_, w.w13, w.w2, slot_weights, h, a, o,
                         stream);
  }

  Tensor shared_o;
  if (s.shared_inter > 0) {
    Tensor ids = shared_ids_.first_rows(m);
    shared_plan_.block_m = backend_->block_m(m, s);
    backend_->align(ids, shared_plan_, stream);
    Tensor sh = shared_h_.first_rows(m), sa = shared_a_.first_rows(m);
    shared_o = shared_o_.first_rows(m);
    // The shared expert has no LoRA seams.
    backend_->expert_mlp(in.x, 1, ids, shared_plan_, w.shared_w13, w.shared_w2, Tensor(), sh, sa,
                         shared_o, stream);
  }
  const Tensor gate_logits = s.shared_gate ? in.shared_gate_logits : Tensor();
  if (fused_reduce)
    hooks->down_reduce(a, topk_view_, o, shared_o, gate_logits, y, stream);
  else
    backend_->reduce(o, topk_view_.ids, shared_o, gate_logits, y, stream);
}

}  // namespace moelora
