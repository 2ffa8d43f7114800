// Launcher of the uniform fill (device-code side; no framework types).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moelora::cuda {

enum class FillType : uint8_t { f32, bf16, f16, f8_e4m3 };

cudaError_t launch_fill_uniform(void* out, FillType type, int64_t n, uint64_t seed, float lo,
                                float hi, cudaStream_t stream);

// bytes[i] = moelora::random_byte_at(seed, i) for i < num_bytes.
cudaError_t launch_fill_random_bits(void* out, int64_t num_bytes, uint64_t seed,
                                    cudaStream_t stream);

}  // namespace moelora::cuda
