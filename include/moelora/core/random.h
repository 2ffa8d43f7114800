// Counter-based random fills: element i of a tensor gets a value that depends only on (seed, i),
// so the CPU and CUDA fills of the same seed are identical (handy for tests and benchmarks).
#pragma once

#include <cstdint>

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"

namespace moelora {

// Uniform in [lo, hi) for f32/bf16/f16 tensors (contiguous), on the tensor's device.
void fill_uniform(Tensor& t, uint64_t seed, float lo, float hi, const Stream& stream);

// The value fill_uniform writes at index i (before rounding to the tensor's dtype).
inline float uniform_at(uint64_t seed, uint64_t i, float lo, float hi) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float u = float(z >> 40) * (1.0f / 16777216.0f);  // 24 bits -> [0, 1)
  return lo + (hi - lo) * u;
}

}  // namespace moelora
