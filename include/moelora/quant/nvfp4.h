// NVFP4 weights as NVIDIA ModelOpt exports them (hf_quant_config.json quant_algo "NVFP4",
// group_size 16), CPU side.
//
// On disk, for `<prefix>` with logical weight [N, K] (K a multiple of 16):
//   <prefix>.weight          u8 [N, K/2]        two e2m1 codes per byte: low nibble = element
//                                               2j, high nibble = element 2j + 1
//   <prefix>.weight_scale    f8_e4m3 [N, K/16]  one scale per 16 consecutive K elements
//   <prefix>.weight_scale_2  f32 [] (or [1])    global scale
//   <prefix>.input_scale     f32 [] (or [1])    activation global scale (optional here)
// w[n, k] = e2m1(code) * weight_scale[n, k/16] * weight_scale_2, e2m1 code = sign << 3 | index
// into the magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6} (code 8 is -0).
// Checked against ModelOpt modelopt/torch/quantization/qtensor/nvfp4_tensor.py
// (NVFP4QTensor.quantize / _cast_fp4 / dequantize).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>

#include "moelora/core/tensor.h"
#include "moelora/io/safetensors.h"
#include "moelora/quant/quant_common.h"

namespace moelora::quant {

inline constexpr int64_t kNvfp4GroupSize = 16;
inline constexpr float kE2m1Max = 6.0f;
inline constexpr std::array<float, 8> kE2m1Magnitudes = {0.0f, 0.5f, 1.0f, 1.5f,
                                                         2.0f, 3.0f, 4.0f, 6.0f};

// The value of a 4-bit e2m1 code (bits above the low 4 are ignored).
inline float e2m1_to_float(uint8_t code) {
  const float m = kE2m1Magnitudes[code & 7u];
  return (code & 8u) ? -m : m;
}
// Round to nearest, ties to even code, saturating at ±6 (ModelOpt's _cast_fp4; NaN -> 0).
// Negative values keep the sign bit, so -0.1 encodes as -0 (code 8); -0.0 itself encodes as +0.
uint8_t float_to_e2m1(float v);

struct Nvfp4Tensors {
  Tensor weight;          // u8 [N, K/2]
  Tensor weight_scale;    // f8_e4m3 [N, K/16]
  Tensor weight_scale_2;  // f32 [] or [1]
  Tensor input_scale;     // f32 [] or [1], optional
};

QuantDims nvfp4_dims(int64_t n, int64_t k);
// Checks dtypes and shapes (K = 2 x weight columns must be a multiple of 16), that
// weight_scale has no NaN or negative entries and that the global scales are finite and > 0.
QuantDims validate_nvfp4(const Nvfp4Tensors& t, const std::string& prefix);
Tensor dequantize_nvfp4(const Nvfp4Tensors& t, const std::string& prefix = "layer");

// The e2m1 code of weight (n, k) by the format's definition.
uint8_t nvfp4_code(const Nvfp4Tensors& t, int64_t n, int64_t k);

// ModelOpt's weight quantization: weight_scale_2 = amax / (448 * 6); per 16-block scale =
// e4m3(max(block_amax / (6 * weight_scale_2), 2^-9)) (1 for all-zero blocks); codes =
// e2m1(w / (scale * weight_scale_2)). `input_amax` > 0 also writes input_scale =
// input_amax / (6 * 448).
Nvfp4Tensors quantize_nvfp4(const Tensor& w, float input_amax = 0.0f);

Nvfp4Tensors load_nvfp4(const SafetensorsFile& file, const std::string& prefix);
void add_nvfp4_tensors(std::map<std::string, Tensor>& out, const std::string& prefix,
                       const Nvfp4Tensors& t);

}  // namespace moelora::quant
