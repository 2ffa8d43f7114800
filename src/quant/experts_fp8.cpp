// fp8 block-scale expert stacks for cuda_fp8_block -- placeholder until the format lands.
#include "quant/experts_impl.h"

namespace moelora::quant {

ExpertMatrices pack_fp8_block_experts(const std::vector<std::vector<Fp8BlockTensors>>&,
                                      const Fp8BlockConfig&, const std::string& name) {
  MOELORA_THROW("{}: fp8 expert packing is not implemented yet", name);
}

namespace detail {
ExpertMatrices quantize_fp8_experts(const Tensor&, const QuantizeOptions&) {
  MOELORA_THROW("fp8 expert stacks are not implemented yet");
}
Tensor dequantize_fp8_experts(const ExpertMatrices&) {
  MOELORA_THROW("fp8 expert stacks are not implemented yet");
}
ExpertMatrices random_fp8_experts(int64_t, int64_t, int64_t, int64_t, float, uint64_t, Device,
                                  const Stream&) {
  MOELORA_THROW("fp8 expert stacks are not implemented yet");
}
}  // namespace detail
}  // namespace moelora::quant
