// `cuda_bf16`: bf16 expert weights, bf16 activations, on Hopper.
#include "kernels/cuda/moe_decode_layer.h"
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_gemm_config.h"
#include "moe/builtin_backends.h"
#include "moe/cuda_backend_base.h"

namespace moelora {
namespace {

class CudaBf16Backend final : public CudaMoeBackendBase {
 public:
  explicit CudaBf16Backend(Device d) : CudaMoeBackendBase(d) {}
  std::string_view name() const override { return "cuda_bf16"; }
  bool supports(const MoeProblem& p, std::string* why) const override {
    return supports_common(p, WeightFormat::bf16, why);
  }
  // The decode kernel's scratch (a few MB at most), when the shape suits it at all.
  void prepare(const MoeProblem& p) override {
    if (cuda::moe_decode_shape_supported(p.shape, nullptr))
      decode_ws_ = cuda::MoeDecodeWorkspace::allocate(p.shape, p.device);
  }
  // The whole layer in one persistent kernel for batches of up to 8 tokens
  // (moe_decode_layer.cu): bit-identical to the stages below, but slower on H100 so far (the
  // runner uses it only when MoeRunnerConfig::small_batch_max_tokens asks for it).
  bool small_batch_layer(const MoeInputs& in, const MoeWeights& w, const MoeShape& shape,
                         const RouterConfig& router, TopK& topk, Tensor& y,
                         const Stream& s) override {
    if (!decode_ws_.defined() || w.format != WeightFormat::bf16 || !in.x.defined() ||
        in.x.dim() != 2 ||
        !cuda::moe_decode_layer_supported(shape, router, in.x.size(0), nullptr))
      return false;
    cuda::moe_decode_layer(in, w, shape, router, topk, decode_ws_, y, s);
    return true;
  }

  void gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const ExpertMatrices& w13,
             Tensor& h, const Stream& s) override {
    cuda::moe_gemm1(x, top_k, plan, w13.w, h, s);
  }
  void gemm2(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
             const Tensor& sw, Tensor& o, const Stream& s) override {
    cuda::moe_gemm2(a, plan, w2.w, sw, o, s);
  }
  // gemm1 with the activation in its epilogue (no h), then gemm2 streaming its first weights
  // before it waits: its plan comes from align, two kernels back, and the fused kernel waits
  // on align before it triggers.
  void expert_mlp(const Tensor& x, int top_k, const Tensor& /*ids*/, const MoeAlignment& plan,
                  const ExpertMatrices& w13, const ExpertMatrices& w2, const Tensor& sw,
                  Tensor& /*h*/, Tensor& a, Tensor& o, const Stream& s) override {
    cuda::moe_gemm1_activation(x, top_k, plan, w13.w, a, s);
    cuda::moe_gemm2_plan_ready(a, plan, w2.w, sw, o, s);
  }

 private:
  cuda::MoeDecodeWorkspace decode_ws_;
};

}  // namespace

void register_cuda_bf16_moe_backend() {
  register_moe_backend({"cuda_bf16", Device::Kind::cuda, 10},
                       [](Device d) { return std::make_unique<CudaBf16Backend>(d); });
}

}  // namespace moelora
