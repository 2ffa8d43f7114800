// Ops (layer 3) for the CUDA activation and top-k reduction.
#include "core/cuda_check.h"
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_op_checks.h"
#include "kernels/cuda/moe_ops.h"
#include "kernels/cuda/moe_ops_launch.h"

namespace moelora::cuda {
namespace {

// The delta view of moe_activation_lora_delta / moe_reduce_lora_delta: d f32 [M*k, N], or
// [splits, M*k, N] partial deltas added in order.
detail::LoraDeltaView delta_view(const Tensor& d, int64_t n, const Tensor& ids,
                                 const Tensor& token_slot, int num_lora_slots, int num_experts,
                                 const char* what) {
  check_cuda_tensor(d, DType::f32, what);
  check_cuda_tensor(token_slot, DType::i32, "LoRA delta token_slot");
  MOELORA_CHECK(ids.dim() == 2, "{}: ids expected [M, k], found {}", what, ids.describe());
  check_shape(token_slot, {ids.size(0)}, "LoRA delta token_slot");
  if (d.dim() == 3) {
    MOELORA_CHECK(d.size(0) >= 1 && d.size(0) <= 16 && d.size(1) == ids.numel() && d.size(2) == n,
                  "{}: expected [splits in 1..16, {}, {}], found {}", what, ids.numel(), n,
                  d.describe());
  } else {
    check_shape(d, {ids.numel(), n}, what);
  }
  MOELORA_CHECK(reinterpret_cast<uintptr_t>(d.data()) % 16 == 0, "{}: must be 16-byte aligned",
                what);
  detail::LoraDeltaView v;
  v.d = d.data<float>();
  v.splits = d.dim() == 3 ? int(d.size(0)) : 1;
  v.split_stride = ids.numel() * n;
  v.token_slot = token_slot.data<int32_t>();
  v.top_k = int(ids.size(1));
  v.num_lora_slots = num_lora_slots;
  v.num_experts = num_experts;
  return v;
}

void activation(const Tensor& h, const Tensor& ids, Tensor& a, const Stream& stream,
                detail::LoraDeltaView delta);
void reduce(const Tensor& o, const Tensor& ids, const Tensor& shared_o,
            const Tensor& shared_gate_logits, Tensor& y, const Stream& stream,
            detail::LoraDeltaView delta);

}  // namespace

void moe_activation(const Tensor& h, const Tensor& ids, Tensor& a, const Stream& stream) {
  activation(h, ids, a, stream, {});
}

void moe_reduce(const Tensor& o, const Tensor& ids, const Tensor& shared_o,
                const Tensor& shared_gate_logits, Tensor& y, const Stream& stream) {
  reduce(o, ids, shared_o, shared_gate_logits, y, stream, {});
}

void moe_activation_lora_delta(const Tensor& h, const Tensor& ids, const Tensor& token_slot,
                               int num_lora_slots, int num_experts, const Tensor& d13, Tensor& a,
                               const Stream& stream) {
  activation(h, ids, a, stream,
             delta_view(d13, h.dim() == 2 ? h.size(1) : 0, ids, token_slot, num_lora_slots,
                        num_experts, "moe_activation_lora_delta d13"));
}

void moe_reduce_lora_delta(const Tensor& o, const Tensor& ids, const Tensor& token_slot,
                           int num_lora_slots, int num_experts, const Tensor& d2,
                           const Tensor& shared_o, const Tensor& shared_gate_logits, Tensor& y,
                           const Stream& stream) {
  reduce(o, ids, shared_o, shared_gate_logits, y, stream,
         delta_view(d2, o.dim() == 2 ? o.size(1) : 0, ids, token_slot, num_lora_slots, num_experts,
                    "moe_reduce_lora_delta d2"));
}

namespace {

void activation(const Tensor& h, const Tensor& ids, Tensor& a, const Stream& stream,
                detail::LoraDeltaView delta) {
  check_cuda_tensor(h, DType::f32, "moe_activation h");
  check_cuda_tensor(ids, DType::i32, "moe_activation ids");
  check_cuda_tensor(a, DType::bf16, "moe_activation a");
  MOELORA_CHECK(ids.dim() == 2, "moe_activation ids: expected [M, k], found {}", ids.describe());
  const int64_t slots = ids.numel();
  MOELORA_CHECK(h.dim() == 2 && h.size(0) == slots && h.size(1) % 2 == 0 && h.size(1) > 0,
                "moe_activation h: expected [M*k={}, 2I], found {}", slots, h.describe());
  const int64_t inter = h.size(1) / 2;
  check_shape(a, {slots, inter}, "moe_activation a");
  MOELORA_CHECK(h.device() == a.device() && ids.device() == a.device(),
                "moe_activation: h, ids and a must share a device, found {}, {}, {}",
                h.device().str(), ids.device().str(), a.device().str());
  MOELORA_CUDA_CHECK(detail::launch_moe_activation(h.data<float>(), ids.data<int32_t>(), slots,
                                                   int(inter), a.data(), raw_stream(stream),
                                                   delta));
}

void reduce(const Tensor& o, const Tensor& ids, const Tensor& shared_o,
            const Tensor& shared_gate_logits, Tensor& y, const Stream& stream,
            detail::LoraDeltaView delta) {
  check_cuda_tensor(o, DType::f32, "moe_reduce o");
  check_cuda_tensor(ids, DType::i32, "moe_reduce ids");
  check_cuda_tensor(y, DType::bf16, "moe_reduce y");
  MOELORA_CHECK(ids.dim() == 2, "moe_reduce ids: expected [M, k], found {}", ids.describe());
  const int64_t m = ids.size(0), k = ids.size(1);
  MOELORA_CHECK(y.dim() == 2 && y.size(0) == m, "moe_reduce y: expected [M={}, H], found {}", m,
                y.describe());
  const int64_t hidden = y.size(1);
  check_shape(o, {m * k, hidden}, "moe_reduce o");
  MOELORA_CHECK(o.device() == y.device() && ids.device() == y.device(),
                "moe_reduce: o, ids and y must share a device, found {}, {}, {}", o.device().str(),
                ids.device().str(), y.device().str());
  const float* shared = nullptr;
  const float* gate = nullptr;
  if (shared_o.defined()) {
    check_cuda_tensor(shared_o, DType::f32, "moe_reduce shared_o");
    check_shape(shared_o, {m, hidden}, "moe_reduce shared_o");
    shared = shared_o.data<float>();
    if (shared_gate_logits.defined()) {
      check_cuda_tensor(shared_gate_logits, DType::f32, "moe_reduce shared_gate_logits");
      MOELORA_CHECK(shared_gate_logits.numel() == m,
                    "moe_reduce shared_gate_logits: expected [M={}], found {}", m,
                    shared_gate_logits.describe());
      gate = shared_gate_logits.data<float>();
    }
  } else {
    MOELORA_CHECK(!shared_gate_logits.defined(),
                  "moe_reduce: shared_gate_logits given without shared_o");
  }
  MOELORA_CUDA_CHECK(detail::launch_moe_reduce(o.data<float>(), ids.data<int32_t>(), m, int(k),
                                               int(hidden), shared, gate, y.data(),
                                               raw_stream(stream), delta));
}

}  // namespace
}  // namespace moelora::cuda
