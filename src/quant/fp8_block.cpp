#include "moelora/quant/fp8_block.h"

#include <algorithm>
#include <cmath>

#include "quant/quant_util.h"

namespace moelora::quant {
namespace {

bool is_e4m3_nan(uint8_t bits) {
  return (bits & 0x7fu) == 0x7fu;
}

QuantDims dims_for(const Fp8BlockConfig& cfg, int64_t n, int64_t k, const std::string& who) {
  MOELORA_CHECK(cfg.block_n > 0 && cfg.block_k > 0,
                "{}: weight_block_size must be positive, found [{}, {}]", who, cfg.block_n,
                cfg.block_k);
  MOELORA_CHECK(n > 0 && k > 0, "{}: expected a non-empty weight, found N = {}, K = {}", who, n, k);
  QuantDims d;
  d.n = n;
  d.k = k;
  d.bits = 8;
  d.pack = 1;
  d.packed_rows = n;
  d.packed_cols = k;
  d.group_size = cfg.block_k;
  d.num_groups = ceil_div(k, cfg.block_k);
  d.group_n = cfg.block_n;
  d.num_groups_n = ceil_div(n, cfg.block_n);
  return d;
}

}  // namespace

QuantDims fp8_block_dims(const Fp8BlockConfig& cfg, int64_t n, int64_t k) {
  return dims_for(cfg, n, k, "fp8 block");
}

QuantDims validate_fp8_block(const Fp8BlockTensors& t, const Fp8BlockConfig& cfg,
                             const std::string& prefix) {
  const std::string wn = prefix + ".weight", sn = prefix + ".weight_scale_inv";
  detail::check_host_tensor(t.weight, wn);
  MOELORA_CHECK(t.weight.dtype() == DType::f8_e4m3 && t.weight.dim() == 2,
                "{}: expected a 2-D f8_e4m3 (float8_e4m3fn) weight [N, K], found {} {}", wn,
                dtype_name(t.weight.dtype()), shape_str(t.weight.shape()));
  const QuantDims d = dims_for(cfg, t.weight.size(0), t.weight.size(1), prefix);
  detail::check_tensor(t.weight_scale_inv, sn, DType::f32, {d.num_groups_n, d.num_groups},
                       fmt::format("[ceil(N/{}), ceil(K/{})] for N = {}, K = {}", cfg.block_n,
                                   cfg.block_k, d.n, d.k));
  detail::check_finite(t.weight_scale_inv, sn, /*positive=*/true);
  const auto* w = reinterpret_cast<const uint8_t*>(t.weight.data());
  for (int64_t i = 0; i < t.weight.numel(); ++i)
    MOELORA_CHECK(!is_e4m3_nan(w[i]), "{}[{}, {}]: e4m3 NaN (0x{:02x}) in the weight", wn, i / d.k,
                  i % d.k, w[i]);
  return d;
}

Tensor dequantize_fp8_block(const Fp8BlockTensors& t, const Fp8BlockConfig& cfg,
                            const std::string& prefix) {
  const QuantDims d = validate_fp8_block(t, cfg, prefix);
  Tensor out = Tensor::empty({d.n, d.k}, DType::f32);
  float* o = out.data<float>();
  const f8e4m3_t* w = t.weight.data<f8e4m3_t>();
  const float* s = t.weight_scale_inv.data<float>();
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t k = 0; k < d.k; ++k)
      o[n * d.k + k] =
          f8e4m3_to_float(w[n * d.k + k]) * s[(n / cfg.block_n) * d.num_groups + k / cfg.block_k];
  return out;
}

Fp8BlockTensors quantize_fp8_block(const Tensor& weight, const Fp8BlockConfig& cfg) {
  int64_t n = 0, k = 0;
  const std::vector<float> w = detail::weight_values(weight, "quantize_fp8_block: weight", n, k);
  const QuantDims d = dims_for(cfg, n, k, "quantize_fp8_block");
  Fp8BlockTensors t;
  t.weight = Tensor::empty({n, k}, DType::f8_e4m3);
  t.weight_scale_inv = Tensor::empty({d.num_groups_n, d.num_groups}, DType::f32);
  f8e4m3_t* q = t.weight.data<f8e4m3_t>();
  float* sinv = t.weight_scale_inv.data<float>();
  for (int64_t bn = 0; bn < d.num_groups_n; ++bn)
    for (int64_t bk = 0; bk < d.num_groups; ++bk) {
      const int64_t n0 = bn * cfg.block_n, n1 = std::min(n, n0 + cfg.block_n);
      const int64_t k0 = bk * cfg.block_k, k1 = std::min(k, k0 + cfg.block_k);
      float amax = 0.0f;
      for (int64_t r = n0; r < n1; ++r)
        for (int64_t c = k0; c < k1; ++c) amax = std::max(amax, std::fabs(w[size_t(r * k + c)]));
      const float scale = amax > 0.0f ? kFp8E4m3Max / amax : 1.0f;
      sinv[bn * d.num_groups + bk] = 1.0f / scale;
      for (int64_t r = n0; r < n1; ++r)
        for (int64_t c = k0; c < k1; ++c)
          q[r * k + c] =
              float_to_f8e4m3(std::clamp(w[size_t(r * k + c)] * scale, -kFp8E4m3Max, kFp8E4m3Max));
    }
  return t;
}

