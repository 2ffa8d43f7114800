#include "moelora/lora/moe_lora.h"

namespace moelora {

std::pair<Tensor, Tensor> split_peft_expert_lora(const Tensor& lora_a, const Tensor& lora_b,
                                                 int num_experts, const std::string& what) {
  MOELORA_CHECK(num_experts > 0, "{}: num_experts must be > 0", what);
  MOELORA_CHECK(lora_a.dim() == 2 && lora_b.dim() == 2,
                "{}: expected 2-d lora_A and lora_B, found {} and {}", what, lora_a.describe(),
                lora_b.describe());
  check_contiguous(lora_a, what.c_str());
  check_contiguous(lora_b, what.c_str());
  MOELORA_CHECK(lora_a.device().is_cpu() && lora_b.device().is_cpu(),
                "{}: expected host tensors", what);
  const int64_t E = num_experts, Er = lora_a.size(0), in = lora_a.size(1), out = lora_b.size(0);
  MOELORA_CHECK(Er % E == 0, "{}: lora_A has {} rows, not a multiple of num_experts={}", what,
                Er, E);
  MOELORA_CHECK(lora_b.size(1) == Er, "{}: lora_B is {}, expected [out, {}] to match lora_A {}",
                what, lora_b.describe(), Er, lora_a.describe());
  const int64_t r = Er / E;
  Tensor A = Tensor::empty({E, r, in}, DType::f32);
  Tensor B = Tensor::empty({E, out, r}, DType::f32);
  float* pa = A.data<float>();
  float* pb = B.data<float>();
  for (int64_t i = 0; i < Er * in; ++i) pa[i] = float_at(lora_a, i);  // expert-major rows
  for (int64_t e = 0; e < E; ++e)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t j = 0; j < r; ++j) pb[(e * out + o) * r + j] = float_at(lora_b, o * Er + j * E + e);
  return {A, B};
}

}  // namespace moelora
