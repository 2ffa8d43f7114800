#include "kernels/cuda/moe_ops.h"
#include "lora/moe_lora_kernels.h"

namespace moelora {

const MoeLoraKernels& cuda_moe_lora_kernels() {
  static const MoeLoraKernels k{&cuda::moe_lora_group_ids, &cuda::moe_align,
                                &cuda::moe_lora_shrink, &cuda::moe_lora_expand,
                                &cuda::moe_lora_block_m};
  return k;
}

}  // namespace moelora
