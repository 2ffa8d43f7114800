// The per-step plumbing every model family shares (internal): reused step buffers, and what a
// forward step hands back (the final norm, lm_head, the one-buffer result layout and its
// download).
#pragma once

#include <memory>

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"
#include "moelora/model/model.h"

namespace moelora {

// A buffer reused by every step: get() hands out a [rows, cols] view, reallocating only when
// a step needs more than any before (the models size them for max_step_tokens at load), so
// decode steps allocate nothing (issue 5 captures them in CUDA graphs).
class StepBuffer {
 public:
  // `moves` counts this buffer's reallocations (with its workspace's other buffers).
  explicit StepBuffer(uint64_t& moves) : moves_(&moves) {}
  StepBuffer(const StepBuffer&) = delete;
  StepBuffer& operator=(const StepBuffer&) = delete;
  Tensor get(int64_t rows, int64_t cols, DType dtype, Device device);

 private:
  Tensor storage_;  // 1-d
  uint64_t* moves_;
};

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

// What one step hands back, in one f32 buffer on the model's device (one download on CUDA):
// the logits of every new token (all_logits only), those of each sequence's last token, and
// the router margins [M, moe_layers] that each MoE layer writes a column of.
class StepOutput {
 public:
  StepOutput(StepBuffer& buffer, Device device, int64_t tokens, int64_t seqs, int64_t vocab,
             int64_t moe_layers, bool all_logits);

  Tensor& margin() { return margin_; }

  // The logits from the residual stream h [M, H]: final RMSNorm and lm_head over every row
  // (all_logits; xn is the [M, H] scratch) or over each sequence's last row (last_row i32 [S];
  // last_h / last_n hold the [S, H] gathered rows).
  void compute_logits(const Tensor& h, const Tensor& last_row, const Tensor& final_norm,
                      const Tensor& lm_head, float eps, Tensor& xn, StepBuffer& last_h,
                      StepBuffer& last_n, const Stream& stream);

  // The StepResult, as host tensors (through `download` on CUDA).
  StepResult finish(ResultDownload& download, const Stream& stream);

 private:
  Device device_;
  int64_t m_, s_, v_, nm_;
  bool all_;
  Tensor out_, all_lg_, last_lg_, margin_;
};

}  // namespace moelora
