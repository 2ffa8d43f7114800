// Format dispatch of moelora/quant/experts.h; the formats live in experts_{wna16,fp8,nvfp4}.cpp.
#include "moelora/quant/experts.h"

#include "quant/experts_impl.h"

namespace moelora::quant {

ExpertMatrices quantize_experts(const Tensor& w, const QuantizeOptions& opt) {
  MOELORA_CHECK(w.defined() && w.dim() == 3 && w.device().is_cpu() &&
                    (w.dtype() == DType::bf16 || w.dtype() == DType::f32),
                "quantize_experts: expected a host bf16/f32 [groups, N, K] stack, found {}",
                w.defined() ? w.describe() : std::string("undefined"));
  switch (opt.format) {
    case WeightFormat::int4:
    case WeightFormat::int8: return detail::quantize_int_experts(w, opt);
    case WeightFormat::fp8_block: return detail::quantize_fp8_experts(w, opt);
    case WeightFormat::nvfp4: return detail::quantize_nvfp4_experts(w, opt);
    case WeightFormat::bf16: break;
  }
  MOELORA_THROW("quantize_experts: format {} is not a quantized format", format_name(opt.format));
}

Tensor dequantize_experts(const ExpertMatrices& w) {
  MOELORA_CHECK(w.defined(), "dequantize_experts: undefined stack");
  const ExpertMatrices h = w.device().is_cpu() ? w : w.to(Device::cpu());
  switch (h.format) {
    case WeightFormat::bf16: {
      Tensor f = Tensor::empty(h.w.shape(), DType::f32);
      float* p = f.data<float>();
      for (int64_t i = 0; i < f.numel(); ++i) p[i] = float_at(h.w, i);
      return f;
    }
    case WeightFormat::int4:
    case WeightFormat::int8: return detail::dequantize_int_experts(h);
    case WeightFormat::fp8_block: return detail::dequantize_fp8_experts(h);
    case WeightFormat::nvfp4: return detail::dequantize_nvfp4_experts(h);
  }
  MOELORA_THROW("dequantize_experts: unknown format");
}

ExpertMatrices random_experts(WeightFormat format, int64_t groups, int64_t n, int64_t k,
                              int64_t group_size, float amax, uint64_t seed, Device device,
                              const Stream& stream) {
  switch (format) {
    case WeightFormat::int4:
    case WeightFormat::int8:
      return detail::random_int_experts(format, groups, n, k, group_size, amax, seed, device,
                                        stream);
    case WeightFormat::fp8_block:
      return detail::random_fp8_experts(groups, n, k, group_size, amax, seed, device, stream);
    case WeightFormat::nvfp4:
      return detail::random_nvfp4_experts(groups, n, k, amax, seed, device, stream);
    case WeightFormat::bf16: break;
  }
  MOELORA_THROW("random_experts: format {} is not a quantized format", format_name(format));
}

}  // namespace moelora::quant
