// int4 / int8 expert stacks for cuda_wna16 -- placeholder until the format lands.
#include "quant/experts_impl.h"

namespace moelora::quant {

ExpertMatrices pack_gptq_experts(const std::vector<std::vector<GptqTensors>>&, const GptqConfig&,
                                 const std::string& name) {
  MOELORA_THROW("{}: int4/int8 expert packing is not implemented yet", name);
}
ExpertMatrices pack_awq_experts(const std::vector<std::vector<AwqTensors>>&, const AwqConfig&,
                                const std::string& name) {
  MOELORA_THROW("{}: int4 expert packing is not implemented yet", name);
}
ExpertMatrices pack_ct_experts(const std::vector<std::vector<CtPackTensors>>&,
                               const CtPackConfig&, const std::string& name) {
  MOELORA_THROW("{}: int4/int8 expert packing is not implemented yet", name);
}

namespace detail {
ExpertMatrices quantize_int_experts(const Tensor&, const QuantizeOptions&) {
  MOELORA_THROW("int4/int8 expert stacks are not implemented yet");
}
Tensor dequantize_int_experts(const ExpertMatrices&) {
  MOELORA_THROW("int4/int8 expert stacks are not implemented yet");
}
ExpertMatrices random_int_experts(WeightFormat, int64_t, int64_t, int64_t, int64_t, float,
                                  uint64_t, Device, const Stream&) {
  MOELORA_THROW("int4/int8 expert stacks are not implemented yet");
}
}  // namespace detail
}  // namespace moelora::quant
