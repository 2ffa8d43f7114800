// Memory for tensors. Device memory goes through a caching allocator: freed blocks are kept
// in size bins and reused, so steady-state serving does no cudaMalloc/cudaFree.
#pragma once

#include <cstddef>

#include "moelora/core/device.h"

namespace moelora {

// Allocates `bytes` on `device` (64-byte aligned on the host, 256 on the device).
void* device_allocate(size_t bytes, Device device);
void device_free(void* ptr, size_t bytes, Device device);

struct AllocatorStats {
  size_t bytes_in_use = 0;     // handed out and not yet freed
  size_t bytes_cached = 0;     // held in the free lists
  size_t num_device_mallocs = 0;
};
AllocatorStats cuda_allocator_stats(int device_index = 0);
// Returns every cached block to the driver.
void cuda_allocator_release_cached();

}  // namespace moelora
