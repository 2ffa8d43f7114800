// The LoRA kernels a device offers to the MoE hooks (internal). CPU and CUDA ops share
// signatures (kernels/moe_ops.inc), so one table type serves both.
#pragma once

#include "kernels/cpu/moe_ops.h"

namespace moelora {

struct MoeLoraKernels {
  decltype(&cpu::moe_lora_group_ids) group_ids;
  decltype(&cpu::moe_align) align;
  decltype(&cpu::moe_lora_shrink) shrink;
  decltype(&cpu::moe_lora_expand) expand;
  decltype(&cpu::moe_lora_block_m) block_m;
};

const MoeLoraKernels& cpu_moe_lora_kernels();
#ifdef MOELORA_WITH_CUDA
const MoeLoraKernels& cuda_moe_lora_kernels();
#endif

}  // namespace moelora
