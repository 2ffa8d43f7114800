#include "moelora/core/allocator.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

#include "moelora/core/error.h"

#ifdef MOELORA_WITH_CUDA
#include "core/cuda_check.h"
#endif

namespace moelora {
namespace {

// Bins: small blocks round up to 512 B, large ones to 2 MiB, so a freed block serves any
// later request of the same rounded size.
size_t round_size(size_t bytes) {
  constexpr size_t kSmall = 512, kLarge = size_t(2) << 20;
  if (bytes == 0) bytes = 1;
  return bytes < (size_t(1) << 20) ? (bytes + kSmall - 1) / kSmall * kSmall
                                   : (bytes + kLarge - 1) / kLarge * kLarge;
}

#ifdef MOELORA_WITH_CUDA
class CudaCachingAllocator {
 public:
  void* allocate(size_t bytes, int device) {
    const size_t size = round_size(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    auto& bin = free_[{device, size}];
    Stats& s = stats_[device];
    if (!bin.empty()) {
      void* p = bin.back();
      bin.pop_back();
      s.bytes_cached -= size;
      s.bytes_in_use += size;
      return p;
    }
    int prev = 0;
    MOELORA_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != device) MOELORA_CUDA_CHECK(cudaSetDevice(device));
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, size);
    if (err == cudaErrorMemoryAllocation) {  // give the cache back and try once more
      (void)cudaGetLastError();
      release_locked();
      err = cudaMalloc(&p, size);
    }
    if (prev != device) cudaSetDevice(prev);
    MOELORA_CHECK(err == cudaSuccess, "cudaMalloc of {} bytes on cuda:{} failed: {}", size,
                  device, cudaGetErrorString(err));
    s.bytes_in_use += size;
    s.num_device_mallocs++;
    return p;
  }

  void free(void* p, size_t bytes, int device) {
    const size_t size = round_size(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    free_[{device, size}].push_back(p);
    stats_[device].bytes_in_use -= size;
    stats_[device].bytes_cached += size;
  }

  AllocatorStats stats(int device) {
    std::lock_guard<std::mutex> lock(mutex_);
    const Stats& s = stats_[device];
    return {s.bytes_in_use, s.bytes_cached, s.num_device_mallocs};
  }

  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_locked();
  }

 private:
  struct Stats {
    size_t bytes_in_use = 0, bytes_cached = 0, num_device_mallocs = 0;
  };
  void release_locked() {
    for (auto& [key, bin] : free_) {
      for (void* p : bin) cudaFree(p);
      stats_[key.first].bytes_cached -= key.second * bin.size();
      bin.clear();
    }
  }
  std::mutex mutex_;
  std::map<std::pair<int, size_t>, std::vector<void*>> free_;
  std::map<int, Stats> stats_;
};

// Never destroyed: tensors freed during static destruction must still find it, and the
// driver reclaims device memory at exit anyway.
CudaCachingAllocator& cuda_allocator() {
  static auto* a = new CudaCachingAllocator();
  return *a;
}
#endif

}  // namespace

void* device_allocate(size_t bytes, Device device) {
  if (device.is_cpu()) {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    MOELORA_CHECK(p != nullptr, "host allocation of {} bytes failed", bytes);
    return p;
  }
#ifdef MOELORA_WITH_CUDA
  return cuda_allocator().allocate(bytes, device.index);
#else
  MOELORA_THROW("device {} requested, but moelora was built without CUDA", device.str());
#endif
}

void device_free(void* ptr, size_t bytes, Device device) {
  if (ptr == nullptr) return;
  if (device.is_cpu()) {
    std::free(ptr);
    return;
  }
#ifdef MOELORA_WITH_CUDA
  cuda_allocator().free(ptr, bytes, device.index);
#else
  (void)bytes;
#endif
}

AllocatorStats cuda_allocator_stats(int device_index) {
#ifdef MOELORA_WITH_CUDA
  return cuda_allocator().stats(device_index);
#else
  (void)device_index;
  return {};
#endif
}

void cuda_allocator_release_cached() {
#ifdef MOELORA_WITH_CUDA
  cuda_allocator().release();
#endif
}

}  // namespace moelora
