#include "moe/builtin_backends.h"

namespace moelora {

void register_builtin_moe_backends() {
  register_reference_moe_backend();
#ifdef MOELORA_WITH_CUDA
  register_cuda_bf16_moe_backend();
  register_cuda_wna16_moe_backend();
  register_cuda_fp8_block_moe_backend();
  register_cuda_nvfp4_moe_backend();
#endif
}

}  // namespace moelora
