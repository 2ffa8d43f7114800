// compressed-tensors "pack-quantized" int4 / int8 weights (llm-compressor checkpoints,
// quant_method "compressed-tensors", format "pack-quantized"), CPU side.
//
// On disk, for a linear layer `<prefix>` with logical weight [N, K], pack = 32 / bits:
//   <prefix>.weight_packed      i32 [N, ceil(K/pack)]  packed along K (the last dim): element
//                               k sits in word [n, k / pack], bits bits*(k % pack) .., stored
//                               unsigned as q + 2^(bits-1) (q is the signed integer in
//                               [-2^(bits-1), 2^(bits-1) - 1]); K is zero-padded to a whole word
//   <prefix>.weight_scale       [N, K/G] (group) or [N, 1] (channel); f16 / bf16 / f32
//   <prefix>.weight_shape       i64 (or i32) [2] = {N, K}
//   <prefix>.weight_zero_point  i32 [ceil(N/pack), K/G], packed along N (dim 0) the same way,
//                               signed offset included; only for asymmetric group/channel
//   <prefix>.weight_g_idx       i32 [K] (optional; actorder "group")
// w[n, k] = weight_scale[n, g] * (q[n, k] - zp[n, g]), g = g_idx[k] or k / G.
// Checked against compressed-tensors pack_quantized.py (pack_to_int32 / unpack_from_int32:
// offset 2^(bits-1), element i at bits num_bits*i, zero point packed_dim=0) and
// quantization/lifecycle/forward.py (group_size must divide K).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "moelora/core/tensor.h"
#include "moelora/io/safetensors.h"
#include "moelora/quant/quant_common.h"

namespace moelora::quant {

enum class CtStrategy : uint8_t { channel, group };

// config_groups.*.weights of the checkpoint's quantization_config.
struct CtPackConfig {
  int bits = 4;  // num_bits: 4 or 8 ("type": "int")
  CtStrategy strategy = CtStrategy::group;
  int64_t group_size = 128;  // strategy group: 32, 64 or 128
  bool symmetric = true;
};

struct CtPackTensors {
  Tensor weight_packed;      // i32 [N, ceil(K/pack)]
  Tensor weight_scale;       // [N, K/G] or [N, 1]
  Tensor weight_shape;       // i64 [2]
  Tensor weight_zero_point;  // i32 [ceil(N/pack), K/G] (asymmetric only)
  Tensor weight_g_idx;       // i32 [K] (optional)
};

QuantDims ct_pack_dims(const CtPackConfig& cfg, int64_t n, int64_t k);
// Checks every tensor; N and K come from weight_shape and must agree with the packed sizes.
QuantDims validate_ct_pack(const CtPackTensors& t, const CtPackConfig& cfg,
                           const std::string& prefix);

// The signed integers of weight (n, k) and zero point (n, g), by the format's definition.
int32_t ct_q(const CtPackTensors& t, int bits, int64_t n, int64_t k);
int32_t ct_zero(const CtPackTensors& t, const CtPackConfig& cfg, int64_t n, int64_t g);

Tensor dequantize_ct_pack(const CtPackTensors& t, const CtPackConfig& cfg,
                          const std::string& prefix = "layer");

// Round-to-nearest quantization as compressed-tensors' calculate_qparams computes it: range
// [min(x, 0), max(x, 0)]; symmetric: scale = amax / ((2^bits - 1) / 2), zero 0; asymmetric:
// scale = (max - min) / (2^bits - 1), zero = clamp(round(qmin - min / scale)). `scale_dtype`
// is the dtype weight_scale is written in (the model's dtype in real checkpoints).
CtPackTensors quantize_ct_pack(const Tensor& w, const CtPackConfig& cfg,
                               DType scale_dtype = DType::bf16);

CtPackTensors load_ct_pack(const SafetensorsFile& file, const std::string& prefix,
                           const CtPackConfig& cfg);
void add_ct_pack_tensors(std::map<std::string, Tensor>& out, const std::string& prefix,
                         const CtPackTensors& t);

}  // namespace moelora::quant
