// `cuda_nvfp4` MoE backend -- placeholder until the backend lands (registers nothing yet).
#include "moe/builtin_backends.h"

namespace moelora {

void register_cuda_nvfp4_moe_backend() {}

}  // namespace moelora
