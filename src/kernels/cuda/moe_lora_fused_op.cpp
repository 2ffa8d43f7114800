// Ops of the fused LoRA activation / reduction (kernels in moe_lora_fused.cu).
#include "core/cuda_check.h"
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_lora_fused_launch.h"

namespace moelora::cuda {
namespace {

void check_gpu(const Tensor& t, DType dt, const char* what) {
  MOELORA_CHECK(t.defined() && t.device().is_cuda(), "{}: expected a CUDA tensor, found {}", what,
                t.defined() ? t.describe() : std::string("undefined"));
  check_dtype(t, dt, what);
  check_contiguous(t, what);
}

// Common checks; returns the args with the LoRA fields filled.
MoeLoraFusedArgs lora_args(const Tensor& ids, const Tensor& token_slot, const Tensor& u,
                           int splits, const Tensor& B, const Tensor& meta, int64_t rows_per_e,
                           int ldu_factor, const char* op) {
  check_gpu(ids, DType::i32, "fused LoRA ids");
  MOELORA_CHECK(ids.dim() == 2, "{} ids: expected i32 [M, k], found {}", op, ids.describe());
  const int64_t m = ids.size(0), k = ids.size(1), n = m * k;
  check_gpu(token_slot, DType::i32, "fused LoRA token_slot");
  MOELORA_CHECK(token_slot.numel() >= m, "{} token_slot: expected >= {} entries, found {}", op, m,
                token_slot.describe());
  check_gpu(B, DType::bf16, "fused LoRA B");
  MOELORA_CHECK(B.dim() == 4 && B.size(2) == rows_per_e, "{} B: expected bf16 [S, E, {}, r_max], "
                "found {}", op, rows_per_e, B.describe());
  check_gpu(meta, DType::i32, "fused LoRA slot meta");
  check_shape(meta, {B.size(0), 6}, "fused LoRA slot meta");
  const int r_max = int(B.size(3));
  MOELORA_CHECK(splits >= 1 && splits <= kMaxLoraSplits, "{}: splits {} outside 1..{}", op, splits,
                kMaxLoraSplits);
  check_gpu(u, DType::f32, "fused LoRA u");
  MOELORA_CHECK(u.dim() == 2 && u.size(0) >= splits * n && u.size(1) == ldu_factor * r_max,
                "{} u: expected f32 [>= {} ({} splits x {} slots), {}], found {}", op, splits * n,
                splits, n, ldu_factor * r_max, u.describe());
  MOELORA_CHECK(r_max % 8 == 0 && ldu_factor * r_max <= 512,
                "{}: r_max {} must be a multiple of 8 and at most {}", op, r_max, 512 / ldu_factor);
  MoeLoraFusedArgs a{};
  a.ids = ids.data<int32_t>();
  a.token_slot = token_slot.data<int32_t>();
  a.u = u.data<float>();
  a.splits = splits;
  a.ldu = int(u.size(1));
  a.b = B.data();
  a.meta = meta.data<int32_t>();
  a.r_max = r_max;
  a.num_experts = int(B.size(1));
  a.num_slots = int(B.size(0));
  a.m = m;
  a.top_k = int(k);
  return a;
}

}  // namespace

void moe_lora_activation(const Tensor& h, const Tensor& ids, const Tensor& token_slot,
                         const Tensor& u13, int splits, const Tensor& B13, const Tensor& meta,
                         Tensor& a, const Stream& stream) {
  check_gpu(h, DType::f32, "moe_lora_activation h");
  MOELORA_CHECK(h.dim() == 2 && h.size(1) % 2 == 0,
                "moe_lora_activation h: expected f32 [M*k, 2I], found {}", h.describe());
  const int64_t inter = h.size(1) / 2;
  MoeLoraFusedArgs p =
      lora_args(ids, token_slot, u13, splits, B13, meta, 2 * inter, 2, "moe_lora_activation");
  check_shape(h, {p.m * p.top_k, 2 * inter}, "moe_lora_activation h");
  check_gpu(a, DType::bf16, "moe_lora_activation a");
  check_shape(a, {p.m * p.top_k, inter}, "moe_lora_activation a");
  p.in = h.data<float>();
  p.width = int(inter);
  p.out = a.data();
  MOELORA_CUDA_CHECK(launch_moe_lora_activation(p, static_cast<cudaStream_t>(stream.handle())));
}

void moe_lora_reduce(const Tensor& o, const Tensor& ids, const Tensor& token_slot,
                     const Tensor& slot_weights, const Tensor& u2, int splits, const Tensor& B2,
                     const Tensor& meta, const Tensor& shared_o, const Tensor& shared_gate_logits,
                     Tensor& y, const Stream& stream) {
  check_gpu(o, DType::f32, "moe_lora_reduce o");
  MOELORA_CHECK(o.dim() == 2, "moe_lora_reduce o: expected f32 [M*k, H], found {}", o.describe());
  const int64_t hidden = o.size(1);
  MoeLoraFusedArgs p = lora_args(ids, token_slot, u2, splits, B2, meta, hidden, 1, "moe_lora_reduce");
  const int64_t n = p.m * p.top_k;
  check_shape(o, {n, hidden}, "moe_lora_reduce o");
  check_gpu(slot_weights, DType::f32, "moe_lora_reduce slot_weights");
  MOELORA_CHECK(slot_weights.numel() == n, "moe_lora_reduce slot_weights: expected {} entries, "
                "found {}", n, slot_weights.describe());
  check_gpu(y, DType::bf16, "moe_lora_reduce y");
  check_shape(y, {p.m, hidden}, "moe_lora_reduce y");
  if (shared_o.defined()) {
    check_gpu(shared_o, DType::f32, "moe_lora_reduce shared_o");
    check_shape(shared_o, {p.m, hidden}, "moe_lora_reduce shared_o");
    p.shared_o = shared_o.data<float>();
  }
  if (shared_gate_logits.defined()) {
    MOELORA_CHECK(p.shared_o, "moe_lora_reduce: shared_gate_logits given without shared_o");
    check_gpu(shared_gate_logits, DType::f32, "moe_lora_reduce shared_gate_logits");
    MOELORA_CHECK(shared_gate_logits.numel() == p.m, "moe_lora_reduce shared_gate_logits: "
                  "expected {} entries, found {}", p.m, shared_gate_logits.describe());
    p.gate_logits = shared_gate_logits.data<float>();
  }
  p.in = o.data<float>();
  p.weights = slot_weights.data<float>();
  p.width = int(hidden);
  p.out = y.data();
  MOELORA_CUDA_CHECK(launch_moe_lora_reduce(p, static_cast<cudaStream_t>(stream.handle())));
}

}  // namespace moelora::cuda
