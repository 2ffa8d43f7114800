// Checkpoint conversion (`moelora convert`): reads a Hugging Face model directory (config.json
// + model.safetensors, or shards listed in model.safetensors.index.json), quantizes its linear
// projection weights with the round-to-nearest quantizers of the format, copies every other
// tensor byte for byte, and writes a directory laid out as the producing library would:
//   gptq-int4 / gptq-int8  <m>.qweight, .scales, .qzeros, .g_idx; config.json
//                          quantization_config {quant_method "gptq", checkpoint_format "gptq"}
//                          and the same object as quantize_config.json (AutoGPTQ / GPTQModel)
//   awq-int4               <m>.qweight, .qzeros, .scales; {quant_method "awq", version "gemm"}
//   ct-int4 / ct-int8      <m>.weight_packed, .weight_scale, .weight_shape (+ .weight_zero_point
//                          when asymmetric); {quant_method "compressed-tensors", format
//                          "pack-quantized", one config group targeting Linear}
//   fp8-block              <m>.weight (e4m3), .weight_scale_inv; {quant_method "fp8", fmt
//                          "e4m3", activation_scheme "dynamic", weight_block_size [G, G]}
//   nvfp4                  <m>.weight (e2m1 pairs), .weight_scale, .weight_scale_2,
//                          .input_scale; hf_quant_config.json {quantization: {quant_algo
//                          "NVFP4", group_size 16, exclude_modules}} (config.json unchanged)
//
// Which tensors are quantized (the rule, see quantizable_weight): `<module>.weight` where the
// module's last name component is a projection of the attention / MLP / expert blocks
// (kConvertProjectionNames: q_proj ... down_proj, w1/w2/w3, the DeepSeek MLA projections), the
// tensor is 2-D and bf16/f16/f32. Everything else — embeddings, norms, lm_head, MoE routers
// (`mlp.gate`, `shared_expert_gate`), biases, 3-D fused expert tensors — is copied unchanged
// and reported with the reason. Skipped 2-D linear modules (lm_head, routers) are written to
// the format's ignore list (ignore / modules_to_not_convert / exclude_modules) so loaders
// keep them in full precision.
//
// A weight the format cannot hold (K not divisible by the group size, N not a multiple of the
// zero-point packing, K not a multiple of 16 for NVFP4) is an error, raised before anything is
// written and naming every such tensor: a silently half-quantized checkpoint would load with
// the wrong kernels. Pick another --group-size (or -1, per-channel) instead.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "moelora/core/tensor.h"

namespace moelora::quant {

enum class ConvertFormat : uint8_t {
  gptq_int4,
  gptq_int8,
  awq_int4,
  ct_int4,
  ct_int8,
  fp8_block,
  nvfp4
};

// "gptq-int4", ... as the --format option spells them.
const char* convert_format_name(ConvertFormat f);
std::vector<std::string> convert_format_names();
// Throws for an unknown name, listing the known ones.
ConvertFormat parse_convert_format(const std::string& name);

// Last module-name components that are quantized.
extern const std::vector<std::string> kConvertProjectionNames;

// Why the tensor `name` (safetensors dtype string and shape) is copied unchanged, or nullopt
// when the rule above quantizes it.
std::optional<std::string> quantizable_weight(const std::string& name, const std::string& dtype,
                                              const Shape& shape);

struct ConvertOptions {
  std::string in_dir;
  std::string out_dir;  // created; must not exist or be empty, and differ from in_dir
  ConvertFormat format = ConvertFormat::gptq_int4;
  // 0: the format's default (128; 16 for nvfp4). -1: per-channel (gptq, awq, ct). For
  // fp8-block it is the square block size; nvfp4 accepts only 16.
  int64_t group_size = 0;
  // Symmetric integers (gptq: zero 2^(bits-1); ct: no zero points). Asymmetric by default;
  // awq is always asymmetric, fp8 / nvfp4 always symmetric.
  bool sym = false;
  // NVFP4 has no calibration here: input_scale = input_amax / (6 * 448) is written from this
  // assumed activation range (the default gives input_scale 1). moelora's NVFP4 path keeps
  // activations in bf16 and does not read it.
  float nvfp4_input_amax = 2688.0f;
};

struct ConvertProgress {
  int64_t index = 0;  // 1-based
  int64_t total = 0;
  const std::string* name = nullptr;
  bool quantized = false;
};

struct ConvertReport {
  std::vector<std::string> quantized;                        // tensor names (".weight")
  std::vector<std::pair<std::string, std::string>> skipped;  // name, reason
  std::vector<std::string> ignored_modules;                  // written to the ignore list
  std::vector<std::string> files;                            // files written in out_dir
  uint64_t bytes_in = 0, bytes_out = 0;                      // tensor data
  std::string quantization_config;                           // the JSON written
};

// Converts the checkpoint; `progress` (optional) is called after each tensor.
ConvertReport convert_checkpoint(const ConvertOptions& options,
                                 const std::function<void(const ConvertProgress&)>& progress = {});

}  // namespace moelora::quant
