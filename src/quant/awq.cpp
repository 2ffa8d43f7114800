#include "moelora/quant/awq.h"

#include <algorithm>
#include <cmath>

#include "quant/quant_util.h"

namespace moelora::quant {
namespace {

constexpr int kPack = 8;

void check_config(const AwqConfig& cfg, const std::string& who) {
  MOELORA_CHECK(cfg.bits == 4, "{}: AWQ (GEMM) bits: only 4 is supported, found {}", who, cfg.bits);
  const int64_t g = cfg.group_size;
  MOELORA_CHECK(g == -1 || g == 32 || g == 64 || g == 128,
                "{}: AWQ group_size: supported 32, 64, 128 and -1 (per-channel), found {}", who, g);
}

QuantDims dims_for(const AwqConfig& cfg, int64_t n, int64_t k, const std::string& who) {
  check_config(cfg, who);
  const int64_t g = cfg.group_size;
  MOELORA_CHECK(n > 0 && k > 0, "{}: expected a non-empty weight, found N = {}, K = {}", who, n, k);
  QuantDims d;
  d.n = n;
  d.k = k;
  d.bits = 4;
  d.pack = kPack;
  d.group_size = g == -1 ? k : g;
  MOELORA_CHECK(k % d.group_size == 0, "{}: group_size {} must divide K = {}", who, d.group_size,
                k);
  MOELORA_CHECK(n % kPack == 0,
                "{}: N = {} must be a multiple of 8 (AWQ packs 8 columns per "
                "int32 along N)",
                who, n);
  d.packed_rows = k;
  d.packed_cols = n / kPack;
  d.num_groups = k / d.group_size;
  d.group_n = 1;
  d.num_groups_n = n;
  return d;
}

}  // namespace

QuantDims awq_dims(const AwqConfig& cfg, int64_t n, int64_t k) {
  return dims_for(cfg, n, k, "awq");
}

QuantDims validate_awq(const AwqTensors& t, const AwqConfig& cfg, const std::string& prefix) {
  const std::string qw = prefix + ".qweight", qz = prefix + ".qzeros", sc = prefix + ".scales";
  detail::check_host_tensor(t.qweight, qw);
  detail::check_host_tensor(t.scales, sc);
  MOELORA_CHECK(t.scales.dim() == 2, "{}: expected a 2-D tensor [K/G, N], found {}", sc,
                shape_str(t.scales.shape()));
  MOELORA_CHECK(t.qweight.dim() == 2, "{}: expected a 2-D tensor [K, N/8], found {}", qw,
                shape_str(t.qweight.shape()));
  const int64_t n = t.scales.size(1), k = t.qweight.size(0);
  check_config(cfg, prefix);
  if (cfg.group_size != -1 && t.scales.size(0) * cfg.group_size != k) {
    const bool gptq_layout =
        t.qweight.size(1) == n && t.qweight.size(0) * kPack == t.scales.size(0) * cfg.group_size;
    MOELORA_THROW(
        "{}: {} rows (K) but {} has {} groups of {} = {} channels: expected qweight "
        "[K, N/8] and scales [K/G, N]{}",
        qw, k, sc, t.scales.size(0), cfg.group_size, t.scales.size(0) * cfg.group_size,
        gptq_layout ? " — qweight looks like GPTQ's [K/8, N] layout" : "");
  }
  const QuantDims d = dims_for(cfg, n, k, prefix);
  if (t.qweight.dtype() != DType::i32 || t.qweight.size(1) != d.packed_cols) {
    std::string hint;
    if (t.qweight.dtype() == DType::i32 && t.qweight.size(1) * 4 == n)
      hint = " — N/4 columns: 8-bit values? AWQ GEMM only stores 4-bit";
    else if (t.qweight.dtype() == DType::i32 && t.qweight.size(1) == n)
      hint = " — N columns: a GPTQ-layout qweight [K/8, N]?";
    MOELORA_THROW("{}: expected i32 [K = {}, N/8 = {}] (N = {} from {}), found {} {}{}", qw, k,
                  d.packed_cols, n, sc, dtype_name(t.qweight.dtype()), shape_str(t.qweight.shape()),
                  hint);
  }
  detail::check_float_tensor(t.scales, sc, {d.num_groups, n},
                             fmt::format("K/G = {}/{} groups, N = {}", k, d.group_size, n));
  detail::check_tensor(t.qzeros, qz, DType::i32, {d.num_groups, d.packed_cols},
                       "[K/G, N/8] zero points, packed like qweight");
  detail::check_finite(t.scales, sc);
  return d;
}

int32_t awq_q(const AwqTensors& t, int64_t n, int64_t k) {
  const int64_t cols = t.qweight.size(1);
  const int32_t word = t.qweight.data<int32_t>()[k * cols + n / kPack];
  return int32_t(detail::field(word, kAwqReverseOrder[size_t(n % kPack)], 4));
}

int32_t awq_zero(const AwqTensors& t, int64_t g, int64_t n) {
  const int64_t cols = t.qzeros.size(1);
  const int32_t word = t.qzeros.data<int32_t>()[g * cols + n / kPack];
  return int32_t(detail::field(word, kAwqReverseOrder[size_t(n % kPack)], 4));
}

Tensor dequantize_awq(const AwqTensors& t, const AwqConfig& cfg, const std::string& prefix) {
  const QuantDims d = validate_awq(t, cfg, prefix);
  Tensor out = Tensor::empty({d.n, d.k}, DType::f32);
  float* w = out.data<float>();
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t k = 0; k < d.k; ++k) {
      const int64_t g = k / d.group_size;
      w[n * d.k + k] =
          detail::float_at(t.scales, g * d.n + n) * float(awq_q(t, n, k) - awq_zero(t, g, n));
    }
  return out;
}

