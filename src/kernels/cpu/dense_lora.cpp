// CPU reference dense LoRA: shrink and expand per token, f32 accumulation.
#include <vector>

#include "kernels/cpu/cpu_op_util.h"
#include "kernels/cpu/dense_lora_ops.h"
#include "kernels/dense_lora_checks.h"

namespace moelora::cpu {
namespace {

// The token's slot, validated (-1 or a slot of the pool).
int slot_of(const int32_t* ts, int64_t t, int slots) {
  const int s = ts[t];
  MOELORA_CHECK(s >= -1 && s < slots, "dense LoRA token_slot[{}] = {}: expected -1 or 0..{}", t,
                s, slots - 1);
  return s;
}

}  // namespace

void dense_lora_shrink(const Tensor& x, const Tensor& token_slot, const Tensor& A,
                       const Tensor& ranks, Tensor& u, const Stream& /*stream*/) {
  MOELORA_CHECK(x.device().is_cpu(), "cpu::dense_lora_shrink: x on {}", x.device().str());
  const auto d = detail::check_dense_lora_shrink(x, token_slot, A, ranks, u);
  const int32_t* ts = token_slot.data<int32_t>();
  const int32_t* rk = ranks.data<int32_t>();
  const bf16_t* a = A.data<bf16_t>();
  float* up = u.data<float>();
  std::vector<float> xr(size_t(d.k)), ar(size_t(d.k));
  for (int64_t t = 0; t < d.m; ++t) {
    const int slot = slot_of(ts, t, d.slots);
    if (slot < 0) continue;
    bf16_row_to_f32(x.data<bf16_t>() + t * d.k, d.k, xr.data());
    for (int s = 0; s < d.slices; ++s) {
      const int rank = rk[slot * d.slices + s];
      for (int r = 0; r < rank; ++r) {
        bf16_row_to_f32(a + ((int64_t(slot) * d.slices + s) * d.r + r) * d.k, d.k, ar.data());
        up[t * d.slices * d.r + s * d.r + r] = dot_f32(xr.data(), ar.data(), d.k);
      }
    }
  }
}

void dense_lora_expand(const Tensor& u, const Tensor& token_slot, const Tensor& B,
                       const Tensor& ranks, const DenseLoraSlices& slices, Tensor& y,
                       const Stream& /*stream*/) {
  MOELORA_CHECK(u.device().is_cpu(), "cpu::dense_lora_expand: u on {}", u.device().str());
  const auto d = detail::check_dense_lora_expand(u, token_slot, B, ranks, slices, y);
  const int32_t* ts = token_slot.data<int32_t>();
  const int32_t* rk = ranks.data<int32_t>();
  const bf16_t* b = B.data<bf16_t>();
  const float* up = u.data<float>();
  for (int64_t t = 0; t < d.m; ++t) {
    const int slot = slot_of(ts, t, d.slots);
    if (slot < 0) continue;
    for (int s = 0; s < d.slices; ++s) {
      const int rank = rk[slot * d.slices + s];
      if (rank == 0) continue;
      const float* ut = up + t * d.slices * d.r + s * d.r;
      for (int64_t n = slices.offset[size_t(s)]; n < slices.offset[size_t(s) + 1]; ++n) {
        const bf16_t* br = b + (int64_t(slot) * d.n + n) * d.r;
        float acc = 0.0f;
        for (int r = 0; r < rank; ++r) acc += bf16_to_float(br[r]) * ut[r];
        if (y.dtype() == DType::f32) {
          y.data<float>()[t * d.n + n] += acc;
        } else {
          bf16_t& yv = y.data<bf16_t>()[t * d.n + n];
          yv = float_to_bf16(bf16_to_float(yv) + acc);
        }
      }
    }
  }
}

}  // namespace moelora::cpu
