#include "kernels/cpu/fill.h"

namespace moelora::cpu {

void fill_uniform(Tensor& t, uint64_t seed, float lo, float hi, const Stream&) {
  const int64_t n = t.numel();
  switch (t.dtype()) {
    case DType::f32: {
      float* p = t.data<float>();
      for (int64_t i = 0; i < n; ++i) p[i] = uniform_at(seed, uint64_t(i), lo, hi);
      break;
    }
    case DType::bf16: {
      bf16_t* p = t.data<bf16_t>();
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(uniform_at(seed, uint64_t(i), lo, hi));
      break;
    }
    case DType::f16: {
      f16_t* p = t.data<f16_t>();
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_f16(uniform_at(seed, uint64_t(i), lo, hi));
      break;
    }
    default: MOELORA_THROW("fill_uniform: unsupported dtype {}", dtype_name(t.dtype()));
  }
}

}  // namespace moelora::cpu
