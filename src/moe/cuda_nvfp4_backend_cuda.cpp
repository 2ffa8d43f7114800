// `cuda_nvfp4`: NVFP4 (ModelOpt e2m1 + e4m3 per 16 + f32 global) expert weights, bf16
// activations, dequantized in the kernel on Hopper (kernels/cuda/sm90_moe_gemm_nvfp4.cuh).
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_nvfp4_ops.h"
#include "moe/builtin_backends.h"
#include "moe/cuda_backend_base.h"

namespace moelora {
namespace {

class CudaNvfp4Backend final : public CudaMoeBackendBase {
 public:
  explicit CudaNvfp4Backend(Device d) : CudaMoeBackendBase(d) {}
  std::string_view name() const override { return "cuda_nvfp4"; }
  bool supports(const MoeProblem& p, std::string* why) const override {
    if (!supports_common(p, WeightFormat::nvfp4, why)) return false;
    // NVFP4 scales blocks of 16 along K (hidden for gate_up, intermediate for down); the
    // kernel pads K to 64 and N to 16 itself.
    for (auto [k, what] : {std::pair{p.shape.hidden, "hidden size"},
                           std::pair{p.shape.inter, "expert intermediate size"},
                           std::pair{p.shape.shared_inter, "shared intermediate size"}})
      if (k % 16 != 0) {
        *why = std::string(what) + " " + std::to_string(k) +
               " is not a multiple of 16 (the NVFP4 block); the `reference` backend runs any "
               "size on the CPU";
        return false;
      }
    return true;
  }

  void gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const ExpertMatrices& w13,
             Tensor& h, const Stream& s) override {
    cuda::moe_gemm1_nvfp4(x, top_k, plan, w13, h, s);
  }
  void gemm2(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
             const Tensor& sw, Tensor& o, const Stream& s) override {
    cuda::moe_gemm2_nvfp4(a, plan, w2, sw, o, s);
  }
  // The activation fused into gemm1's epilogue (bit-identical to the staged path), then gemm2
  // streaming weights before waiting (its plan is two kernels old, as in cuda_bf16).
  void expert_mlp(const Tensor& x, int top_k, const Tensor& ids, const MoeAlignment& plan,
                  const ExpertMatrices& w13, const ExpertMatrices& w2, const Tensor& sw,
                  Tensor& h, Tensor& a, Tensor& o, const Stream& s) override {
    if (!cuda::moe_gemm1_nvfp4_fusable(w13))
      return MoeBackend::expert_mlp(x, top_k, ids, plan, w13, w2, sw, h, a, o, s);
    cuda::moe_gemm1_activation_nvfp4(x, top_k, plan, w13, a, s);
    cuda::moe_gemm2_nvfp4(a, plan, w2, sw, o, s, /*plan_ready=*/true);
  }
};

}  // namespace

void register_cuda_nvfp4_moe_backend() {
  register_moe_backend({"cuda_nvfp4", Device::Kind::cuda, 10},
                       [](Device d) { return std::make_unique<CudaNvfp4Backend>(d); });
}

}  // namespace moelora
