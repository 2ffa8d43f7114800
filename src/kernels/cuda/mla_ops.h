// CUDA MLA ops (host-callable, no CUDA headers): same signatures and argument checks
// (kernels/mla_checks.h) as kernels/cpu/mla_ops.h. Limits of the CUDA versions (the CPU runs
// any size): mla_paged_attention keeps a cache row in registers, so L + rope <= 1024;
// mla_expanded_attention keeps a head's q and v in registers, so nope + rope <= 256 and
// vd <= 256; the LoRA ops keep r_max <= 4096. Index contents (slot mappings, token slots,
// positions, block-table entries) are not checked on the device: the caller builds them.
#pragma once

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"

namespace moelora::cuda {
#include "kernels/mla_ops.inc"
}  // namespace moelora::cuda
