// Helpers for the GPU op tests: device copies, poisoning, host mirrors of plans.
#pragma once

#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "moelora/core/device.h"
#include "moelora/core/graph.h"
#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"
#include "moelora/moe/types.h"
#include "test_util.h"

namespace moelora::test {

// 0xFF bytes: NaN for f32/bf16, -1 for i32; 0x7F bytes: a large positive i32 (0x7F7F7F7F).
inline constexpr uint8_t kPoisonFloat = 0xFF;
inline constexpr uint8_t kPoisonInt = 0x7F;
inline constexpr int32_t kPoisonIntValue = 0x7F7F7F7F;

// Stream-less copies and memsets run on the legacy default stream, which does not order with
// the non-blocking streams the ops run on (and a pageable cudaMemcpy may return before its
// DMA lands): the helpers below finish their device work before returning.
inline void device_sync() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

inline Tensor poisoned(const Shape& shape, DType dtype, Device device, uint8_t byte) {
  Tensor t = Tensor::empty(shape, dtype, device);
  t.fill_bytes(byte);
  if (device.is_cuda()) device_sync();
  return t;
}

inline Tensor to_gpu(const Tensor& t) {
  Tensor d = t.to(Device::cuda());
  device_sync();
  return d;
}

// A plan allocated like the runner does, every tensor poisoned with 0x7F.
inline MoeAlignment poisoned_plan(int64_t slots, int groups, int block_m, Device d) {
  MoeAlignment p = MoeAlignment::allocate(slots, groups, kMaxBlockM, d);
  p.block_m = block_m;
  for (Tensor* t : {&p.sorted_slots, &p.block_group, &p.num_padded, &p.group_offsets})
    t->fill_bytes(kPoisonInt);
  if (d.is_cuda()) device_sync();
  return p;
}

// A host copy of a device plan (same sizes), for feeding the CPU reference the GPU's plan.
inline MoeAlignment host_copy(const MoeAlignment& p) {
  MoeAlignment h = p;
  h.sorted_slots = p.sorted_slots.to(Device::cpu());
  h.block_group = p.block_group.to(Device::cpu());
  h.num_padded = p.num_padded.to(Device::cpu());
  h.group_offsets = p.group_offsets.to(Device::cpu());
  return h;
}

inline std::vector<uint16_t> raw_bits16(const Tensor& t0) {
  const Tensor t = t0.device().is_cpu() ? t0 : t0.to(Device::cpu());
  std::vector<uint16_t> v(size_t(t.numel()));
  std::memcpy(v.data(), t.data(), v.size() * 2);
  return v;
}

inline std::vector<uint32_t> raw_bits32(const Tensor& t0) {
  const Tensor t = t0.device().is_cpu() ? t0 : t0.to(Device::cpu());
  std::vector<uint32_t> v(size_t(t.numel()));
  std::memcpy(v.data(), t.data(), v.size() * 4);
  return v;
}

// Median milliseconds of one replay of the graph `body` enqueues on `s` (for the disabled perf
// tests): `body` runs once eagerly first (one-time kernel attributes), then is captured once;
// `warmup` replays are dropped, `timed` replays measured with events.
inline double graph_replay_median_ms(const Stream& s, const std::function<void()>& body,
                                     int warmup, int timed) {
  body();
  s.synchronize();
  const CudaGraph graph = CudaGraph::capture(s, body);
  Event start = Event::create(s.device()), stop = Event::create(s.device());
  std::vector<float> ms;
  for (int i = 0; i < warmup + timed; ++i) {
    start.record(s);
    graph.replay(s);
    stop.record(s);
    stop.synchronize();
    if (i >= warmup) ms.push_back(Event::elapsed_ms(start, stop));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace moelora::test
