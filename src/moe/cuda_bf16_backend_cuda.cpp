// `cuda_bf16`: bf16 expert weights, bf16 activations, on Hopper.
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_gemm_config.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_ops.h"
#include "moe/builtin_backends.h"
#include "moelora/moe/backend.h"

namespace moelora {
namespace {

class CudaBf16Backend final : public MoeBackend {
 public:
  explicit CudaBf16Backend(Device d) : device_(d) {}
  std::string_view name() const override { return "cuda_bf16"; }
  Device device() const override { return device_; }
  bool supports(const MoeProblem& p, std::string* why) const override {
    if (!p.device.is_cuda()) return *why = "runs on CUDA devices only", false;
    if (p.format != WeightFormat::bf16) return *why = "bf16 weights only", false;
    if (p.act_dtype != DType::bf16) return *why = "bf16 activations only", false;
    return cuda::moe_shape_supported(p.shape, why);
  }
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
  void gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const Tensor& w13, Tensor& h,
             const Stream& s) override {
    cuda::moe_gemm1(x, top_k, plan, w13, h, s);
  }
  void activation(const Tensor& h, const Tensor& ids, Tensor& a, const Stream& s) override {
    cuda::moe_activation(h, ids, a, s);
  }
  void gemm2(const Tensor& a, const MoeAlignment& plan, const Tensor& w2, const Tensor& sw,
             Tensor& o, const Stream& s) override {
    cuda::moe_gemm2(a, plan, w2, sw, o, s);
  }
  // gemm1 with the activation in its epilogue (no h), then gemm2 streaming its first weights
  // before it waits: its plan comes from align, two kernels back, and the fused kernel waits
  // on align before it triggers.
  void expert_mlp(const Tensor& x, int top_k, const Tensor& /*ids*/, const MoeAlignment& plan,
                  const Tensor& w13, const Tensor& w2, const Tensor& sw, Tensor& /*h*/, Tensor& a,
                  Tensor& o, const Stream& s) override {
    cuda::moe_gemm1_activation(x, top_k, plan, w13, a, s);
    cuda::moe_gemm2_plan_ready(a, plan, w2, sw, o, s);
  }
  void reduce(const Tensor& o, const Tensor& ids, const Tensor& shared_o,
              const Tensor& shared_gate_logits, Tensor& y, const Stream& s) override {
    cuda::moe_reduce(o, ids, shared_o, shared_gate_logits, y, s);
  }

 private:
  Device device_;
};

}  // namespace

void register_cuda_bf16_moe_backend() {
  register_moe_backend({"cuda_bf16", Device::Kind::cuda, 10},
                       [](Device d) { return std::make_unique<CudaBf16Backend>(d); });
}

}  // namespace moelora
