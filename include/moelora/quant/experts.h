// Quantized expert stacks (moelora::ExpertMatrices of a quantized WeightFormat): built from the
// checkpoint tensors of each format, dequantized for the CPU reference, quantized from bf16 for
// tests, filled with random codes for benchmarks.
//
// The packed layout of each format is what its CUDA backend's kernels read (cuda_wna16 for
// int4/int8, cuda_fp8_block, cuda_nvfp4); it is documented beside the pack function of the
// format (src/quant/experts_*.cpp). Whatever the layout, ExpertMatrices::n / k are the logical
// sizes, and dequantize_experts() returns the values the kernels multiply.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moelora/core/stream.h"
#include "moelora/moe/types.h"
#include "moelora/quant/awq.h"
#include "moelora/quant/compressed_tensors.h"
#include "moelora/quant/fp8_block.h"
#include "moelora/quant/gptq.h"
#include "moelora/quant/nvfp4.h"

namespace moelora::quant {

// --- from checkpoint tensors (host tensors in, host ExpertMatrices out; .to(device) after) ---
// parts[g] lists the checkpoint matrices of group (expert) g stacked along N, e.g. {gate, up}
// for w13 or {down} for w2; every part of every group must share K and the quantization
// settings. All groups must agree on N. `name` names the stack in errors.
// int4 / int8 (cuda_wna16). Act-order (non-monotonic g_idx) is kept as a per-group input
// permutation: parts of one group must then share their g_idx (true of GPTQ's gate and up,
// whose order comes from the same input statistics); differing g_idx is an error.
ExpertMatrices pack_gptq_experts(const std::vector<std::vector<GptqTensors>>& parts,
                                 const GptqConfig& cfg, const std::string& name);
ExpertMatrices pack_awq_experts(const std::vector<std::vector<AwqTensors>>& parts,
                                const AwqConfig& cfg, const std::string& name);
ExpertMatrices pack_ct_experts(const std::vector<std::vector<CtPackTensors>>& parts,
                               const CtPackConfig& cfg, const std::string& name);
// fp8 block-scale (cuda_fp8_block).
ExpertMatrices pack_fp8_block_experts(const std::vector<std::vector<Fp8BlockTensors>>& parts,
                                      const Fp8BlockConfig& cfg, const std::string& name);
// NVFP4 (cuda_nvfp4). Parts of one group may have different weight_scale_2; the pack folds
// them so that one global scale per group remains (documented in experts_nvfp4.cpp).
ExpertMatrices pack_nvfp4_experts(const std::vector<std::vector<Nvfp4Tensors>>& parts,
                                  const std::string& name);

// --- for tests and benchmarks ---
// Which checkpoint format quantize_experts() goes through for int4 / int8.
enum class IntSource : uint8_t { gptq, awq, ct };
struct QuantizeOptions {
  WeightFormat format = WeightFormat::int4;
  IntSource source = IntSource::gptq;  // int4/int8 only (awq: int4 only)
  int64_t group_size = 128;            // int4/int8: 32, 64, 128 or -1 (per channel);
                                       // fp8_block: the square block; nvfp4: 16
  bool sym = true;                     // int4/int8: symmetric (no zero points)
  bool act_order = false;              // int4/int8 gptq/ct: random per-group permutation
  uint64_t seed = 0;                   // for the act-order permutation
};
// Quantizes a host bf16/f32 stack [G, N, K] with the format's round-to-nearest quantizer (per
// group, through the real checkpoint tensors) and packs it. The result is on the host.
ExpertMatrices quantize_experts(const Tensor& w, const QuantizeOptions& opt);
// f32 [G, N, K] on the host: the dequantized values by the format's definition. Accepts a
// stack on any device (copies it to the host first).
Tensor dequantize_experts(const ExpertMatrices& w);
// A stack of random codes and plausible scales (weights of magnitude ~amax) in the packed
// layout, made on `device` without host round trips: for benchmarks of real-size layers.
ExpertMatrices random_experts(WeightFormat format, int64_t groups, int64_t n, int64_t k,
                              int64_t group_size, float amax, uint64_t seed, Device device,
                              const Stream& stream);

}  // namespace moelora::quant
