// Which quantized format a checkpoint uses, read from its JSON config as the producing tools
// write it:
//   config.json "quantization_config" (transformers-style; every format below), or the
//   standalone quantize_config.json (AutoGPTQ / GPTQModel) and hf_quant_config.json (ModelOpt).
//   gptq:                {quant_method: "gptq", bits, group_size, desc_act, sym,
//                         checkpoint_format: "gptq" | "gptq_v2"}
//   awq:                 {quant_method: "awq", bits (or w_bit), group_size (or q_group_size),
//                         zero_point: true, version: "gemm"}
//   compressed-tensors:  {quant_method: "compressed-tensors", format: "pack-quantized",
//                         config_groups: {<name>: {targets, weights: {num_bits, type: "int",
//                         symmetric, strategy: "group" | "channel", group_size, actorder}}},
//                         ignore: [...]}
//   fp8 block:           {quant_method: "fp8", fmt: "e4m3", activation_scheme: "dynamic",
//                         weight_block_size: [128, 128]}
//   nvfp4:               {quantization: {quant_algo: "NVFP4", group_size: 16,
//                         exclude_modules}} (hf_quant_config.json) or {quant_method:
//                         "modelopt", quant_algo: "NVFP4", group_size: 16}
// Anything else (other bit widths, per-tensor fp8, several compressed-tensors groups, AWQ's
// GEMV layouts) is refused with an error saying what was found and what is supported.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moelora/quant/awq.h"
#include "moelora/quant/compressed_tensors.h"
#include "moelora/quant/fp8_block.h"
#include "moelora/quant/gptq.h"

namespace moelora::quant {

enum class QuantMethod : uint8_t { gptq, awq, ct_pack, fp8_block, nvfp4 };
const char* quant_method_name(QuantMethod m);

struct QuantScheme {
  QuantMethod method = QuantMethod::gptq;
  GptqConfig gptq;           // method gptq
  AwqConfig awq;             // method awq
  CtPackConfig ct;           // method ct_pack
  bool ct_actorder = false;  // ct_pack: weight_g_idx tensors are expected
  Fp8BlockConfig fp8;        // method fp8_block
  // Modules left unquantized (ignore / modules_to_not_convert / exclude_modules), verbatim.
  std::vector<std::string> unquantized_modules;
};

// Parses the text of one of the JSON files above. `source` names it in errors.
QuantScheme parse_quant_config(const std::string& json_text, const std::string& source);

}  // namespace moelora::quant
