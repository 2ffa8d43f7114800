#include "core/cuda_check.h"
#include "kernels/cuda/fill.h"
#include "kernels/cuda/fill_launch.h"

namespace moelora::cuda {

void fill_uniform(Tensor& t, uint64_t seed, float lo, float hi, const Stream& stream) {
  FillType type;
  switch (t.dtype()) {
    case DType::f32: type = FillType::f32; break;
    case DType::bf16: type = FillType::bf16; break;
    case DType::f16: type = FillType::f16; break;
    case DType::f8_e4m3: type = FillType::f8_e4m3; break;
    default: MOELORA_THROW("fill_uniform: unsupported dtype {}", dtype_name(t.dtype()));
  }
  MOELORA_CUDA_CHECK(launch_fill_uniform(t.data(), type, t.numel(), seed, lo, hi,
                                         static_cast<cudaStream_t>(stream.handle())));
}

void fill_random_bits(Tensor& t, uint64_t seed, const Stream& stream) {
  MOELORA_CUDA_CHECK(launch_fill_random_bits(t.data(), t.numel() * int64_t(dtype_size(t.dtype())),
                                             seed, static_cast<cudaStream_t>(stream.handle())));
}

}  // namespace moelora::cuda
