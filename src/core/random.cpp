#include "moelora/core/random.h"

#include "kernels/cpu/fill.h"
#ifdef MOELORA_WITH_CUDA
#include "kernels/cuda/fill.h"
#endif

namespace moelora {

void fill_uniform(Tensor& t, uint64_t seed, float lo, float hi, const Stream& stream) {
  check_contiguous(t, "fill_uniform");
  MOELORA_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::bf16 || t.dtype() == DType::f16,
                "fill_uniform: expected an f32, bf16 or f16 tensor, found {}", t.describe());
  if (t.device().is_cpu()) return cpu::fill_uniform(t, seed, lo, hi, stream);
#ifdef MOELORA_WITH_CUDA
  cuda::fill_uniform(t, seed, lo, hi, stream);
#else
  MOELORA_THROW("fill_uniform on {} needs CUDA, but moelora was built without it", t.device().str());
#endif
}

}  // namespace moelora
