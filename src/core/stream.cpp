#include "moelora/core/stream.h"

#include <utility>

#include "moelora/core/error.h"

#ifdef MOELORA_WITH_CUDA
#include "core/cuda_check.h"
#endif

namespace moelora {

#ifdef MOELORA_WITH_CUDA
bool built_with_cuda() {
  return true;
}
bool cuda_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}
#else
bool built_with_cuda() {
  return false;
}
bool cuda_available() {
  return false;
}
#endif

namespace {
[[noreturn, maybe_unused]] void no_cuda() {
  MOELORA_THROW("CUDA requested, but moelora was built without CUDA");
}
}  // namespace

Stream Stream::create(Device device, StreamPriority priority) {
  Stream s;
  s.device_ = device;
  if (device.is_cpu()) return s;
#ifdef MOELORA_WITH_CUDA
  MOELORA_CUDA_CHECK(cudaSetDevice(device.index));
  cudaStream_t h = nullptr;
  int least = 0, greatest = 0;
  MOELORA_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  MOELORA_CUDA_CHECK(cudaStreamCreateWithPriority(
      &h, cudaStreamNonBlocking, priority == StreamPriority::high ? greatest : least));
  s.handle_ = h;
  s.owned_ = true;
  return s;
#else
  (void)priority;
  no_cuda();
#endif
}

Stream Stream::wrap(Device device, void* cuda_stream) {
  Stream s;
  s.device_ = device;
  s.handle_ = cuda_stream;
  s.owned_ = false;
  return s;
}

Stream::~Stream() {
#ifdef MOELORA_WITH_CUDA
  if (owned_ && handle_) cudaStreamDestroy(static_cast<cudaStream_t>(handle_));
#endif
}

Stream::Stream(Stream&& o) noexcept
    : device_(o.device_),
      handle_(std::exchange(o.handle_, nullptr)),
      owned_(std::exchange(o.owned_, false)) {}

Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    Stream tmp(std::move(*this));
    device_ = o.device_;
    handle_ = std::exchange(o.handle_, nullptr);
    owned_ = std::exchange(o.owned_, false);
  }
  return *this;
}

void Stream::synchronize() const {
  if (device_.is_cpu()) return;
#ifdef MOELORA_WITH_CUDA
  MOELORA_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(handle_)));
#endif
}

void Stream::wait(const Event& event) const {
  if (device_.is_cpu()) return;
#ifdef MOELORA_WITH_CUDA
  MOELORA_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(handle_),
                                         static_cast<cudaEvent_t>(event.handle()), 0));
#else
  (void)event;
#endif
}

Event Event::create(Device device, bool timing) {
  Event e;
  e.device_ = device;
  if (device.is_cpu()) return e;
#ifdef MOELORA_WITH_CUDA
  MOELORA_CUDA_CHECK(cudaSetDevice(device.index));
  cudaEvent_t h = nullptr;
  MOELORA_CUDA_CHECK(
      cudaEventCreateWithFlags(&h, timing ? cudaEventDefault : cudaEventDisableTiming));
  e.handle_ = h;
  return e;
#else
  (void)timing;
  no_cuda();
#endif
}

Event::~Event() {
#ifdef MOELORA_WITH_CUDA
  if (handle_) cudaEventDestroy(static_cast<cudaEvent_t>(handle_));
#endif
}

Event::Event(Event&& o) noexcept : device_(o.device_), handle_(std::exchange(o.handle_, nullptr)) {}

Event& Event::operator=(Event&& o) noexcept {
  if (this != &o) {
    Event tmp(std::move(*this));
    device_ = o.device_;
    handle_ = std::exchange(o.handle_, nullptr);
  }
  return *this;
}

void Event::record(const Stream& stream) const {
  if (device_.is_cpu()) return;
#ifdef MOELORA_WITH_CUDA
  MOELORA_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(handle_),
                                     static_cast<cudaStream_t>(stream.handle())));
#else
  (void)stream;
#endif
}

void Event::synchronize() const {
  if (device_.is_cpu()) return;
#ifdef MOELORA_WITH_CUDA
  MOELORA_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(handle_)));
#endif
}

float Event::elapsed_ms(const Event& start, const Event& stop) {
  MOELORA_CHECK(start.device_.is_cuda() && stop.device_.is_cuda(),
                "Event::elapsed_ms needs two CUDA events");
#ifdef MOELORA_WITH_CUDA
  float ms = 0;
  MOELORA_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.handle_),
                                          static_cast<cudaEvent_t>(stop.handle_)));
  return ms;
#else
  no_cuda();
#endif
}

}  // namespace moelora
