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
    case DType::f8_e4m3: {
      f8e4m3_t* p = t.data<f8e4m3_t>();
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_f8e4m3(uniform_at(seed, uint64_t(i), lo, hi));
      break;
    }
    default: MOELORA_THROW("fill_uniform: unsupported dtype {}", dtype_name(t.dtype()));
  }
}

void fill_random_bits(Tensor& t, uint64_t seed, const Stream&) {
  uint8_t* p = static_cast<uint8_t*>(t.data());
  const int64_t n = t.numel() * int64_t(dtype_size(t.dtype()));
  for (int64_t i = 0; i < n; ++i) p[i] = random_byte_at(seed, uint64_t(i));
}

}  // namespace moelora::cpu
