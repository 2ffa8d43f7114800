// Tensors that flow through the MoE layer: weights, routing results, the alignment plan.
#pragma once

#include <cstdint>

#include "moelora/core/tensor.h"
#include "moelora/moe/config.h"

namespace moelora {

enum class WeightFormat : uint8_t { bf16 };  // quantized formats come with their backends

// Expert weights of one layer. All tensors live on the backend's device.
struct MoeWeights {
  WeightFormat format = WeightFormat::bf16;
  Tensor w13;              // bf16 [E, 2I, H]: rows [0, I) gate, [I, 2I) up
  Tensor w2;               // bf16 [E, H, I]
  Tensor correction_bias;  // f32 [E], DeepSeek-V3 e_score_correction_bias (optional)
  Tensor shared_w13;       // bf16 [1, 2*Is, H] shared expert gate_up (optional)
  Tensor shared_w2;        // bf16 [1, H, Is]

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
