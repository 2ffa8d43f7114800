// Tensors that flow through the MoE layer: weights, routing results, the alignment plan.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "moelora/core/tensor.h"
#include "moelora/moe/config.h"

namespace moelora {

// How expert weights are stored. Activations are bf16 in every format (fp8_block quantizes
// them per token and 128 channels inside its kernels; LoRA always reads the bf16 copy).
enum class WeightFormat : uint8_t {
  bf16,
  int4,       // GPTQ / AWQ / compressed-tensors int4, group scales (+ optional zeros, act-order)
  int8,       // the same with 8-bit integers
  fp8_block,  // e4m3 weights, f32 scale per block_n x block_k (DeepSeek-V3 / FineGrainedFP8)
  nvfp4,      // e2m1 weights, e4m3 scale per 16 along K, f32 global scale per matrix
};
const char* format_name(WeightFormat f);  // "bf16", "int4", "int8", "fp8_block", "nvfp4"
// Throws listing the known names.
WeightFormat parse_weight_format(std::string_view name);

// A stack of `groups` expert matrices, each logically [n, k] in the nn.Linear layout (out
// features x in features). bf16 stacks are plain tensors. Quantized stacks hold the codes in
// the layout their backend's kernels read (built by the pack_* functions of
// moelora/quant/experts.h from checkpoint tensors); `n`/`k` are always the LOGICAL sizes,
// never a packed storage size. dequantize_experts() gives the exact values a kernel multiplies.
struct ExpertMatrices {
  WeightFormat format = WeightFormat::bf16;
  int64_t groups = 0, n = 0, k = 0;  // logical sizes
  int64_t group_k = 0;  // K elements sharing one scale (quantized formats; k for per-channel)
  int64_t group_n = 1;  // N rows sharing one scale (fp8_block's block_n, else 1)
  Tensor w;             // bf16 [groups, n, k], or the packed codes (layout: the format's pack_*)
  Tensor scales;        // quantized formats: the format's scale tensor
  Tensor zeros;         // int4/int8 with zero points (optional)
  Tensor perm;          // int4/int8 act-order: i32 [groups, k] input channel permutation (optional)
  Tensor global_scale;  // nvfp4: f32 [groups] (weight_scale_2 of each matrix)

  ExpertMatrices() = default;
  // A bf16 stack [groups, n, k] (implicit: a bf16 tensor is a complete description).
  ExpertMatrices(Tensor bf16_stack);  // NOLINT(google-explicit-constructor)

  bool defined() const { return w.defined(); }
  Device device() const { return w.device(); }
  // Checks format, logical sizes [groups, n, k] and that every tensor sits on one device;
  // `name` names the stack in errors.
  void validate(int64_t groups, int64_t n, int64_t k, const std::string& name) const;
  // A copy with every tensor on `d` (synchronous).
  ExpertMatrices to(Device d) const;
};

// Expert weights of one layer. All tensors live on the backend's device. Routed and shared
// experts use the same format.
struct MoeWeights {
  WeightFormat format = WeightFormat::bf16;
  ExpertMatrices w13;      // [E, 2I, H]: rows [0, I) gate, [I, 2I) up
  ExpertMatrices w2;       // [E, H, I]
  Tensor correction_bias;  // f32 [E], DeepSeek-V3 e_score_correction_bias (optional)
  ExpertMatrices shared_w13;  // [1, 2*Is, H] shared expert gate_up (optional)
  ExpertMatrices shared_w2;   // [1, H, Is]

  // Checks every tensor against `shape` and the format; throws naming the tensor.
  void validate(const MoeShape& shape) const;
};

// Inputs of one layer call. Router logits come from the model's gate linear (so the model can
// fuse it with other projections); the shared-expert gate logit likewise.
struct MoeInputs {
  Tensor x;                   // bf16 [M, H]
  Tensor router_logits;       // f32 [M, E]
  Tensor shared_gate_logits;  // f32 [M], only when MoeShape::shared_gate
};

// Routing result. Slot s = t*k + j is token t's j-th choice.
struct TopK {
  Tensor ids;      // i32 [M, k], -1 = expert not here
  Tensor weights;  // f32 [M, k], final weights (renormalized, scaled)
};

// Largest alignment tile a backend may ask for; workspaces are sized for it.
inline constexpr int kMaxBlockM = 128;

// Token-slots grouped by group id (expert, or virtual expert slot*E+e for LoRA) into segments
// padded to multiples of block_m. Sized for a maximum at construction; the valid prefix is
// given by num_padded (kept on the device on CUDA so graphs need no host sync).
struct MoeAlignment {
  int block_m = 0;
  int num_groups = 0;
  Tensor sorted_slots;    // i32 [capacity]: slot index, or `num_slots` (= M*k) for padding
  Tensor block_group;     // i32 [max_blocks]: group of each block; -1 past the end
  Tensor num_padded;      // i32 [1]: entries in use in sorted_slots (multiple of block_m)
  Tensor group_offsets;   // i32 [num_groups + 1]: padded start of each group's segment

  // Worst case over any routing of `num_slots` slots.
  static int64_t capacity(int64_t num_slots, int num_groups, int block_m);
  static int64_t max_blocks(int64_t num_slots, int num_groups, int block_m) {
    return capacity(num_slots, num_groups, block_m) / block_m;
  }
  // Buffers for up to `max_slots` slots and any block_m <= max_block_m on `device`.
  static MoeAlignment allocate(int64_t max_slots, int num_groups, int max_block_m, Device device);
};

// The two places where the MoE runner lets LoRA add its delta.
enum class LoraSeam : uint8_t { gate_up, down };

}  // namespace moelora
