// Ops (layer 3) for CUDA routing and alignment: validate Tensors, call the launchers.
// Device-resident ids cannot be range-checked without a host sync: the kernels treat ids
// outside [0, G) as "not here" and never write out of bounds.
#include "core/cuda_check.h"
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_op_checks.h"
#include "kernels/cuda/moe_ops.h"
#include "kernels/cuda/moe_ops_launch.h"

namespace moelora::cuda {
namespace {

detail::RouteParams route_params(const RouterConfig& cfg) {
  detail::RouteParams p;
  p.num_experts = cfg.num_experts;
  p.top_k = cfg.top_k;
  p.n_group = cfg.n_group;
  p.topk_group = cfg.topk_group;
  p.sigmoid = cfg.scoring == ScoringFunc::sigmoid;
  p.top2_sum = cfg.group_score == GroupScore::top2_sum;
  p.renormalize = cfg.renormalize;
  p.use_bias = cfg.use_correction_bias;
  p.scale = cfg.routed_scaling_factor;
  return p;
}

// Validates `plan` for `n` slots on `device` and returns the kernel's view of it.
detail::AlignOut check_plan(MoeAlignment& plan, int64_t n, Device device, const char* op) {
  MOELORA_CHECK(plan.num_groups >= 1, "{}: plan.num_groups must be >= 1, found {}", op,
                plan.num_groups);
  MOELORA_CHECK(plan.block_m >= 1 && plan.block_m <= kMaxBlockM,
                "{}: plan.block_m must be in [1, {}], found {}", op, kMaxBlockM, plan.block_m);
  MOELORA_CHECK(n >= 1 && n < 65536, "{}: {} token-slots; the CUDA aligner takes 1..65535", op,
                n);
  check_cuda_tensor(plan.sorted_slots, DType::i32, "alignment plan sorted_slots");
  check_cuda_tensor(plan.block_group, DType::i32, "alignment plan block_group");
  check_cuda_tensor(plan.num_padded, DType::i32, "alignment plan num_padded");
  check_cuda_tensor(plan.group_offsets, DType::i32, "alignment plan group_offsets");
  for (const Tensor* t :
       {&plan.sorted_slots, &plan.block_group, &plan.num_padded, &plan.group_offsets})
    MOELORA_CHECK(t->device() == device, "{}: plan tensor {} is not on {}", op, t->describe(),
                  device.str());
  const int64_t cap = MoeAlignment::capacity(n, plan.num_groups, plan.block_m);
  MOELORA_CHECK(plan.sorted_slots.numel() >= cap,
                "{}: plan.sorted_slots holds {} entries; {} slots in {} groups at block_m={} may "
                "need {}",
                op, plan.sorted_slots.numel(), n, plan.num_groups, plan.block_m, cap);
  MOELORA_CHECK(plan.block_group.numel() >= cap / plan.block_m,
                "{}: plan.block_group holds {} entries, expected >= {}", op,
                plan.block_group.numel(), cap / plan.block_m);
  MOELORA_CHECK(plan.num_padded.numel() == 1, "{}: plan.num_padded: expected [1], found {}", op,
                plan.num_padded.describe());
  MOELORA_CHECK(plan.group_offsets.numel() >= int64_t(plan.num_groups) + 1,
                "{}: plan.group_offsets: expected >= {} entries, found {}", op,
                int64_t(plan.num_groups) + 1, plan.group_offsets.describe());
  MOELORA_CHECK(detail::align_smem_bytes(plan.num_groups, 1) <= detail::kAlignSmemLimit,
                "{}: {} groups exceed what the CUDA aligner holds in shared memory (at most {})",
                op, plan.num_groups, (detail::kAlignSmemLimit - 4) / 10);
  detail::AlignOut o{};
  o.sorted_slots = plan.sorted_slots.data<int32_t>();
  o.block_group = plan.block_group.data<int32_t>();
  o.num_padded = plan.num_padded.data<int32_t>();
  o.group_offsets = plan.group_offsets.data<int32_t>();
  o.num_slots = int(n);
  o.num_groups = plan.num_groups;
  o.block_m = plan.block_m;
  o.fill_blocks = int(cap / plan.block_m);
  return o;
}

void check_ids(const Tensor& ids, const char* what) {
  check_cuda_tensor(ids, DType::i32, what);
  MOELORA_CHECK(ids.dim() == 2 && ids.size(0) >= 1 && ids.size(1) >= 1,
                "{}: expected [M, k] with M, k >= 1, found {}", what, ids.describe());
}

}  // namespace

void check_route_args(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg,
                      const TopK& topk) {
  cfg.validate();
  check_cuda_tensor(logits, DType::f32, "moe_route logits");
  MOELORA_CHECK(logits.dim() == 2 && logits.size(1) == cfg.num_experts,
                "moe_route logits: expected [M, {}], found {}", cfg.num_experts,
                logits.describe());
  const int64_t m = logits.size(0);
  MOELORA_CHECK(m >= 1 && m <= (int64_t(1) << 30),
                "moe_route logits: expected 1.. tokens, found {}", logits.describe());
  check_cuda_tensor(topk.ids, DType::i32, "moe_route topk.ids");
  check_shape(topk.ids, {m, cfg.top_k}, "moe_route topk.ids");
  check_cuda_tensor(topk.weights, DType::f32, "moe_route topk.weights");
  check_shape(topk.weights, {m, cfg.top_k}, "moe_route topk.weights");
  MOELORA_CHECK(topk.ids.device() == logits.device() && topk.weights.device() == logits.device(),
                "moe_route: logits on {}, topk on {} / {}", logits.device().str(),
                topk.ids.device().str(), topk.weights.device().str());
  if (cfg.use_correction_bias) {
    check_cuda_tensor(bias, DType::f32, "moe_route correction_bias");
    check_shape(bias, {cfg.num_experts}, "moe_route correction_bias");
  }
}

void moe_route(const Tensor& logits, const Tensor& correction_bias, const RouterConfig& cfg,
               TopK& topk, const Stream& stream) {
  check_route_args(logits, correction_bias, cfg, topk);
  MOELORA_CUDA_CHECK(detail::launch_moe_route(
      logits.data<float>(), cfg.use_correction_bias ? correction_bias.data<float>() : nullptr,
      route_params(cfg), int(logits.size(0)), topk.ids.data<int32_t>(),
      topk.weights.data<float>(), raw_stream(stream)));
}

void moe_align(const Tensor& group_ids, MoeAlignment& plan, const Stream& stream) {
  check_ids(group_ids, "moe_align group_ids");
  const detail::AlignOut o = check_plan(plan, group_ids.numel(), group_ids.device(), "moe_align");
  MOELORA_CUDA_CHECK(
      detail::launch_moe_align(group_ids.data<int32_t>(), o, raw_stream(stream)));
}

void moe_lora_align(const Tensor& ids, const Tensor& token_slot, int num_experts,
                    MoeAlignment& vplan, const Stream& stream) {
  check_ids(ids, "moe_lora_align ids");
  check_cuda_tensor(token_slot, DType::i32, "moe_lora_align token_slot");
  check_shape(token_slot, {ids.size(0)}, "moe_lora_align token_slot");
  MOELORA_CHECK(num_experts >= 1 && vplan.num_groups % num_experts == 0,
                "moe_lora_align: vplan.num_groups={} must be slots * num_experts={}",
                vplan.num_groups, num_experts);
  const detail::AlignOut o = check_plan(vplan, ids.numel(), ids.device(), "moe_lora_align");
  MOELORA_CUDA_CHECK(detail::launch_moe_lora_align(ids.data<int32_t>(),
                                                   token_slot.data<int32_t>(), int(ids.size(1)),
                                                   num_experts, o, raw_stream(stream)));
}

void moe_route_align(const Tensor& logits, const Tensor& correction_bias,
                     const RouterConfig& cfg, TopK& topk, MoeAlignment& plan,
                     const Stream& stream) {
  check_route_args(logits, correction_bias, cfg, topk);
  const int64_t m = logits.size(0);
  const size_t smem = detail::route_align_scratch_bytes(cfg.num_experts, cfg.n_group,
                                                       plan.num_groups, 32) +
                      size_t(m) * cfg.top_k * 4;
  if (m > detail::kFusedRouteMaxTokens || cfg.num_experts != plan.num_groups ||
      smem > detail::kAlignSmemLimit + detail::kSmemSlack) {
    moe_route(logits, correction_bias, cfg, topk, stream);
    moe_align(topk.ids, plan, stream);
    return;
  }
  const detail::AlignOut o = check_plan(plan, m * cfg.top_k, logits.device(), "moe_route_align");
  MOELORA_CUDA_CHECK(detail::launch_moe_route_align(
      logits.data<float>(), cfg.use_correction_bias ? correction_bias.data<float>() : nullptr,
      route_params(cfg), int(m), topk.ids.data<int32_t>(), topk.weights.data<float>(), o,
      raw_stream(stream)));
}

}  // namespace moelora::cuda
