// AWQ int4, GEMM version (AutoAWQ WQLinear_GEMM checkpoints, quant_method "awq",
// version "gemm"), CPU side: on-disk tensors, validation, reference dequantizer, quantizer.
//
// On disk, for a linear layer `<prefix>` with logical weight [N, K]:
//   <prefix>.qweight  i32 [K, N/8]    packed along N, interleaved: nibble i (bits 4i..4i+3)
//                                     of word qweight[k, c] holds column 8c + kAwqOrder[i]
//                                     (kAwqOrder = {0, 2, 4, 6, 1, 3, 5, 7}, so logical
//                                     column j of a pack sits in nibble {0,4,1,5,2,6,3,7}[j])
//   <prefix>.qzeros   i32 [K/G, N/8]  the same packing
//   <prefix>.scales   f16 [K/G, N]
// w[n, k] = scales[g, n] * (q[k, n] - zeros[g, n]) with g = k / G. Checked against AutoAWQ
// awq/modules/linear/gemm.py (WQLinear_GEMM.from_linear, order_map).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>

#include "moelora/core/tensor.h"
#include "moelora/io/safetensors.h"
#include "moelora/quant/quant_common.h"

namespace moelora::quant {

// Which logical column (within a pack of 8) nibble i holds, and the inverse.
inline constexpr std::array<int, 8> kAwqOrder = {0, 2, 4, 6, 1, 3, 5, 7};
inline constexpr std::array<int, 8> kAwqReverseOrder = {0, 4, 1, 5, 2, 6, 3, 7};

// quantization_config of an AWQ checkpoint (bits is always 4, zero_point always true for
// the GEMM version).
struct AwqConfig {
  int bits = 4;
  int64_t group_size = 128;  // 32, 64, 128, or -1 for per-channel
};

struct AwqTensors {
  Tensor qweight;  // i32 [K, N/8]
  Tensor qzeros;   // i32 [K/G, N/8]
  Tensor scales;   // f16 [K/G, N]
};

// Expected sizes for a logical [n, k] weight; throws for unsupported configs.
QuantDims awq_dims(const AwqConfig& cfg, int64_t n, int64_t k);
// Checks every tensor and returns the logical dims (N from scales, K from qweight rows).
QuantDims validate_awq(const AwqTensors& t, const AwqConfig& cfg, const std::string& prefix);

// The unpacked integers of weight (n, k) and of zero (g, n), by the format's definition.
int32_t awq_q(const AwqTensors& t, int64_t n, int64_t k);
int32_t awq_zero(const AwqTensors& t, int64_t g, int64_t n);

// Reference dequantization to f32 [N, K] (validates first).
Tensor dequantize_awq(const AwqTensors& t, const AwqConfig& cfg, const std::string& prefix = "awq");

// Round-to-nearest zero-point quantization as AutoAWQ computes it (without the activation-
// aware scale search): per group, scale = (max - min) / 15 (at least 1e-5), zero =
// clamp(-round(min / scale), 0, 15); q = clamp(round(w / scale) + zero, 0, 15) — except that
// [min, max] is widened to include 0, so all-positive groups are not clipped. Scales are
// rounded to f16 first so the stored grid dequantizes exactly.
AwqTensors quantize_awq(const Tensor& w, const AwqConfig& cfg);

AwqTensors load_awq(const SafetensorsFile& file, const std::string& prefix, const AwqConfig& cfg);
void add_awq_tensors(std::map<std::string, Tensor>& out, const std::string& prefix,
                     const AwqTensors& t);

}  // namespace moelora::quant
