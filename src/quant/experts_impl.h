// Per-format halves of moelora/quant/experts.h (one .cpp per backend family).
#pragma once

#include "moelora/quant/experts.h"

namespace moelora::quant::detail {

// int4 / int8 (src/quant/experts_wna16.cpp)
ExpertMatrices quantize_int_experts(const Tensor& w, const QuantizeOptions& opt);
Tensor dequantize_int_experts(const ExpertMatrices& w);  // w on the host
ExpertMatrices random_int_experts(WeightFormat format, int64_t groups, int64_t n, int64_t k,
                                  int64_t group_size, float amax, uint64_t seed, Device device,
                                  const Stream& stream);
// fp8_block (src/quant/experts_fp8.cpp)
ExpertMatrices quantize_fp8_experts(const Tensor& w, const QuantizeOptions& opt);
Tensor dequantize_fp8_experts(const ExpertMatrices& w);
ExpertMatrices random_fp8_experts(int64_t groups, int64_t n, int64_t k, int64_t group_size,
                                  float amax, uint64_t seed, Device device, const Stream& stream);
// nvfp4 (src/quant/experts_nvfp4.cpp)
ExpertMatrices quantize_nvfp4_experts(const Tensor& w, const QuantizeOptions& opt);
Tensor dequantize_nvfp4_experts(const ExpertMatrices& w);
ExpertMatrices random_nvfp4_experts(int64_t groups, int64_t n, int64_t k, float amax,
                                    uint64_t seed, Device device, const Stream& stream);

}  // namespace moelora::quant::detail
