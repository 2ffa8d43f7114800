// `cuda_wna16` MoE backend -- placeholder until the backend lands (registers nothing yet).
#include "moe/builtin_backends.h"

namespace moelora {

void register_cuda_wna16_moe_backend() {}

}  // namespace moelora
