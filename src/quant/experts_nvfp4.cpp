// NVFP4 expert stacks for cuda_nvfp4 -- placeholder until the format lands.
#include "quant/experts_impl.h"

namespace moelora::quant {

ExpertMatrices pack_nvfp4_experts(const std::vector<std::vector<Nvfp4Tensors>>&,
                                  const std::string& name) {
  MOELORA_THROW("{}: nvfp4 expert packing is not implemented yet", name);
}

namespace detail {
ExpertMatrices quantize_nvfp4_experts(const Tensor&, const QuantizeOptions&) {
  MOELORA_THROW("nvfp4 expert stacks are not implemented yet");
}
Tensor dequantize_nvfp4_experts(const ExpertMatrices&) {
  MOELORA_THROW("nvfp4 expert stacks are not implemented yet");
}
ExpertMatrices random_nvfp4_experts(int64_t, int64_t, int64_t, float, uint64_t, Device,
                                    const Stream&) {
  MOELORA_THROW("nvfp4 expert stacks are not implemented yet");
}
}  // namespace detail
}  // namespace moelora::quant
