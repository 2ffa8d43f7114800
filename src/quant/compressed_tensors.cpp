#include "moelora/quant/compressed_tensors.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "quant/quant_util.h"

namespace moelora::quant {
namespace {

QuantDims dims_for(const CtPackConfig& cfg, int64_t n, int64_t k, const std::string& who) {
  MOELORA_CHECK(cfg.bits == 4 || cfg.bits == 8,
                "{}: pack-quantized num_bits: supported 4 and 8, found {}", who, cfg.bits);
  MOELORA_CHECK(n > 0 && k > 0, "{}: expected a non-empty weight, found N = {}, K = {}", who, n, k);
  QuantDims d;
  d.n = n;
  d.k = k;
  d.bits = cfg.bits;
  d.pack = 32 / cfg.bits;
  if (cfg.strategy == CtStrategy::group) {
    const int64_t g = cfg.group_size;
    MOELORA_CHECK(g == 32 || g == 64 || g == 128,
                  "{}: pack-quantized group_size: supported 32, 64 and 128 (or strategy "
                  "channel), found {}",
                  who, g);
    MOELORA_CHECK(k % g == 0,
                  "{}: group_size {} must divide K = {} (compressed-tensors requires "
                  "it too)",
                  who, g, k);
    d.group_size = g;
  } else {
    d.group_size = k;
  }
  d.packed_rows = n;
  d.packed_cols = ceil_div(k, d.pack);
  d.num_groups = k / d.group_size;
  d.group_n = 1;
  d.num_groups_n = n;
  return d;
}

int64_t int_at(const Tensor& t, int64_t i) {
  return t.dtype() == DType::i64 ? t.data<int64_t>()[i] : int64_t(t.data<int32_t>()[i]);
}

}  // namespace

QuantDims ct_pack_dims(const CtPackConfig& cfg, int64_t n, int64_t k) {
  return dims_for(cfg, n, k, "compressed-tensors");
}

QuantDims validate_ct_pack(const CtPackTensors& t, const CtPackConfig& cfg,
                           const std::string& prefix) {
  const std::string wp = prefix + ".weight_packed", ws = prefix + ".weight_scale",
                    wsh = prefix + ".weight_shape", zp = prefix + ".weight_zero_point",
                    gi = prefix + ".weight_g_idx";
  detail::check_host_tensor(t.weight_shape, wsh);
  MOELORA_CHECK((t.weight_shape.dtype() == DType::i64 || t.weight_shape.dtype() == DType::i32) &&
                    t.weight_shape.shape() == Shape{2},
                "{}: expected i64 [2] = {{N, K}}, found {} {}", wsh,
                dtype_name(t.weight_shape.dtype()), shape_str(t.weight_shape.shape()));
  const int64_t n = int_at(t.weight_shape, 0), k = int_at(t.weight_shape, 1);
  const QuantDims d = dims_for(cfg, n, k, prefix);

  detail::check_host_tensor(t.weight_packed, wp);
  if (t.weight_packed.dtype() != DType::i32 ||
      t.weight_packed.shape() != Shape{d.packed_rows, d.packed_cols}) {
    std::string hint;
    const int other = cfg.bits == 4 ? 8 : 4;
    if (t.weight_packed.dim() == 2 && t.weight_packed.size(1) == ceil_div(k, 32 / other))
      hint = fmt::format(" — ceil(K/{}) columns: a {}-bit checkpoint read as {}-bit?", 32 / other,
                         other, cfg.bits);
    MOELORA_THROW(
        "{}: expected i32 [N = {}, ceil(K/{}) = {}] for {}-bit values (N, K = {}, {} "
        "from {}), found {} {}{}",
        wp, n, d.pack, d.packed_cols, cfg.bits, n, k, wsh, dtype_name(t.weight_packed.dtype()),
        shape_str(t.weight_packed.shape()), hint);
  }
  detail::check_float_tensor(
      t.weight_scale, ws, {n, d.num_groups},
      cfg.strategy == CtStrategy::group
          ? fmt::format("strategy group: [N, K/G] with K = {}, G = {}", k, d.group_size)
          : std::string("strategy channel: [N, 1]"));
  detail::check_finite(t.weight_scale, ws);

  const Shape zp_shape{ceil_div(n, d.pack), d.num_groups};
  if (!cfg.symmetric) {
    MOELORA_CHECK(t.weight_zero_point.defined(),
                  "{}: missing; an asymmetric (symmetric: false) scheme stores zero points", zp);
    detail::check_tensor(t.weight_zero_point, zp, DType::i32, zp_shape,
                         fmt::format("[ceil(N/{}), K/G] zero points packed along N", d.pack));
  } else if (t.weight_zero_point.defined()) {
    detail::check_tensor(t.weight_zero_point, zp, DType::i32, zp_shape,
                         fmt::format("[ceil(N/{}), K/G] zero points packed along N", d.pack));
    for (int64_t r = 0; r < n; ++r)
      for (int64_t g = 0; g < d.num_groups; ++g)
        MOELORA_CHECK(ct_zero(t, cfg, r, g) == 0,
                      "{}: symmetric: true expects zero points of 0, found {} at row {}, group "
                      "{}; the checkpoint is asymmetric",
                      zp, ct_zero(t, cfg, r, g), r, g);
  }
  if (t.weight_g_idx.defined())
    act_order_from_g_idx(t.weight_g_idx, k, d.num_groups, d.group_size, gi);
  return d;
}

int32_t ct_q(const CtPackTensors& t, int bits, int64_t n, int64_t k) {
  const int pack = 32 / bits;
  const int64_t cols = t.weight_packed.size(1);
  const int32_t word = t.weight_packed.data<int32_t>()[n * cols + k / pack];
  return int32_t(detail::field(word, int(k % pack), bits)) - (1 << (bits - 1));
}

int32_t ct_zero(const CtPackTensors& t, const CtPackConfig& cfg, int64_t n, int64_t g) {
  if (!t.weight_zero_point.defined()) return 0;
  const int pack = 32 / cfg.bits;
  const int64_t cols = t.weight_zero_point.size(1);
  const int32_t word = t.weight_zero_point.data<int32_t>()[(n / pack) * cols + g];
  return int32_t(detail::field(word, int(n % pack), cfg.bits)) - (1 << (cfg.bits - 1));
}

Tensor dequantize_ct_pack(const CtPackTensors& t, const CtPackConfig& cfg,
                          const std::string& prefix) {
  const QuantDims d = validate_ct_pack(t, cfg, prefix);
  const int32_t* g_idx = t.weight_g_idx.defined() ? t.weight_g_idx.data<int32_t>() : nullptr;
  Tensor out = Tensor::empty({d.n, d.k}, DType::f32);
  float* w = out.data<float>();
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t k = 0; k < d.k; ++k) {
      const int64_t g = g_idx ? g_idx[k] : k / d.group_size;
      w[n * d.k + k] = detail::float_at(t.weight_scale, n * d.num_groups + g) *
                       float(ct_q(t, d.bits, n, k) - ct_zero(t, cfg, n, g));
    }
  return out;
}

