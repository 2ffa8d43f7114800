// GPTQ int4 / int8 (AutoGPTQ "gptq" and GPTQModel "gptq_v2" checkpoints), CPU side:
// on-disk tensors, validation, reference dequantizer and a round-to-nearest quantizer.
//
// On disk, for a linear layer `<prefix>` with logical weight [N, K], pack = 32 / bits:
//   <prefix>.qweight  i32 [K/pack, N]    packed along K: row k of the weight column n sits in
//                                        word qweight[k / pack, n], bits bits*(k % pack) ..
//   <prefix>.scales   f16 [K/G, N]       (bf16/f32 accepted when reading)
//   <prefix>.qzeros   i32 [K/G, N/pack]  packed along N the same way (n % pack -> bits)
//   <prefix>.g_idx    i32 [K]            group of input channel k (optional; default k / G)
// w[n, k] = scales[g, n] * (q[k, n] - zero[g, n]) with g = g_idx[k], where
//   gptq (v1, AutoGPTQ):  zero = stored + 1   (AutoGPTQ packs zero - 1; a stored field of
//                         2^bits - 1 thus means 2^bits, and a true zero of 0 cannot be stored)
//   gptq_v2 (GPTQModel):  zero = stored
// Symmetric checkpoints (sym: true; uint4b8 / uint8b128) store the constant zero 2^(bits-1).
// Group size G: 32, 64, 128 or per-channel (G = K, written as group_size -1 in
// quantize_config.json); G must divide K. Act-order (desc_act) shows as a non-monotonic g_idx.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "moelora/core/tensor.h"
#include "moelora/io/safetensors.h"
#include "moelora/quant/quant_common.h"

namespace moelora::quant {

enum class GptqZeroFormat : uint8_t {
  v1_minus_one,  // checkpoint_format "gptq" (AutoGPTQ): qzeros hold zero - 1
  v2_true,       // checkpoint_format "gptq_v2" (GPTQModel): qzeros hold the zero itself
};

// quantize_config.json of a GPTQ checkpoint.
struct GptqConfig {
  int bits = 4;              // 4 or 8
  int64_t group_size = 128;  // 32, 64, 128, or -1 for per-channel (one group spanning K)
  bool sym = true;           // zero points are the constant 2^(bits-1)
  bool desc_act = false;     // act-order: g_idx may be non-monotonic
  GptqZeroFormat zero_format = GptqZeroFormat::v1_minus_one;
};

struct GptqTensors {
  Tensor qweight;  // i32 [K/pack, N]
  Tensor scales;   // f16 [K/G, N]
  Tensor qzeros;   // i32 [K/G, N/pack]
  Tensor g_idx;    // i32 [K] (may be undefined: then g = k / G)
};

// The expected sizes for a logical [n, k] weight; throws for unsupported bits / group sizes
// (and group sizes that do not divide k), saying what is supported.
QuantDims gptq_dims(const GptqConfig& cfg, int64_t n, int64_t k);

// Checks every tensor (dtype, shape, finite positive scales, g_idx range, symmetric zeros)
// and returns the logical dims. N comes from scales, K from g_idx (or scales x G); a qweight
// with the wrong number of rows for `bits` (e.g. an 8-bit checkpoint read as 4-bit) is named
// as such. `prefix` names the tensors in errors ("<prefix>.qweight").
QuantDims validate_gptq(const GptqTensors& t, const GptqConfig& cfg, const std::string& prefix);

// Which zero format a symmetric checkpoint's qzeros are in: all fields 2^(bits-1) - 1 -> v1,
// all 2^(bits-1) -> v2, anything else -> nullopt (asymmetric zeros; the format cannot be told
// from the tensors, read checkpoint_format).
std::optional<GptqZeroFormat> detect_gptq_zero_format(const Tensor& qzeros, int bits);

// Reference dequantization to f32 [N, K] (validates first).
Tensor dequantize_gptq(const GptqTensors& t, const GptqConfig& cfg,
                       const std::string& prefix = "gptq");

// The unpacked integer of weight (n, k) and the true zero of (group g, n) — the format's
// definition, used by the dequantizer and by tests on hand-built words.
int32_t gptq_q(const GptqTensors& t, int bits, int64_t n, int64_t k);
int32_t gptq_zero(const GptqTensors& t, const GptqConfig& cfg, int64_t g, int64_t n);

// Round-to-nearest quantization of a bf16/f16/f32 [N, K] weight, as AutoGPTQ's quantizer
// computes scales and zeros (sym: scale = 2 amax / (2^bits - 1), zero 2^(bits-1); asym:
// range [min(x, 0), max(x, 0)]). With `act_order_perm` (a permutation of [0, K)), channels
// perm[i] form group i / G and g_idx is written accordingly (requires cfg.desc_act).
// Scales are rounded to f16 before the integers are computed, so dequantization reproduces
// the quantizer's grid exactly.
GptqTensors quantize_gptq(const Tensor& w, const GptqConfig& cfg,
                          const std::vector<int32_t>& act_order_perm = {});

// The tensors of `<prefix>` in a checkpoint file, validated. g_idx is optional.
GptqTensors load_gptq(const SafetensorsFile& file, const std::string& prefix,
                      const GptqConfig& cfg);
// Adds "<prefix>.qweight" ... to `out` (for save_safetensors).
void add_gptq_tensors(std::map<std::string, Tensor>& out, const std::string& prefix,
                      const GptqTensors& t);

}  // namespace moelora::quant
