// The stages every CUDA MoE backend shares whatever its weight format: routing, alignment,
// SiLU(gate)*up and the top-k reduction (bf16/f32 activations), and the tile heuristic.
// A backend for a weight format derives from it and supplies the two expert GEMMs (and,
// when it can fuse them, expert_mlp). CUDA builds only (included from *_cuda.cpp files).
#pragma once

#include <string>

#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/moe/backend.h"

namespace moelora {

class CudaMoeBackendBase : public MoeBackend {
 public:
  explicit CudaMoeBackendBase(Device d) : device_(d) {}
  Device device() const override { return device_; }
  int block_m(int64_t num_tokens, const MoeShape& shape) const override {
    return cuda::moe_block_m(num_tokens, shape);
  }

  void route(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, TopK& topk,
             const Stream& s) override {
    cuda::moe_route(logits, bias, cfg, topk, s);
  }
  void align(const Tensor& ids, MoeAlignment& plan, const Stream& s) override {
    cuda::moe_align(ids, plan, s);
  }
  // One kernel for a single token (measured in a graph at M=1: 5.2 us vs 3.1 + 2.8 for the
  // two; at M=4 the fused kernel is slower, 7.0 vs 3.3 + 3.2), the two kernels otherwise.
  void route_align(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, TopK& topk,
                   MoeAlignment& plan, const Stream& s) override {
    if (logits.dim() == 2 && logits.size(0) == 1)
      return cuda::moe_route_align(logits, bias, cfg, topk, plan, s);
    route(logits, bias, cfg, topk, s);
    align(topk.ids, plan, s);
  }
  void activation(const Tensor& h, const Tensor& ids, Tensor& a, const Stream& s) override {
    cuda::moe_activation(h, ids, a, s);
  }
  void reduce(const Tensor& o, const Tensor& ids, const Tensor& shared_o,
              const Tensor& shared_gate_logits, Tensor& y, const Stream& s) override {
    cuda::moe_reduce(o, ids, shared_o, shared_gate_logits, y, s);
  }

 protected:
  // The checks every CUDA backend makes before its format-specific ones.
  static bool supports_common(const MoeProblem& p, WeightFormat format, std::string* why) {
    if (!p.device.is_cuda()) return *why = "runs on CUDA devices only", false;
    if (p.format != format)
      return *why = std::string(format_name(format)) + " weights only", false;
    if (p.act_dtype != DType::bf16) return *why = "bf16 activations only", false;
    return cuda::moe_shape_supported(p.shape, why);
  }

 private:
  Device device_;
};

}  // namespace moelora
