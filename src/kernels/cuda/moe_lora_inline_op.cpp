// Checks of the inline LoRA seam (moe_lora_inline_ops.h).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include <fmt/format.h>

#include "core/cuda_check.h"
#include "kernels/cuda/moe_lora_inline_ops.h"
#include "kernels/cuda/moe_op_checks.h"

namespace moelora::cuda {

MoeLoraInlineArgs inline_lora_args(const MoeLoraInline& l, bool gate_up, const Tensor& in,
                                   int rows_div, int64_t num_slots, int64_t num_experts,
                                   int64_t n_out, const char* op) {
  const std::string p = fmt::format("{} inline LoRA ({})", op, gate_up ? "gate_up" : "down");
  const std::string an = p + " A", bn = p + " B", mn = p + " meta", tn = p + " token_slot",
                    wn = p + " slot_weights", dn = p + " delta", xn = p + " input";
  const Device d = in.device();
  check_cuda_tensor(in, DType::bf16, xn.c_str());
  check_cuda_tensor(l.a, DType::bf16, an.c_str());
  check_cuda_tensor(l.b, DType::bf16, bn.c_str());
  check_cuda_tensor(l.meta, DType::i32, mn.c_str());
  check_cuda_tensor(l.token_slot, DType::i32, tn.c_str());
  check_cuda_tensor(l.delta, DType::f32, dn.c_str());
  for (const auto* t : {&l.a, &l.b, &l.meta, &l.token_slot, &l.delta})
    check_device(*t, d, p.c_str());
  const int64_t K = in.dim() == 2 ? in.size(1) : -1;
  MOELORA_CHECK(
      in.dim() == 2 && K > 0 && K % 8 == 0 && reinterpret_cast<uintptr_t>(in.data()) % 16 == 0,
      "{}: expected a 16-byte aligned [rows, K] with K a multiple of 8, found {}", xn,
      in.describe());
  MOELORA_CHECK(l.a.dim() == 4 && l.a.size(1) == num_experts && l.a.size(3) == K,
                "{}: expected [S, E = {}, R, K = {}], found {}", an, num_experts, K,
                l.a.describe());
  const int64_t S = l.a.size(0), R = l.a.size(2);
  MOELORA_CHECK(
      l.b.dim() == 4 && l.b.size(0) == S && l.b.size(1) == num_experts && l.b.size(2) == n_out,
      "{}: expected [S = {}, E = {}, N = {}, r_max], found {}", bn, S, num_experts, n_out,
      l.b.describe());
  const int64_t r_max = l.b.size(3);
  MOELORA_CHECK(r_max > 0 && r_max % 8 == 0 && R == (gate_up ? 2 : 1) * r_max,
                "{}: r_max must be a positive multiple of 8 with A's R = {} r_max; found r_max "
                "{} and R {}",
                p, gate_up ? 2 : 1, r_max, R);
  MOELORA_CHECK(!gate_up || n_out % 2 == 0, "{}: gate_up needs an even N, found {}", p, n_out);
  check_shape(l.meta, {S, 6}, mn.c_str());
  MOELORA_CHECK(l.top_k >= 1 && num_slots % l.top_k == 0 && l.token_slot.dim() == 1 &&
                    l.token_slot.size(0) >= num_slots / l.top_k,
                "{}: expected top_k >= 1 dividing the {} slots and at least {} entries, found "
                "top_k {} and {}",
                tn, num_slots, num_slots / std::max(l.top_k, 1), l.top_k, l.token_slot.describe());
  if (l.slot_weights.defined()) {
    check_cuda_tensor(l.slot_weights, DType::f32, wn.c_str());
    check_device(l.slot_weights, d, wn.c_str());
    MOELORA_CHECK(l.slot_weights.numel() >= num_slots, "{}: expected at least {} weights, found {}",
                  wn, num_slots, l.slot_weights.describe());
  }
  // [rows, N] or [k_splits, rows, N]: one partial delta per K slice of the shrink.
  const bool split = l.delta.dim() == 3;
  const int64_t ksplits = split ? l.delta.size(0) : 1, drows = l.delta.size(split ? 1 : 0);
  MOELORA_CHECK((l.delta.dim() == 2 || split) && ksplits >= 1 && ksplits <= 16 &&
                    drows >= num_slots && l.delta.size(l.delta.dim() - 1) == n_out,
                "{}: expected [>= {} slots, N = {}] or [k_splits in 1..16, >= {}, {}], found {}",
                dn, num_slots, n_out, num_slots, n_out, l.delta.describe());
  MOELORA_CHECK(l.column_splits >= 1 && l.column_splits <= 64,
                "{}: column_splits must be in [1, 64], found {}", p, l.column_splits);
  MOELORA_CHECK(S <= std::numeric_limits<int32_t>::max() / 6 &&
                    num_experts * S * R * K < std::numeric_limits<int64_t>::max() / 2,
                "{}: pool too large", p);

  MoeLoraInlineArgs a;
  a.in = in.data();
  a.rows_div = rows_div;
  a.K = int(K);
  a.A = l.a.data();
  a.R = int(R);
  a.B = l.b.data();
  a.N = int(n_out);
  a.r_max = int(r_max);
  a.num_experts = int(num_experts);
  a.meta = l.meta.data<int32_t>();
  a.token_slot = l.token_slot.data<int32_t>();
  a.top_k = l.top_k;
  a.num_lora_slots = int(S);
  a.gate_up = gate_up;
  a.slot_weights = l.slot_weights.defined() ? l.slot_weights.data<float>() : nullptr;
  a.delta = l.delta.data<float>();
  a.k_splits = int(ksplits);
  a.split_stride = drows * n_out;
  a.parts = (gate_up ? 2 : 1) * int(ksplits) * l.column_splits;
  return a;
}

int inline_lora_k_splits(int64_t num_slots, int64_t num_experts, int64_t K, int parts, int sms) {
  const int64_t blocks = std::max<int64_t>(1, std::min(num_slots, num_experts));
  const int64_t units = blocks * std::max(parts, 1);
  const int64_t cap = std::clamp<int64_t>(K / 256, 1, 8);
  return int(std::clamp<int64_t>(2 * int64_t(sms) / units, 1, cap));
}

int current_sm_count() {
  int device = 0, sms = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace moelora::cuda
