// Helpers shared by the quantized-format readers, dequantizers and quantizers (internal).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moelora/core/dtype.h"
#include "moelora/core/tensor.h"
#include "moelora/quant/quant_common.h"

namespace moelora::quant::detail {

// A defined, contiguous host tensor (checkpoint tensors are memory-mapped host views).
void check_host_tensor(const Tensor& t, const std::string& name);
// ... with exactly this dtype and shape; the error names the tensor, expected vs found.
void check_tensor(const Tensor& t, const std::string& name, DType dtype, const Shape& shape,
                  const std::string& why = "");
// ... with one of the float dtypes (f16, bf16, f32) and this shape.
void check_float_tensor(const Tensor& t, const std::string& name, const Shape& shape,
                        const std::string& why = "");

// Element i (contiguous order) of an f16/bf16/f32/f8_e4m3 tensor as float.
using ::moelora::float_at;  // core/tensor.h

// Stores v into element i of an f16/bf16/f32 tensor; returns the value as stored (rounded).
inline float store_float(const Tensor& t, int64_t i, float v) {
  switch (t.dtype()) {
    case DType::f32:
      static_cast<float*>(t.data())[i] = v;
      return v;
    case DType::f16: {
      const f16_t h = float_to_f16(v);
      static_cast<f16_t*>(t.data())[i] = h;
      return f16_to_float(h);
    }
    case DType::bf16: {
      const bf16_t b = float_to_bf16(v);
      static_cast<bf16_t*>(t.data())[i] = b;
      return bf16_to_float(b);
    }
    default:
      MOELORA_THROW("store_float: {} is not an f16/bf16/f32 tensor", t.describe());
  }
}

// Throws naming the first non-finite (or, with `positive`, non-positive) entry of a [rows,
// cols] float tensor: NaN/inf scales would silently poison every weight of their group.
void check_finite(const Tensor& t, const std::string& name, bool positive = false);

// A host weight to quantize: bf16/f16/f32 [N, K], returned as f32 values (row-major).
std::vector<float> weight_values(const Tensor& w, const char* what, int64_t& n, int64_t& k);

// Field `idx` of width `bits` in a packed 32-bit word (element idx at bits*idx, low first).
inline uint32_t field(int32_t word, int idx, int bits) {
  return (uint32_t(word) >> (idx * bits)) & ((1u << bits) - 1u);
}

// Round half to even, as torch.round does.
inline float round_even(float x) {
  return std::nearbyint(x);
}

}  // namespace moelora::quant::detail