CtPackTensors quantize_ct_pack(const Tensor& weight, const CtPackConfig& cfg, DType scale_dtype) {
  int64_t n = 0, k = 0;
  const std::vector<float> w = detail::weight_values(weight, "quantize_ct_pack: weight", n, k);
  const QuantDims d = dims_for(cfg, n, k, "quantize_ct_pack");
  MOELORA_CHECK(
      scale_dtype == DType::f16 || scale_dtype == DType::bf16 || scale_dtype == DType::f32,
      "quantize_ct_pack: scale dtype must be f16, bf16 or f32, found {}", dtype_name(scale_dtype));
  const int bits = cfg.bits, offset = 1 << (bits - 1);
  const float qmin = float(-offset), qmax = float(offset - 1), range = qmax - qmin;
  // What compressed-tensors substitutes for a zero scale: the scale dtype's epsilon.
  const float eps = scale_dtype == DType::f32   ? std::numeric_limits<float>::epsilon()
                    : scale_dtype == DType::f16 ? 0.0009765625f
                                                : 0.0078125f;
  CtPackTensors t;
  t.weight_packed = Tensor::zeros({n, d.packed_cols}, DType::i32);
  t.weight_scale = Tensor::empty({n, d.num_groups}, scale_dtype);
  t.weight_shape = Tensor::empty({2}, DType::i64);
  t.weight_shape.data<int64_t>()[0] = n;
  t.weight_shape.data<int64_t>()[1] = k;
  if (!cfg.symmetric)
    t.weight_zero_point = Tensor::zeros({ceil_div(n, d.pack), d.num_groups}, DType::i32);
  auto* packed = reinterpret_cast<uint32_t*>(t.weight_packed.data<int32_t>());
  for (int64_t r = 0; r < n; ++r)
    for (int64_t g = 0; g < d.num_groups; ++g) {
      const float* x = &w[size_t(r * k + g * d.group_size)];
      float lo = 0.0f, hi = 0.0f;
      for (int64_t c = 0; c < d.group_size; ++c) lo = std::min(lo, x[c]), hi = std::max(hi, x[c]);
      float s = cfg.symmetric ? std::max(-lo, hi) / (range / 2.0f) : (hi - lo) / range;
      if (s == 0.0f) s = eps;
      s = detail::store_float(t.weight_scale, r * d.num_groups + g, s);
      if (s == 0.0f) s = detail::store_float(t.weight_scale, r * d.num_groups + g, eps);
      float z = 0.0f;
      if (!cfg.symmetric) {
        z = detail::round_even(std::clamp(qmin - lo / s, qmin, qmax));
        auto* zp = reinterpret_cast<uint32_t*>(t.weight_zero_point.data<int32_t>());
        zp[(r / d.pack) * d.num_groups + g] |= uint32_t(int32_t(z) + offset)
                                               << (bits * (r % d.pack));
      }
      for (int64_t c = 0; c < d.group_size; ++c) {
        const int64_t col = g * d.group_size + c;
        const float q = std::clamp(detail::round_even(x[c] / s + z), qmin, qmax);
        packed[r * d.packed_cols + col / d.pack] |= uint32_t(int32_t(q) + offset)
                                                    << (bits * (col % d.pack));
      }
    }
  return t;
}

