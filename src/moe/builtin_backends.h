// Registration of the backends compiled into the library (internal).
#pragma once

namespace moelora {

void register_builtin_moe_backends();
void register_reference_moe_backend();  // kernels/cpu: always built
#ifdef MOELORA_WITH_CUDA
void register_cuda_bf16_moe_backend();  // kernels/cuda
void register_cuda_wna16_moe_backend();
void register_cuda_fp8_block_moe_backend();
void register_cuda_nvfp4_moe_backend();
#endif

}  // namespace moelora
