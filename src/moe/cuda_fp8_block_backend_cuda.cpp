// `cuda_fp8_block`: fp8 block-scale expert weights (DeepSeek-V3 / FineGrainedFP8, e4m3 codes
// with an f32 scale per block_n x 128), bf16 activations quantized per token and 128
// channels (once per GEMM input, into buffers this backend owns), e4m3 tensor cores, on
// Hopper. Runs block_k = 128 with any
// block_n (checked on the weights at each GEMM: MoeProblem carries no block size); the
// `reference` backend runs every block size.
#include <algorithm>

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
  // Sizes the activation buffers for p.max_tokens, so the stages never allocate (graph
  // capture). A call larger than that grows them (allocating: not inside a capture).
  void prepare(const MoeProblem& p) override {
    if (p.max_tokens <= 0 || p.device != device()) return;
    const int64_t m = p.max_tokens;
    reserve(x_buf_, m, p.shape.hidden);
    reserve(a_buf_, m * p.shape.top_k, p.shape.inter);
    if (p.shape.shared_inter > 0) reserve(a_buf_, m, p.shape.shared_inter);
  }

  void gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const ExpertMatrices& w13,
             Tensor& h, const Stream& s) override {
    cuda::moe_gemm1_fp8(x, top_k, plan, w13, h, buffer(x_buf_, x, w13.k), s);
  }
  void gemm2(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2, const Tensor& sw,
             Tensor& o, const Stream& s) override {
    cuda::moe_gemm2_fp8(a, plan, w2, sw, o, buffer(a_buf_, a, w2.k), s);
  }
  // The inline LoRA CTAs ride in the same grids (kernels/cuda/moe_lora_inline.cuh).
  bool runs_inline_lora() const override { return true; }
  void gemm1_lora(const Tensor& x, int top_k, const MoeAlignment& plan, const ExpertMatrices& w13,
                  const MoeLoraInline& lora, Tensor& h, const Stream& s) override {
    cuda::moe_gemm1_fp8(x, top_k, plan, w13, h, buffer(x_buf_, x, w13.k), s, &lora);
  }
  void gemm2_lora(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                  const Tensor& sw, const MoeLoraInline& lora, Tensor& o,
                  const Stream& s) override {
    cuda::moe_gemm2_fp8(a, plan, w2, sw, o, buffer(a_buf_, a, w2.k), s, &lora);
  }
  // As cuda_bf16: gemm1 with the activation fused, then gemm2 (each op quantizes its input
  // first; both GEMMs stream weights before waiting on that).
  void expert_mlp(const Tensor& x, int top_k, const Tensor& /*ids*/, const MoeAlignment& plan,
                  const ExpertMatrices& w13, const ExpertMatrices& w2, const Tensor& sw,
                  Tensor& /*h*/, Tensor& a, Tensor& o, const Stream& s) override {
    cuda::moe_gemm1_fp8_activation(x, top_k, plan, w13, a, buffer(x_buf_, x, w13.k), s);
    cuda::moe_gemm2_fp8(a, plan, w2, sw, o, buffer(a_buf_, a, w2.k), s);
  }

 private:
  // Grows each part to cover rows x k as well as what it covered before.
  void reserve(cuda::Fp8ActBuffer& b, int64_t rows, int64_t k) {
    if (b.fits(rows, k)) return;
    const cuda::Fp8ActBuffer want = cuda::Fp8ActBuffer::allocate(rows, k, device());
    if (!b.q.defined() || b.q.numel() < want.q.numel()) b.q = want.q;
    if (!b.scale.defined() || b.scale.numel() < want.scale.numel()) b.scale = want.scale;
  }
  cuda::Fp8ActBuffer& buffer(cuda::Fp8ActBuffer& b, const Tensor& act, int64_t k) {
    if (act.dim() == 2) reserve(b, act.size(0), k);
    return b;
  }

  // The GEMM inputs' fp8 copies: x (gate_up) and a (down). Stream-ordered reuse: every op
  // rewrites its buffer before reading it. Sized in prepare().
  cuda::Fp8ActBuffer x_buf_, a_buf_;
};

}  // namespace

void register_cuda_fp8_block_moe_backend() {
  register_moe_backend({"cuda_fp8_block", Device::Kind::cuda, 10},
                       [](Device d) { return std::make_unique<CudaFp8BlockBackend>(d); });
}

}  // namespace moelora
