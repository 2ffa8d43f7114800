// The one-kernel decode MoE layer (layer 3 of 3): validate Tensors, throw naming the tensor,
// then call the launcher (moe_decode_layer.cu).
#include "kernels/cuda/moe_decode_layer.h"

#include <cstdint>

#include <fmt/format.h>

#include "core/cuda_check.h"
#include "kernels/cuda/moe_decode_layer_launch.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_op_checks.h"

namespace moelora::cuda {
namespace {

static_assert(kMoeDecodeMaxTokens == detail::kDecodeMaxTokens, "one bound");

bool fail(std::string* why, std::string reason) {
  if (why) *why = std::move(reason);
  return false;
}

// A contiguous, 16-byte aligned CUDA tensor of `dtype` and `shape` on `device`.
void check_input(const Tensor& t, DType dtype, const Shape& shape, Device device,
                 const char* what) {
  check_cuda_tensor(t, dtype, what);
  check_device(t, device, what);
  check_shape(t, shape, what);
  MOELORA_CHECK(reinterpret_cast<uintptr_t>(t.data()) % 16 == 0,
                "{}: data must be 16-byte aligned for the decode layer kernel, found address {}",
                what, t.data());
}

}  // namespace

MoeDecodeWorkspace MoeDecodeWorkspace::allocate(const MoeShape& s, Device d) {
  const int64_t slots = int64_t(kMoeDecodeMaxTokens) * s.top_k;
  MoeDecodeWorkspace ws;
  ws.act = Tensor::empty({slots, int64_t(s.inter)}, DType::bf16, d);
  ws.part = Tensor::empty({slots, int64_t(s.hidden)}, DType::f32, d);
  if (s.shared_inter > 0) {
    ws.shared_act = Tensor::empty({kMoeDecodeMaxTokens, int64_t(s.shared_inter)}, DType::bf16, d);
    ws.shared_part = Tensor::empty({kMoeDecodeMaxTokens, int64_t(s.hidden)}, DType::f32, d);
  }
  ws.counters = Tensor::zeros({detail::decode_counter_count(s.hidden)}, DType::i32, d);
  return ws;
}

bool moe_decode_shape_supported(const MoeShape& s, std::string* why) {
  if (!moe_shape_supported(s, why)) return false;
  if (s.num_experts > detail::kDecodeMaxExperts)
    return fail(why, fmt::format("{} experts: the in-kernel router takes at most {}",
                                 s.num_experts, detail::kDecodeMaxExperts));
  if (s.top_k > detail::kDecodeMaxSlots)
    return fail(why, fmt::format("top_k {} exceeds the kernel's {} token-slots", s.top_k,
                                 detail::kDecodeMaxSlots));
  return true;
}

bool moe_decode_layer_supported(const MoeShape& s, const RouterConfig& router, int64_t m,
                                std::string* why) {
  if (!moe_decode_shape_supported(s, why)) return false;
  if (router.num_experts != s.num_experts || router.top_k != s.top_k)
    return fail(why, fmt::format("router E={}, k={} does not match shape E={}, k={}",
                                 router.num_experts, router.top_k, s.num_experts, s.top_k));
  if (m < 1 || m > kMoeDecodeMaxTokens)
    return fail(why, fmt::format("{} tokens; the decode kernel takes 1..{}", m,
                                 kMoeDecodeMaxTokens));
  if (m * s.top_k > detail::kDecodeMaxSlots)
    return fail(why, fmt::format("{} tokens x top_k {} exceeds {} token-slots", m, s.top_k,
                                 detail::kDecodeMaxSlots));
  // The staged GEMMs run 128-wide K stages up to block_m 16 and 64-wide ones past it; this
  // kernel pads the K tail like the former only.
  if (moe_block_m(m, s) > 16)
    return fail(why, fmt::format("the staged path would align {} tokens in blocks of {} (> 16)",
                                 m, moe_block_m(m, s)));
  return true;
}

void moe_decode_layer(const MoeInputs& in, const MoeWeights& w, const MoeShape& s,
                      const RouterConfig& router, TopK& topk, MoeDecodeWorkspace& ws, Tensor& y,
                      const Stream& stream, bool deep_prefetch) {
  constexpr const char* op = "moe_decode_layer";
  MOELORA_CHECK(in.x.defined() && in.x.dim() == 2, "{}: x must be [M, H], found {}", op,
                in.x.describe());
  const int64_t m = in.x.size(0);
  std::string why;
  MOELORA_CHECK(moe_decode_layer_supported(s, router, m, &why), "{}: not supported: {}", op, why);
  router.validate();
  MOELORA_CHECK(w.format == WeightFormat::bf16, "{}: bf16 expert weights only, found {}", op,
                format_name(w.format));
  w.validate(s);
  const Device d = in.x.device();
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter, k = s.top_k, Is = s.shared_inter;
  check_input(in.x, DType::bf16, {m, H}, d, "moe_decode_layer x");
  check_cuda_tensor(in.router_logits, DType::f32, "moe_decode_layer router_logits");
  check_device(in.router_logits, d, "moe_decode_layer router_logits");
  check_shape(in.router_logits, {m, E}, "moe_decode_layer router_logits");
  check_input(w.w13.w, DType::bf16, {E, 2 * I, H}, d, "moe_decode_layer w13");
  check_input(w.w2.w, DType::bf16, {E, H, I}, d, "moe_decode_layer w2");
  if (router.use_correction_bias) {
    check_cuda_tensor(w.correction_bias, DType::f32, "moe_decode_layer correction_bias");
    check_device(w.correction_bias, d, "moe_decode_layer correction_bias");
    check_shape(w.correction_bias, {E}, "moe_decode_layer correction_bias");
  }
  if (Is > 0) {
    check_input(w.shared_w13.w, DType::bf16, {1, 2 * Is, H}, d, "moe_decode_layer shared_w13");
    check_input(w.shared_w2.w, DType::bf16, {1, H, Is}, d, "moe_decode_layer shared_w2");
  }
  if (s.shared_gate) {
    MOELORA_CHECK(Is > 0, "{}: shape '{}' has a shared gate but no shared expert", op, s.name);
    check_cuda_tensor(in.shared_gate_logits, DType::f32, "moe_decode_layer shared_gate_logits");
    check_device(in.shared_gate_logits, d, "moe_decode_layer shared_gate_logits");
    check_shape(in.shared_gate_logits, {m}, "moe_decode_layer shared_gate_logits");
  }
  check_cuda_tensor(topk.ids, DType::i32, "moe_decode_layer topk.ids");
  check_device(topk.ids, d, "moe_decode_layer topk.ids");
  check_shape(topk.ids, {m, k}, "moe_decode_layer topk.ids");
  check_cuda_tensor(topk.weights, DType::f32, "moe_decode_layer topk.weights");
  check_device(topk.weights, d, "moe_decode_layer topk.weights");
  check_shape(topk.weights, {m, k}, "moe_decode_layer topk.weights");
  check_input(y, DType::bf16, {m, H}, d, "moe_decode_layer y");

  MOELORA_CHECK(ws.defined(), "{}: workspace not allocated (MoeDecodeWorkspace::allocate)", op);
  const int64_t max_slots = int64_t(kMoeDecodeMaxTokens) * k;
  check_input(ws.act, DType::bf16, {max_slots, I}, d, "moe_decode_layer workspace act");
  check_input(ws.part, DType::f32, {max_slots, H}, d, "moe_decode_layer workspace part");
  check_cuda_tensor(ws.counters, DType::i32, "moe_decode_layer workspace counters");
  check_shape(ws.counters, {detail::decode_counter_count(H)},
              "moe_decode_layer workspace counters");
  if (Is > 0) {
    check_input(ws.shared_act, DType::bf16, {kMoeDecodeMaxTokens, Is}, d,
                "moe_decode_layer workspace shared_act");
    check_input(ws.shared_part, DType::f32, {kMoeDecodeMaxTokens, H}, d,
                "moe_decode_layer workspace shared_part");
  }

  detail::DecodeLayerArgs a{};
  a.x = in.x.data();
  a.logits = in.router_logits.data<float>();
  a.bias = router.use_correction_bias ? w.correction_bias.data<float>() : nullptr;
  a.route.num_experts = router.num_experts;
  a.route.top_k = router.top_k;
  a.route.n_group = router.n_group;
  a.route.topk_group = router.topk_group;
  a.route.sigmoid = router.scoring == ScoringFunc::sigmoid;
  a.route.top2_sum = router.group_score == GroupScore::top2_sum;
  a.route.renormalize = router.renormalize;
  a.route.use_bias = router.use_correction_bias;
  a.route.scale = router.routed_scaling_factor;
  a.w13 = w.w13.w.data();
  a.w2 = w.w2.w.data();
  a.shared_w13 = Is > 0 ? w.shared_w13.w.data() : nullptr;
  a.shared_w2 = Is > 0 ? w.shared_w2.w.data() : nullptr;
  a.shared_gate = s.shared_gate ? in.shared_gate_logits.data<float>() : nullptr;
  a.topk_ids = topk.ids.data<int32_t>();
  a.topk_weights = topk.weights.data<float>();
  a.act = ws.act.data();
  a.part = ws.part.data<float>();
  a.shared_act = Is > 0 ? ws.shared_act.data() : nullptr;
  a.shared_part = Is > 0 ? ws.shared_part.data<float>() : nullptr;
  a.counters = ws.counters.data<int32_t>();
  a.y = y.data();
  a.m = int(m);
  a.hidden = int(H);
  a.inter = int(I);
  a.shared_inter = int(Is);
  MOELORA_CUDA_CHECK(detail::launch_moe_decode_layer(a, deep_prefetch, raw_stream(stream)));
}

}  // namespace moelora::cuda
