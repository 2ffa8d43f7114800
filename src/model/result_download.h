// A step's results back to the host (internal; used by the model families on CUDA).
#pragma once

#include <memory>

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"

namespace moelora {

// Device -> host into pinned memory the model recycles: the returned tensor lives in a pinned
// buffer that is reused by the next fetch once the caller has dropped every tensor of it (the
// buffer's owner count says so) and replaced by a fresh one otherwise. A pageable destination
// cost bench decode 48 ms for the 78 MB of logits of a 128-sequence step (staged copies, and
// first-touch page faults of a new host tensor every step). Synchronizes `stream`.
class ResultDownload {
 public:
  Tensor fetch(const Tensor& src, const Stream& stream);

 private:
  std::shared_ptr<void> pinned_;
  size_t capacity_ = 0;
};

}  // namespace moelora
