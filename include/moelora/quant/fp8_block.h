// FP8 block-scale weights (DeepSeek-V3 style; transformers' FineGrainedFP8Config writes the
// same), CPU side, plus the reference of the dynamic 1 x 128 activation quantization.
//
// config.json: quantization_config {quant_method: "fp8", fmt: "e4m3", activation_scheme:
// "dynamic", weight_block_size: [128, 128]}. On disk, for `<prefix>` with weight [N, K]:
//   <prefix>.weight            f8_e4m3fn [N, K]
//   <prefix>.weight_scale_inv  f32 [ceil(N/bn), ceil(K/bk)]  — a multiplier despite the name:
//                              w[n, k] = weight[n, k] * weight_scale_inv[n / bn, k / bk]
// When N or K is not a multiple of the block, the last block row / column is partial (its
// scale covers only the real elements). e4m3fn: bias 7, max 448, no infinities, NaN = S.1111.111.
// Checked against transformers integrations/finegrained_fp8.py (Fp8Quantize: scale =
// 448 / amax per block, weight = clamp(w * scale), weight_scale_inv = 1 / scale; all-zero
// blocks get scale 1) and DeepSeek's act_quant (s = amax / 448 per 128 channels, y = x / s).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "moelora/core/tensor.h"
#include "moelora/io/safetensors.h"
#include "moelora/quant/quant_common.h"

namespace moelora::quant {

inline constexpr float kFp8E4m3Max = 448.0f;

struct Fp8BlockConfig {
  int64_t block_n = 128;  // weight_block_size[0] (rows, output features)
  int64_t block_k = 128;  // weight_block_size[1] (columns, input features)
};

struct Fp8BlockTensors {
  Tensor weight;            // f8_e4m3 [N, K]
  Tensor weight_scale_inv;  // f32 [ceil(N/bn), ceil(K/bk)]
};

QuantDims fp8_block_dims(const Fp8BlockConfig& cfg, int64_t n, int64_t k);
// Checks dtypes, the scale grid (with partial blocks) and that scales are finite and positive
// and no weight is an e4m3 NaN.
QuantDims validate_fp8_block(const Fp8BlockTensors& t, const Fp8BlockConfig& cfg,
                             const std::string& prefix);
Tensor dequantize_fp8_block(const Fp8BlockTensors& t, const Fp8BlockConfig& cfg,
                            const std::string& prefix = "layer");
// transformers' Fp8Quantize, extended to partial blocks: per block amax, scale = 448 / amax
// (1 for all-zero blocks), weight = e4m3(clamp(w * scale, ±448)) (round to nearest even),
// weight_scale_inv = 1 / scale.
Fp8BlockTensors quantize_fp8_block(const Tensor& w, const Fp8BlockConfig& cfg = {});

// Accepts the scale grid squeezed to 1-D when one of its dimensions is 1 (transformers 5.x
// writes per-expert scales that way).
Fp8BlockTensors load_fp8_block(const SafetensorsFile& file, const std::string& prefix,
                               const Fp8BlockConfig& cfg = {});
void add_fp8_block_tensors(std::map<std::string, Tensor>& out, const std::string& prefix,
                           const Fp8BlockTensors& t);

// Dynamic per-token, per-group activation quantization (what the fp8 MoE kernels feed their
// e4m3 MMAs): for each row and each `group` channels, s = max(amax, kFp8ActEps) / 448,
// q = e4m3(clamp(x / s, ±448)). The last group of a row may be partial.
inline constexpr float kFp8ActEps = 1e-10f;  // keeps all-zero groups finite (as vLLM does)
struct Fp8Activation {
  Tensor q;      // f8_e4m3 [M, K]
  Tensor scale;  // f32 [M, ceil(K/group)]
};
Fp8Activation quantize_fp8_activation(const Tensor& x, int64_t group = 128);
// q * scale, f32 [M, K].
Tensor dequantize_fp8_activation(const Fp8Activation& a, int64_t group = 128);

}  // namespace moelora::quant
