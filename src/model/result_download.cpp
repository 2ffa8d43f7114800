#include "model/result_download.h"

#ifdef MOELORA_WITH_CUDA
#include <cuda_runtime_api.h>

#include "core/cuda_check.h"
#endif

namespace moelora {

Tensor ResultDownload::fetch(const Tensor& src, const Stream& stream) {
#ifdef MOELORA_WITH_CUDA
  if (src.device().is_cuda()) {
    const size_t bytes = src.nbytes();
    // use_count 1: only this object holds the buffer, no result of an earlier step is alive.
    if (!pinned_ || pinned_.use_count() > 1 || capacity_ < bytes) {
      pinned_.reset();
      void* p = nullptr;
      MOELORA_CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocDefault));
      pinned_ = std::shared_ptr<void>(p, [](void* q) { cudaFreeHost(q); });
      capacity_ = bytes;
    }
    Tensor host = Tensor::wrap(pinned_.get(), src.shape(), src.dtype(), Device::cpu(), pinned_);
    host.copy_from(src, &stream);
    stream.synchronize();
    return host;
  }
#endif
  Tensor host = Tensor::empty(src.shape(), src.dtype());
  host.copy_from(src, &stream);
  stream.synchronize();
  return host;
}

}  // namespace moelora
