// Tile and launch choices for the CUDA MoE kernels (kept apart from device code).
#pragma once

#include <string>

#include "moelora/moe/config.h"

namespace moelora::cuda {

// Whether the CUDA kernels can tile `shape`; the reason in `why` when not.
bool moe_shape_supported(const MoeShape& shape, std::string* why);
// Tokens per alignment block for a batch of `num_tokens`.
int moe_block_m(int64_t num_tokens, const MoeShape& shape);

}  // namespace moelora::cuda
