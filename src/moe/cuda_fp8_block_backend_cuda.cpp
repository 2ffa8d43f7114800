// `cuda_fp8_block`: fp8 block-scale expert weights (DeepSeek-V3 / FineGrainedFP8, e4m3 codes
// with an f32 scale per block_n x 128), bf16 activations quantized per token and 128
// channels inside the GEMMs, e4m3 tensor cores, on Hopper. Runs block_k = 128 with any
// block_n (checked on the weights at each GEMM: MoeProblem carries no block size); the
// `reference` backend runs every block size.
#include "kernels/cuda/moe_fp8_ops.h"
#include "moe/builtin_backends.h"
#include "moe/cuda_backend_base.h"

namespace moelora {
namespace {

class CudaFp8BlockBackend final : public CudaMoeBackendBase {
 public:
  explicit CudaFp8BlockBackend(Device d) : CudaMoeBackendBase(d) {}
  std::string_view name() const override { return "cuda_fp8_block"; }
  bool supports(const MoeProblem& p, std::string* why) const override {
    if (!supports_common(p, WeightFormat::fp8_block, why)) return false;
    // Reduction lengths H (gate_up) and I / shared I (down): 16-byte rows of e4m3 codes.
    for (int64_t k : {int64_t(p.shape.hidden), int64_t(p.shape.inter)})
      if (!cuda::moe_fp8_stack_supported(128, 128, k, why)) return false;
    if (p.shape.shared_inter > 0 &&
        !cuda::moe_fp8_stack_supported(128, 128, p.shape.shared_inter, why))
      return false;
    return true;
  }

  void gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const ExpertMatrices& w13,
             Tensor& h, const Stream& s) override {
    cuda::moe_gemm1_fp8(x, top_k, plan, w13, h, s);
  }
  void gemm2(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
             const Tensor& sw, Tensor& o, const Stream& s) override {
    cuda::moe_gemm2_fp8(a, plan, w2, sw, o, s);
  }
  // As cuda_bf16: gemm1 with the activation fused, then gemm2 streaming its weights before it
  // waits (the plan is two kernels old).
  void expert_mlp(const Tensor& x, int top_k, const Tensor& /*ids*/, const MoeAlignment& plan,
                  const ExpertMatrices& w13, const ExpertMatrices& w2, const Tensor& sw,
                  Tensor& /*h*/, Tensor& a, Tensor& o, const Stream& s) override {
    cuda::moe_gemm1_fp8_activation(x, top_k, plan, w13, a, s);
    cuda::moe_gemm2_fp8_plan_ready(a, plan, w2, sw, o, s);
  }
};

}  // namespace

void register_cuda_fp8_block_moe_backend() {
  register_moe_backend({"cuda_fp8_block", Device::Kind::cuda, 10},
                       [](Device d) { return std::make_unique<CudaFp8BlockBackend>(d); });
}

}  // namespace moelora
