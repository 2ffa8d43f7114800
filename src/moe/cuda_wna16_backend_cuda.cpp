// `cuda_wna16`: int4 / int8 expert weights (GPTQ, AWQ, compressed-tensors, packed by
// quant/experts_wna16.cpp) with bf16 activations, dequantized in registers, on Hopper. Group
// sizes 32 / 64 / 128 / per-channel, symmetric or with zero points, act-order; the group size
// is checked on the weights at each GEMM (MoeProblem carries none) and the `reference`
// backend runs the others. LoRA goes through the hooks unchanged: gemm1 writes h f32 and gemm2
// o f32 rows exactly as cuda_bf16's do.
#include <algorithm>

#include "kernels/cuda/moe_wna16_ops.h"
#include "moe/builtin_backends.h"
#include "moe/cuda_backend_base.h"

namespace moelora {
namespace {

class CudaWna16Backend final : public CudaMoeBackendBase {
 public:
  explicit CudaWna16Backend(Device d) : CudaMoeBackendBase(d) {}
  std::string_view name() const override { return "cuda_wna16"; }
  // One MMA column of tokens per block while experts average <= 8 tokens (up to batch 128 on
  // qwen3-30b-a3b), even if a busy expert then takes 2-3 blocks: the 8-token tiles stream int4
  // weights far faster than wide ones (H100, int4 layer: batch 64 397 -> 260 us, 128
  // 407 -> 341 us; bench/NOTES.md). Past that, the shared heuristic.
  int block_m(int64_t num_tokens, const MoeShape& shape) const override {
    const double mean = double(num_tokens) * std::max(shape.top_k, 1) / std::max(shape.num_experts, 1);
    return mean <= 8.0 ? 8 : CudaMoeBackendBase::block_m(num_tokens, shape);
  }
  bool supports(const MoeProblem& p, std::string* why) const override {
    if (p.format != WeightFormat::int4 && p.format != WeightFormat::int8) {
      *why = std::string("int4 / int8 weights only (found ") + format_name(p.format) +
             "; cuda_bf16, cuda_fp8_block and cuda_nvfp4 run the other formats)";
      return false;
    }
    return supports_common(p, p.format, why);
  }

  void gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const ExpertMatrices& w13,
             Tensor& h, const Stream& s) override {
    cuda::moe_gemm1_wna16(x, top_k, plan, w13, h, s);
  }
  void gemm2(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
             const Tensor& sw, Tensor& o, const Stream& s) override {
    cuda::moe_gemm2_wna16(a, plan, w2, sw, o, s);
  }
  // As cuda_bf16: gemm1 with the activation in its epilogue (when gate and up rows start on
  // tile boundaries), then gemm2 streaming its weights before it waits (the plan is two
  // kernels old). Bit-identical to the staged path.
  void expert_mlp(const Tensor& x, int top_k, const Tensor& ids, const MoeAlignment& plan,
                  const ExpertMatrices& w13, const ExpertMatrices& w2, const Tensor& sw,
                  Tensor& h, Tensor& a, Tensor& o, const Stream& s) override {
    if (!cuda::moe_wna16_fused_supported(w13))
      return MoeBackend::expert_mlp(x, top_k, ids, plan, w13, w2, sw, h, a, o, s);
    cuda::moe_gemm1_activation_wna16(x, top_k, plan, w13, a, s);
    cuda::moe_gemm2_wna16_plan_ready(a, plan, w2, sw, o, s);
  }
};

}  // namespace

void register_cuda_wna16_moe_backend() {
  register_moe_backend({"cuda_wna16", Device::Kind::cuda, 10},
                       [](Device d) { return std::make_unique<CudaWna16Backend>(d); });
}

}  // namespace moelora
