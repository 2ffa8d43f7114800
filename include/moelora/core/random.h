// Counter-based random fills: element i of a tensor gets a value that depends only on (seed, i),
// so the CPU and CUDA fills of the same seed are identical (handy for tests and benchmarks).
#pragma once

#include <cstdint>

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"

namespace moelora {

// Uniform in [lo, hi) for f32/bf16/f16/f8_e4m3 tensors (contiguous), on the tensor's device
// (e4m3: round to nearest even, saturating at +-448).
void fill_uniform(Tensor& t, uint64_t seed, float lo, float hi, const Stream& stream);

// Uniformly random bytes (byte i = random_byte_at(seed, i)) for u8/i32/i64 tensors: packed
// integer codes for benchmarks of quantized formats.
void fill_random_bits(Tensor& t, uint64_t seed, const Stream& stream);

// The value fill_uniform writes at index i (before rounding to the tensor's dtype).
inline float uniform_at(uint64_t seed, uint64_t i, float lo, float hi) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float u = float(z >> 40) * (1.0f / 16777216.0f);  // 24 bits -> [0, 1)
  return lo + (hi - lo) * u;
}

inline uint8_t random_byte_at(uint64_t seed, uint64_t i) {
  uint64_t z = (seed ^ 0xD1B54A32D192ED03ull) * 0x9E3779B97F4A7C15ull + i;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return uint8_t((z ^ (z >> 31)) >> 24);
}

}  // namespace moelora
