#pragma once

#include "moelora/core/random.h"

namespace moelora::cuda {
void fill_uniform(Tensor& t, uint64_t seed, float lo, float hi, const Stream& stream);
void fill_random_bits(Tensor& t, uint64_t seed, const Stream& stream);
}  // namespace moelora::cuda
