// RAII wrappers for CUDA streams and events. On the CPU a Stream is a no-op handle, so the
// same op signatures serve both backends (CPU work is synchronous).
#pragma once

#include "moelora/core/device.h"

namespace moelora {

class Event;

// CUDA stream priority. `high` is the device's greatest priority: the CTAs of its pending
// kernels are dispatched before those of normal-priority kernels as SM room frees up (so a
// short side-stream kernel need not wait for a large grid's tail). Kept inside CUDA graphs:
// CudaGraph instantiates with per-node priorities and the launch helpers tag each kernel.
enum class StreamPriority { normal, high };

class Stream {
 public:
  // The CPU "stream": work runs synchronously on the calling thread.
  Stream() = default;
  // A new non-blocking CUDA stream on `device` (owned), or the CPU stream.
  static Stream create(Device device, StreamPriority priority = StreamPriority::normal);
  // Wraps an existing cudaStream_t (not owned). nullptr is the legacy default stream.
  static Stream wrap(Device device, void* cuda_stream);
  ~Stream();
  Stream(Stream&& other) noexcept;
  Stream& operator=(Stream&& other) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  Device device() const { return device_; }
  // The cudaStream_t, as void* so this header needs no CUDA include.
  void* handle() const { return handle_; }
  void synchronize() const;
  // Makes later work on this stream wait for `event`.
  void wait(const Event& event) const;

 private:
  Device device_ = Device::cpu();
  void* handle_ = nullptr;
  bool owned_ = false;
};

class Event {
 public:
  Event() = default;
  // timing=false creates a cheaper event for ordering only.
  static Event create(Device device, bool timing = true);
  ~Event();
  Event(Event&& other) noexcept;
  Event& operator=(Event&& other) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void record(const Stream& stream) const;
  void synchronize() const;
  // Milliseconds between two recorded (and completed) events.
  static float elapsed_ms(const Event& start, const Event& stop);
  void* handle() const { return handle_; }

 private:
  Device device_ = Device::cpu();
  void* handle_ = nullptr;
};

}  // namespace moelora