AwqTensors quantize_awq(const Tensor& weight, const AwqConfig& cfg) {
  int64_t n = 0, k = 0;
  const std::vector<float> w = detail::weight_values(weight, "quantize_awq: weight", n, k);
  const QuantDims d = dims_for(cfg, n, k, "quantize_awq");
  AwqTensors t;
  t.qweight = Tensor::zeros({k, d.packed_cols}, DType::i32);
  t.qzeros = Tensor::zeros({d.num_groups, d.packed_cols}, DType::i32);
  t.scales = Tensor::empty({d.num_groups, n}, DType::f16);
  auto* qweight = reinterpret_cast<uint32_t*>(t.qweight.data<int32_t>());
  auto* qzeros = reinterpret_cast<uint32_t*>(t.qzeros.data<int32_t>());
  f16_t* scales = t.scales.data<f16_t>();
  for (int64_t g = 0; g < d.num_groups; ++g)
    for (int64_t r = 0; r < n; ++r) {
      const float* row = &w[size_t(r * k + g * d.group_size)];
      // The range always includes 0 (AutoAWQ's does not, and clips all-positive groups).
      float mn = 0.0f, mx = 0.0f;
      for (int64_t c = 0; c < d.group_size; ++c)
        mn = std::min(mn, row[c]), mx = std::max(mx, row[c]);
      const size_t si = size_t(g * n + r);
      scales[si] = float_to_f16(std::max(mx - mn, 1e-5f) / 15.0f);
      float s = f16_to_float(scales[si]);
      if (!(s > 0.0f)) {
        scales[si] = f16_t{1};
        s = f16_to_float(scales[si]);
      }
      const int32_t z = int32_t(std::clamp(-detail::round_even(mn / s), 0.0f, 15.0f));
      const int nib = kAwqReverseOrder[size_t(r % kPack)];
      qzeros[g * d.packed_cols + r / kPack] |= uint32_t(z) << (4 * nib);
      for (int64_t c = 0; c < d.group_size; ++c) {
        const float q = std::clamp(detail::round_even(row[c] / s) + float(z), 0.0f, 15.0f);
        qweight[(g * d.group_size + c) * d.packed_cols + r / kPack] |= uint32_t(q) << (4 * nib);
      }
    }
  return t;
}

AwqTensors load_awq(const SafetensorsFile& file, const std::string& prefix, const AwqConfig& cfg) {
  AwqTensors t;
  t.qweight = file.tensor(prefix + ".qweight");
  t.qzeros = file.tensor(prefix + ".qzeros");
  t.scales = file.tensor(prefix + ".scales");
  validate_awq(t, cfg, prefix);
  return t;
}

void add_awq_tensors(std::map<std::string, Tensor>& out, const std::string& prefix,
                     const AwqTensors& t) {
  out[prefix + ".qweight"] = t.qweight;
  out[prefix + ".qzeros"] = t.qzeros;
  out[prefix + ".scales"] = t.scales;
}

}  // namespace moelora::quant
