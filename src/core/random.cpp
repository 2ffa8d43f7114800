#include "moelora/core/random.h"

#include "kernels/cpu/fill.h"
#ifdef MOELORA_WITH_CUDA
#include "kernels/cuda/fill.h"
#endif

namespace moelora {

void fill_uniform(Tensor& t, uint64_t seed, float lo, float hi, const Stream& stream) {
  check_contiguous(t, "fill_uniform");
  MOELORA_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::bf16 || t.dtype() == DType::f16 ||
                    t.dtype() == DType::f8_e4m3,
                "fill_uniform: expected an f32, bf16, f16 or f8_e4m3 tensor, found {}",
                t.describe());
  if (t.device().is_cpu()) return cpu::fill_uniform(t, seed, lo, hi, stream);
#ifdef MOELORA_WITH_CUDA
  cuda::fill_uniform(t, seed, lo, hi, stream);
#else
  MOELORA_THROW("fill_uniform on {} needs CUDA, but moelora was built without it", t.device().str());
#endif
}

void fill_random_bits(Tensor& t, uint64_t seed, const Stream& stream) {
  check_contiguous(t, "fill_random_bits");
  MOELORA_CHECK(t.dtype() == DType::u8 || t.dtype() == DType::i32 || t.dtype() == DType::i64,
                "fill_random_bits: expected a u8, i32 or i64 tensor, found {}", t.describe());
  if (t.device().is_cpu()) return cpu::fill_random_bits(t, seed, stream);
#ifdef MOELORA_WITH_CUDA
  cuda::fill_random_bits(t, seed, stream);
#else
  MOELORA_THROW("fill_random_bits on {} needs CUDA, but moelora was built without it",
                t.device().str());
#endif
}

}  // namespace moelora
