#include "model/step_output.h"

#include <algorithm>

#include "model/ops.h"

#ifdef MOELORA_WITH_CUDA
#include <cuda_runtime_api.h>

#include "core/cuda_check.h"
#endif

namespace moelora {

Tensor StepBuffer::get(int64_t rows, int64_t cols, DType dtype, Device device) {
  const int64_t need = rows * cols;
  if (!storage_.defined() || storage_.dtype() != dtype || storage_.device() != device ||
      storage_.numel() < need) {
    storage_ = Tensor::empty({std::max<int64_t>(need, 1)}, dtype, device);
    ++*moves_;
  }
  return storage_.narrow(0, 0, need).view({rows, cols});
}

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

StepOutput::StepOutput(StepBuffer& buffer, Device device, int64_t tokens, int64_t seqs,
                       int64_t vocab, int64_t moe_layers, bool all_logits)
    : device_(device), m_(tokens), s_(seqs), v_(vocab), nm_(moe_layers), all_(all_logits) {
  const int64_t all_n = all_ ? m_ * v_ : 0, out_n = all_n + s_ * v_ + m_ * nm_;
  out_ = device_.is_cpu() ? Tensor::empty({out_n}, DType::f32)
                          : buffer.get(1, out_n, DType::f32, device_).view({out_n});
  all_lg_ = out_.narrow(0, 0, all_n).view({all_ ? m_ : 0, v_});
  last_lg_ = out_.narrow(0, all_n, s_ * v_).view({s_, v_});
  margin_ = out_.narrow(0, all_n + s_ * v_, m_ * nm_).view({m_, nm_});
}

void StepOutput::compute_logits(const Tensor& h, const Tensor& last_row, const Tensor& final_norm,
                                const Tensor& lm_head, float eps, Tensor& xn, StepBuffer& last_h,
                                StepBuffer& last_n, const Stream& stream) {
  if (all_) {
    ops::rms_norm(h, final_norm, eps, xn, stream);
    ops::linear(xn, lm_head, all_lg_, stream);
    ops::gather_rows(all_lg_, last_row, last_lg_, stream);
    return;
  }
  const int64_t H = h.size(1);
  Tensor hl = last_h.get(s_, H, DType::f32, device_);
  Tensor nl = last_n.get(s_, H, DType::f32, device_);
  ops::gather_rows(h, last_row, hl, stream);
  ops::rms_norm(hl, final_norm, eps, nl, stream);
  ops::linear(nl, lm_head, last_lg_, stream);
}

StepResult StepOutput::finish(ResultDownload& download, const Stream& stream) {
  const Tensor out = device_.is_cuda() ? download.fetch(out_, stream) : out_;
  const int64_t all_n = all_ ? m_ * v_ : 0;
  StepResult r;
  if (all_) r.all_logits = out.narrow(0, 0, all_n).view({m_, v_});
  r.last_logits = out.narrow(0, all_n, s_ * v_).view({s_, v_});
  r.router_margin = out.narrow(0, all_n + s_ * v_, m_ * nm_).view({m_, nm_});
  return r;
}

}  // namespace moelora
