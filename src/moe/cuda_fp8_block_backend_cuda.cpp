// `cuda_fp8_block` MoE backend -- placeholder until the backend lands (registers nothing yet).
#include "moe/builtin_backends.h"

namespace moelora {

void register_cuda_fp8_block_moe_backend() {}

}  // namespace moelora