Fp8BlockTensors load_fp8_block(const SafetensorsFile& file, const std::string& prefix,
                               const Fp8BlockConfig& cfg) {
  Fp8BlockTensors t;
  t.weight = file.tensor(prefix + ".weight");
  t.weight_scale_inv = file.tensor(prefix + ".weight_scale_inv");
  // transformers 5.x writes a per-expert scale grid with a single block row or column
  // squeezed to 1-D (e.g. (2,) for a [128, 256] weight). With one grid dimension equal to 1
  // the squeezed order is the grid's, so view it back as [ceil(N/bn), ceil(K/bk)]; any other
  // 1-D scale is left for validate_fp8_block to refuse.
  if (t.weight_scale_inv.dim() == 1 && t.weight.dim() == 2 && cfg.block_n > 0 &&
      cfg.block_k > 0) {
    const int64_t gn = ceil_div(t.weight.size(0), cfg.block_n);
    const int64_t gk = ceil_div(t.weight.size(1), cfg.block_k);
    if ((gn == 1 || gk == 1) && t.weight_scale_inv.numel() == gn * gk)
      t.weight_scale_inv = t.weight_scale_inv.view({gn, gk});
  }
  validate_fp8_block(t, cfg, prefix);
  return t;
}

void add_fp8_block_tensors(std::map<std::string, Tensor>& out, const std::string& prefix,
                           const Fp8BlockTensors& t) {
  out[prefix + ".weight"] = t.weight;
  out[prefix + ".weight_scale_inv"] = t.weight_scale_inv;
}

Fp8Activation quantize_fp8_activation(const Tensor& x, int64_t group) {
  MOELORA_CHECK(group > 0, "quantize_fp8_activation: group must be > 0, found {}", group);
  int64_t m = 0, k = 0;
  const std::vector<float> v = detail::weight_values(x, "quantize_fp8_activation: x", m, k);
  const int64_t groups = ceil_div(k, group);
  Fp8Activation a;
  a.q = Tensor::empty({m, k}, DType::f8_e4m3);
  a.scale = Tensor::empty({m, groups}, DType::f32);
  f8e4m3_t* q = a.q.data<f8e4m3_t>();
  float* s = a.scale.data<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group, c1 = std::min(k, c0 + group);
      float amax = 0.0f;
      for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(v[size_t(r * k + c)]));
      const float sc = std::max(amax, kFp8ActEps) / kFp8E4m3Max;
      s[r * groups + g] = sc;
      for (int64_t c = c0; c < c1; ++c)
        q[r * k + c] =
            float_to_f8e4m3(std::clamp(v[size_t(r * k + c)] / sc, -kFp8E4m3Max, kFp8E4m3Max));
    }
  return a;
}

Tensor dequantize_fp8_activation(const Fp8Activation& a, int64_t group) {
  detail::check_host_tensor(a.q, "fp8 activation q");
  MOELORA_CHECK(a.q.dtype() == DType::f8_e4m3 && a.q.dim() == 2,
                "fp8 activation q: expected f8_e4m3 [M, K], found {}", a.q.describe());
  const int64_t m = a.q.size(0), k = a.q.size(1), groups = ceil_div(k, group);
  detail::check_tensor(a.scale, "fp8 activation scale", DType::f32, {m, groups},
                       fmt::format("[M, ceil(K/{})]", group));
  Tensor out = Tensor::empty({m, k}, DType::f32);
  const f8e4m3_t* q = a.q.data<f8e4m3_t>();
  const float* s = a.scale.data<float>();
  float* o = out.data<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < k; ++c)
      o[r * k + c] = f8e4m3_to_float(q[r * k + c]) * s[r * groups + c / group];
  return out;
}

}  // namespace moelora::quant