CtPackTensors load_ct_pack(const SafetensorsFile& file, const std::string& prefix,
                           const CtPackConfig& cfg) {
  CtPackTensors t;
  t.weight_packed = file.tensor(prefix + ".weight_packed");
  t.weight_scale = file.tensor(prefix + ".weight_scale");
  t.weight_shape = file.tensor(prefix + ".weight_shape");
  if (file.contains(prefix + ".weight_zero_point"))
    t.weight_zero_point = file.tensor(prefix + ".weight_zero_point");
  if (file.contains(prefix + ".weight_g_idx"))
    t.weight_g_idx = file.tensor(prefix + ".weight_g_idx");
  validate_ct_pack(t, cfg, prefix);
  return t;
}

void add_ct_pack_tensors(std::map<std::string, Tensor>& out, const std::string& prefix,
                         const CtPackTensors& t) {
  out[prefix + ".weight_packed"] = t.weight_packed;
  out[prefix + ".weight_scale"] = t.weight_scale;
  out[prefix + ".weight_shape"] = t.weight_shape;
  if (t.weight_zero_point.defined()) out[prefix + ".weight_zero_point"] = t.weight_zero_point;
  if (t.weight_g_idx.defined()) out[prefix + ".weight_g_idx"] = t.weight_g_idx;
}

}  // namespace moelora::quant
