// Checkpoint access for the model loaders (internal): every tensor taken is checked (present,
// expected shape, dtype) and recorded, so that a key no model module claimed is an error
// instead of a silently ignored weight.
//
// Quantized checkpoints. The format is read from config.json's quantization_config,
// hf_quant_config.json (ModelOpt) or quantize_config.json (AutoGPTQ), in that order, through
// quant::parse_quant_config. A linear module `<m>` is stored quantized when the format's
// tensors are there (<m>.qweight for GPTQ / AWQ, <m>.weight_packed for compressed-tensors,
// an e4m3 <m>.weight for fp8 block-scale, a u8 <m>.weight for NVFP4); anything else, the
// modules of the format's ignore list included (they are written in float), is read as a
// float tensor. The tensors on disk decide, so the ignore list is honoured by construction.
//  - Routed / shared experts: quantized() hands the format's tensors to the expert loader
//    (model/expert_loader.h), which packs them for the quantized MoE backends.
//  - Every other linear (attention, dense MLP): bf16("<m>.weight") dequantizes the module to
//    bf16 transparently. Dense layers run in bf16 for now: the experts hold almost all of the
//    bytes of an MoE model; dense quantized GEMMs are later work.
// Every tensor consumed (qweight, scales, zeros, g_idx, input_scale, ...) is marked used, so
// check_all_used() still catches stray keys.
//
// Random weights (benchmarks, smoke tests): a directory holding config.json and
// random_weights.json (kRandomWeightsFile, written by write_random_weights) instead of
// safetensors. Every tensor a model asks for is then made on the file's device from its seed
// and the tensor's name (so values do not depend on load order): linear weights uniform in
// +-1/sqrt(in_features) (activations stay sane through many layers), 1-D weights (norms,
// biases) uniform in [0.9, 1.1], experts in the file's format through quant::random_experts.
// Nothing is read from disk, so a 30 GB model is made on the GPU in seconds.
#pragma once

#include <functional>
#include <optional>
#include <set>
#include <string>

#include "moelora/core/stream.h"
#include "moelora/io/checkpoint.h"
#include "moelora/moe/types.h"
#include "moelora/quant/nvfp4.h"
#include "moelora/quant/quant_config.h"

namespace moelora {

inline constexpr const char* kRandomWeightsFile = "random_weights.json";

struct RandomWeights {
  uint64_t seed = 0;
  WeightFormat experts_format = WeightFormat::bf16;
  // Quantization group along K of the experts: 0 = the format's default (128; fp8_block: the
  // square block; nvfp4: 16).
  int64_t group_size = 0;
  Device device = Device::cpu();  // where every tensor is made
};

// Writes `dir`/random_weights.json (dir must exist; config.json is the caller's).
void write_random_weights(const std::string& dir, const RandomWeights& r);

// The format's tensors of one quantized linear module, validated (only the member of `method`
// is set). dims are the logical sizes.
struct QuantizedLinear {
  std::string module;
  quant::QuantMethod method = quant::QuantMethod::gptq;
  quant::QuantDims dims;
  quant::GptqTensors gptq;
  quant::AwqTensors awq;
  quant::CtPackTensors ct;
  quant::Fp8BlockTensors fp8;
  quant::Nvfp4Tensors nvfp4;
};

class WeightLoader {
 public:
  // `progress` (optional) is told each tensor as it is first taken: (taken, total, name).
  using Progress = std::function<void(int64_t, int64_t, const std::string&)>;
  explicit WeightLoader(const std::string& dir, Progress progress = nullptr);

  const std::string& dir() const { return dir_; }
  // Whether the checkpoint has the key (always false for random weights).
  bool has(const std::string& name) const { return !random_ && ck_.contains(name); }

  // The tensor as bf16 with exactly `shape` (bf16 on disk: a zero-copy view; f32 / f16:
  // converted; a quantized `<m>.weight`: dequantized). Host tensor, except for random weights
  // (made on their device). Errors name the checkpoint directory and the tensor, expected vs
  // found.
  Tensor bf16(const std::string& name, const Shape& shape);
  // Copies tensor `name` (`shape`, after the same checks) into `dst` (bf16, contiguous, on any
  // device) starting at element offset `at`.
  void copy_into(const std::string& name, const Shape& shape, Tensor& dst, int64_t at);

  // --- quantized modules ---
  // The checkpoint's quantization (nullopt: float weights only).
  const std::optional<quant::QuantScheme>& quant_scheme() const { return scheme_; }
  // Whether linear module `module` (e.g. "model.layers.0.mlp.experts.3.gate_proj") is stored
  // in the checkpoint's quantized format.
  bool is_quantized(const std::string& module) const;
  // Its tensors, validated against the logical [n, k], marked used. Errors name the missing or
  // misshapen tensor.
  QuantizedLinear quantized(const std::string& module, int64_t n, int64_t k);
  // The expert WeightFormat a quantized module maps to (int4 / int8 / fp8_block / nvfp4).
  WeightFormat expert_format() const;

  // --- random weights ---
  const std::optional<RandomWeights>& random() const { return random_; }
  // Random experts stack [groups, n, k] in the random format; `name` seeds it.
  ExpertMatrices random_experts(const std::string& name, int64_t groups, int64_t n, int64_t k);

  // Marks every checkpoint tensor whose name starts with `prefix` as deliberately unused and
  // prints one note to stderr naming how many and `why` (e.g. a multi-token-prediction layer
  // the model does not run). Returns how many were skipped.
  int64_t skip_prefix(const std::string& prefix, const std::string& why);

  // Throws listing the checkpoint keys that were never taken (nothing to check for random
  // weights).
  void check_all_used() const;

 private:
  void mark_used(const std::string& name);
  uint64_t seed_of(const std::string& name) const;
  // Random fills, waited for (callers copy the result with the legacy stream).
  void fill_random(Tensor& t, const std::string& name, int64_t in_features);

  std::string dir_;
  std::optional<RandomWeights> random_;
  Stream stream_;  // random weights: fills run on the device's stream
  Checkpoint ck_;
  std::optional<quant::QuantScheme> scheme_;
  std::set<std::string> used_;
  Progress progress_;
  int64_t total_ = 0;
};

}  // namespace moelora
