#include "moelora/quant/nvfp4.h"

#include <algorithm>
#include <cmath>

#include "moelora/quant/fp8_block.h"
#include "quant/quant_util.h"

namespace moelora::quant {
namespace {

// A global scale: f32 [] or [1], finite and > 0.
float check_scalar(const Tensor& t, const std::string& name) {
  detail::check_host_tensor(t, name);
  MOELORA_CHECK(t.dtype() == DType::f32 && t.numel() == 1 && t.dim() <= 1,
                "{}: expected an f32 scalar ([] or [1]), found {} {}", name, dtype_name(t.dtype()),
                shape_str(t.shape()));
  const float v = t.data<float>()[0];
  MOELORA_CHECK(std::isfinite(v) && v > 0.0f, "{}: expected a finite positive scale, found {}",
                name, v);
  return v;
}

}  // namespace

uint8_t float_to_e2m1(float v) {
  if (std::isnan(v)) return 0;
  const uint8_t sign = v < 0.0f ? 8 : 0;  // as ModelOpt: -0.0 encodes as +0
  const float a = std::fabs(v);
  // Midpoints between neighbouring magnitudes; a tie goes to the even code (mantissa bit 0).
  static constexpr float kMid[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
  uint8_t idx = 0;
  while (idx < 7 && a > kMid[idx]) ++idx;
  if (idx < 7 && a == kMid[idx] && (idx & 1u)) ++idx;  // tie: odd idx below, take the even one
  return uint8_t(sign | idx);
}

QuantDims nvfp4_dims(int64_t n, int64_t k) {
  MOELORA_CHECK(n > 0 && k > 0, "nvfp4: expected a non-empty weight, found N = {}, K = {}", n, k);
  MOELORA_CHECK(k % kNvfp4GroupSize == 0,
                "nvfp4: K = {} must be a multiple of the group size 16 (weight_scale has K/16 "
                "columns)",
                k);
  QuantDims d;
  d.n = n;
  d.k = k;
  d.bits = 4;
  d.pack = 2;
  d.packed_rows = n;
  d.packed_cols = k / 2;
  d.group_size = kNvfp4GroupSize;
  d.num_groups = k / kNvfp4GroupSize;
  d.group_n = 1;
  d.num_groups_n = n;
  return d;
}

QuantDims validate_nvfp4(const Nvfp4Tensors& t, const std::string& prefix) {
  const std::string wn = prefix + ".weight", sn = prefix + ".weight_scale",
                    s2 = prefix + ".weight_scale_2", in = prefix + ".input_scale";
  detail::check_host_tensor(t.weight, wn);
  MOELORA_CHECK(t.weight.dtype() == DType::u8 && t.weight.dim() == 2,
                "{}: expected u8 [N, K/2] (two e2m1 codes per byte), found {} {}", wn,
                dtype_name(t.weight.dtype()), shape_str(t.weight.shape()));
  const int64_t n = t.weight.size(0), k = 2 * t.weight.size(1);
  MOELORA_CHECK(k % kNvfp4GroupSize == 0,
                "{}: K = 2 x {} columns = {} must be a multiple of 16 (the NVFP4 group size)", wn,
                t.weight.size(1), k);
  const QuantDims d = nvfp4_dims(n, k);
  detail::check_tensor(
      t.weight_scale, sn, DType::f8_e4m3, {n, d.num_groups},
      fmt::format("one e4m3 scale per 16 elements: [N, K/16] with K = {} from {}", k, wn));
  const auto* s = reinterpret_cast<const uint8_t*>(t.weight_scale.data());
  for (int64_t i = 0; i < t.weight_scale.numel(); ++i) {
    const float v = f8e4m3_to_float(f8e4m3_t{s[i]});
    MOELORA_CHECK(std::isfinite(v) && !(s[i] & 0x80u),
                  "{}[{}, {}]: expected a finite non-negative e4m3 scale, found 0x{:02x} ({})", sn,
                  i / d.num_groups, i % d.num_groups, s[i], v);
  }
  check_scalar(t.weight_scale_2, s2);
  if (t.input_scale.defined()) check_scalar(t.input_scale, in);
  return d;
}

uint8_t nvfp4_code(const Nvfp4Tensors& t, int64_t n, int64_t k) {
  const int64_t cols = t.weight.size(1);
  const uint8_t byte = t.weight.data<uint8_t>()[n * cols + k / 2];
  return (k & 1) ? uint8_t(byte >> 4) : uint8_t(byte & 0x0fu);
}

Tensor dequantize_nvfp4(const Nvfp4Tensors& t, const std::string& prefix) {
  const QuantDims d = validate_nvfp4(t, prefix);
  const float s2 = t.weight_scale_2.data<float>()[0];
  const f8e4m3_t* s = t.weight_scale.data<f8e4m3_t>();
  Tensor out = Tensor::empty({d.n, d.k}, DType::f32);
  float* o = out.data<float>();
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t k = 0; k < d.k; ++k)
      o[n * d.k + k] = e2m1_to_float(nvfp4_code(t, n, k)) *
                       (f8e4m3_to_float(s[n * d.num_groups + k / kNvfp4GroupSize]) * s2);
  return out;
}

Nvfp4Tensors quantize_nvfp4(const Tensor& weight, float input_amax) {
  int64_t n = 0, k = 0;
  const std::vector<float> w = detail::weight_values(weight, "quantize_nvfp4: weight", n, k);
  const QuantDims d = nvfp4_dims(n, k);
  float amax = 0.0f;
  for (float v : w) amax = std::max(amax, std::fabs(v));
  // ModelOpt divides by this without a guard; an all-zero weight would give NaN scales.
  const float s2 = amax > 0.0f ? amax / (kFp8E4m3Max * kE2m1Max) : 1.0f;
  Nvfp4Tensors t;
  t.weight = Tensor::zeros({n, d.packed_cols}, DType::u8);
  t.weight_scale = Tensor::empty({n, d.num_groups}, DType::f8_e4m3);
  t.weight_scale_2 = Tensor::empty({}, DType::f32);
  t.weight_scale_2.data<float>()[0] = s2;
  if (input_amax > 0.0f) {
    t.input_scale = Tensor::empty({}, DType::f32);
    t.input_scale.data<float>()[0] = input_amax / (kE2m1Max * kFp8E4m3Max);
  }
  uint8_t* packed = t.weight.data<uint8_t>();
  f8e4m3_t* scales = t.weight_scale.data<f8e4m3_t>();
  for (int64_t r = 0; r < n; ++r)
    for (int64_t g = 0; g < d.num_groups; ++g) {
      const float* x = &w[size_t(r * k + g * kNvfp4GroupSize)];
      float bmax = 0.0f;
      for (int64_t c = 0; c < kNvfp4GroupSize; ++c) bmax = std::max(bmax, std::fabs(x[c]));
      float s = bmax / (kE2m1Max * s2);
      if (s == 0.0f) s = 1.0f;
      const f8e4m3_t s8 = float_to_f8e4m3(std::max(s, 0x1p-9f));
      scales[r * d.num_groups + g] = s8;
      const float denom = f8e4m3_to_float(s8) * s2;
      for (int64_t c = 0; c < kNvfp4GroupSize; ++c) {
        const int64_t col = g * kNvfp4GroupSize + c;
        const uint8_t code = float_to_e2m1(x[c] / denom);
        packed[r * d.packed_cols + col / 2] |= (col & 1) ? uint8_t(code << 4) : code;
      }
    }
  return t;
}

Nvfp4Tensors load_nvfp4(const SafetensorsFile& file, const std::string& prefix) {
  Nvfp4Tensors t;
  t.weight = file.tensor(prefix + ".weight");
  t.weight_scale = file.tensor(prefix + ".weight_scale");
  t.weight_scale_2 = file.tensor(prefix + ".weight_scale_2");
  if (file.contains(prefix + ".input_scale")) t.input_scale = file.tensor(prefix + ".input_scale");
  validate_nvfp4(t, prefix);
  return t;
}

void add_nvfp4_tensors(std::map<std::string, Tensor>& out, const std::string& prefix,
                       const Nvfp4Tensors& t) {
  out[prefix + ".weight"] = t.weight;
  out[prefix + ".weight_scale"] = t.weight_scale;
  out[prefix + ".weight_scale_2"] = t.weight_scale_2;
  if (t.input_scale.defined()) out[prefix + ".input_scale"] = t.input_scale;
}

}  // namespace moelora::quant
