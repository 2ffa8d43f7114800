// `reference`: the CPU backend. Every stage is the plain C++ reference op. Quantized formats
// run on their dequantized values (moelora/quant/experts.h), with fp8_block's dynamic 1 x 128
// activation quantization applied to the GEMM inputs as its kernels do; LoRA (in the hooks)
// still reads the bf16 activations.
#include "kernels/cpu/moe_ops.h"
#include "moelora/quant/experts.h"
#include "moelora/quant/fp8_block.h"
#include "moe/builtin_backends.h"
#include "moelora/moe/backend.h"

namespace moelora {
namespace {

class ReferenceBackend final : public MoeBackend {
 public:
  std::string_view name() const override { return "reference"; }
  Device device() const override { return Device::cpu(); }
  bool supports(const MoeProblem& p, std::string* why) const override {
    if (!p.device.is_cpu()) return *why = "runs on the CPU only", false;
    if (p.act_dtype != DType::bf16) return *why = "bf16 activations only", false;
    return true;
  }
  int block_m(int64_t, const MoeShape&) const override { return 1; }

  void route(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, TopK& topk,
             const Stream& s) override {
    cpu::moe_route(logits, bias, cfg, topk, s);
  }
  void align(const Tensor& ids, MoeAlignment& plan, const Stream& s) override {
    cpu::moe_align(ids, plan, s);
  }
  void gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const ExpertMatrices& w13,
             Tensor& h, const Stream& s) override {
    if (w13.format == WeightFormat::bf16) return cpu::moe_gemm1(x, top_k, plan, w13.w, h, s);
    cpu::moe_gemm1(gemm_input(x, w13), top_k, plan, quant::dequantize_experts(w13), h, s);
  }
  void activation(const Tensor& h, const Tensor& ids, Tensor& a, const Stream& s) override {
    cpu::moe_activation(h, ids, a, s);
  }
  void gemm2(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
             const Tensor& sw, Tensor& o, const Stream& s) override {
    if (w2.format == WeightFormat::bf16) return cpu::moe_gemm2(a, plan, w2.w, sw, o, s);
    cpu::moe_gemm2(gemm_input(a, w2), plan, quant::dequantize_experts(w2), sw, o, s);
  }
  void reduce(const Tensor& o, const Tensor& ids, const Tensor& shared_o,
              const Tensor& shared_gate_logits, Tensor& y, const Stream& s) override {
    cpu::moe_reduce(o, ids, shared_o, shared_gate_logits, y, s);
  }

 private:
  // What a GEMM over `w` multiplies: the bf16 input itself, or for fp8_block its dynamic
  // per-token quantization in groups of the weight's block_k (dequantized, f32).
  static Tensor gemm_input(const Tensor& in, const ExpertMatrices& w) {
    if (w.format != WeightFormat::fp8_block) return in;
    return quant::dequantize_fp8_activation(quant::quantize_fp8_activation(in, w.group_k),
                                            w.group_k);
  }
};

}  // namespace

void register_reference_moe_backend() {
  register_moe_backend({"reference", Device::Kind::cpu, 0},
                       [](Device) { return std::make_unique<ReferenceBackend>(); });
}

}  // namespace moelora
