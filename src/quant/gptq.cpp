#include "moelora/quant/gptq.h"

#include <algorithm>
#include <cmath>

#include "quant/quant_util.h"

namespace moelora::quant {
namespace {

using detail::field;

std::string format_name(GptqZeroFormat f) {
  return f == GptqZeroFormat::v1_minus_one ? "gptq (v1, zero - 1 stored)"
                                           : "gptq_v2 (true zero stored)";
}

QuantDims dims_for(const GptqConfig& cfg, int64_t n, int64_t k, const std::string& who) {
  MOELORA_CHECK(cfg.bits == 4 || cfg.bits == 8, "{}: GPTQ bits: supported 4 and 8, found {}", who,
                cfg.bits);
  const int64_t g = cfg.group_size;
  MOELORA_CHECK(g == -1 || g == 32 || g == 64 || g == 128,
                "{}: GPTQ group_size: supported 32, 64, 128 and -1 (per-channel), found {}", who,
                g);
  QuantDims d;
  d.n = n;
  d.k = k;
  d.bits = cfg.bits;
  d.pack = 32 / cfg.bits;
  d.group_size = g == -1 ? k : g;
  MOELORA_CHECK(n > 0 && k > 0, "{}: expected a non-empty weight, found N = {}, K = {}", who, n, k);
  MOELORA_CHECK(k % d.group_size == 0,
                "{}: group_size {} must divide K = {} (a partial last group is not supported)", who,
                d.group_size, k);
  MOELORA_CHECK(k % d.pack == 0,
                "{}: K = {} must be a multiple of {} ({}-bit values packed {} per "
                "int32 along K)",
                who, k, d.pack, cfg.bits, d.pack);
  MOELORA_CHECK(n % d.pack == 0,
                "{}: N = {} must be a multiple of {} (qzeros pack {} zeros per "
                "int32 along N)",
                who, n, d.pack, d.pack);
  d.packed_rows = k / d.pack;
  d.packed_cols = n;
  d.num_groups = k / d.group_size;
  d.group_n = 1;
  d.num_groups_n = n;
  return d;
}

// The qweight error for a wrong row count, naming the bit width the shape would fit.
[[noreturn]] void bad_qweight_shape(const Tensor& qweight, const QuantDims& d,
                                    const std::string& name, const std::string& k_from) {
  std::string hint;
  for (int other : {4, 8, 2, 3}) {
    if (other != d.bits && qweight.dim() == 2 && qweight.size(1) == d.n &&
        qweight.size(0) * 32 == d.k * other)
      hint = fmt::format(" — that is K*{}/32 rows: a {}-bit checkpoint read as {}-bit?", other,
                         other, d.bits);
  }
  MOELORA_THROW(
      "{}: expected i32 [K/{} = {}, N = {}] for {}-bit GPTQ (K = {} from {}), found {} "
      "{}{}",
      name, d.pack, d.packed_rows, d.n, d.bits, d.k, k_from, dtype_name(qweight.dtype()),
      shape_str(qweight.shape()), hint);
}

void check_sym_zeros(const Tensor& qzeros, const GptqConfig& cfg, const std::string& name) {
  const int32_t expected =
      (1 << (cfg.bits - 1)) - (cfg.zero_format == GptqZeroFormat::v1_minus_one);
  const std::optional<GptqZeroFormat> found = detect_gptq_zero_format(qzeros, cfg.bits);
  if (found && *found != cfg.zero_format) {
    MOELORA_THROW(
        "{}: every zero field is {}, which is the symmetric zero of a {} checkpoint, "
        "but the config declares {}: check checkpoint_format in quantize_config.json",
        name, (1 << (cfg.bits - 1)) - (*found == GptqZeroFormat::v1_minus_one ? 1 : 0),
        format_name(*found), format_name(cfg.zero_format));
  }
  if (found) return;
  const int pack = 32 / cfg.bits;
  const int32_t* z = qzeros.data<int32_t>();
  const int64_t cols = qzeros.size(1);
  for (int64_t i = 0; i < qzeros.numel(); ++i) {
    for (int j = 0; j < pack; ++j) {
      const uint32_t v = field(z[i], j, cfg.bits);
      MOELORA_CHECK(int32_t(v) == expected,
                    "{}[{}, {}] field {} (zero of column {}): sym: true expects the stored "
                    "constant {} ({}), found {}; the checkpoint has real zero points — set sym: "
                    "false",
                    name, i / cols, i % cols, j, (i % cols) * pack + j, expected,
                    format_name(cfg.zero_format), v);
    }
  }
}

}  // namespace

QuantDims gptq_dims(const GptqConfig& cfg, int64_t n, int64_t k) {
  return dims_for(cfg, n, k, "gptq");
}

std::optional<GptqZeroFormat> detect_gptq_zero_format(const Tensor& qzeros, int bits) {
  if (!qzeros.defined() || qzeros.dtype() != DType::i32 || qzeros.numel() == 0) return std::nullopt;
  // Symmetric v1 packs 2^(bits-1) - 1 in every field: 0x77777777 for 4 bits, 0x7f7f7f7f for 8.
  uint32_t v1 = 0, v2 = 0;
  for (int j = 0; j < 32 / bits; ++j) {
    v1 |= uint32_t((1 << (bits - 1)) - 1) << (j * bits);
    v2 |= uint32_t(1 << (bits - 1)) << (j * bits);
  }
  const int32_t* z = qzeros.data<int32_t>();
  const bool all_v1 =
      std::all_of(z, z + qzeros.numel(), [&](int32_t w) { return uint32_t(w) == v1; });
  if (all_v1) return GptqZeroFormat::v1_minus_one;
  const bool all_v2 =
      std::all_of(z, z + qzeros.numel(), [&](int32_t w) { return uint32_t(w) == v2; });
  if (all_v2) return GptqZeroFormat::v2_true;
  return std::nullopt;
}

QuantDims validate_gptq(const GptqTensors& t, const GptqConfig& cfg, const std::string& prefix) {
  const std::string qw = prefix + ".qweight", sc = prefix + ".scales", qz = prefix + ".qzeros",
                    gi = prefix + ".g_idx";
  detail::check_host_tensor(t.scales, sc);
  detail::check_host_tensor(t.qweight, qw);
  MOELORA_CHECK(t.scales.dim() == 2, "{}: expected a 2-D tensor [K/G, N], found {}", sc,
                shape_str(t.scales.shape()));
  const int64_t n = t.scales.size(1);
  int64_t k = 0;
  std::string k_from;
  if (t.g_idx.defined()) {
    detail::check_host_tensor(t.g_idx, gi);
    MOELORA_CHECK(t.g_idx.dim() == 1, "{}: expected a 1-D tensor [K], found {}", gi,
                  shape_str(t.g_idx.shape()));
    k = t.g_idx.size(0);
    k_from = gi;
  } else if (cfg.group_size != -1) {
    k = t.scales.size(0) * cfg.group_size;
    k_from = fmt::format("{} rows x group_size {}", sc, cfg.group_size);
  } else {
    MOELORA_CHECK(t.qweight.dim() == 2, "{}: expected a 2-D tensor, found {}", qw,
                  shape_str(t.qweight.shape()));
    k = t.qweight.size(0) * (32 / std::max(cfg.bits, 1));
    k_from = qw + " rows (per-channel, no g_idx)";
  }
  const QuantDims d = dims_for(cfg, n, k, prefix);
  if (t.qweight.dtype() != DType::i32 || t.qweight.shape() != Shape{d.packed_rows, d.n})
    bad_qweight_shape(t.qweight, d, qw, k_from);
  detail::check_float_tensor(t.scales, sc, {d.num_groups, d.n},
                             fmt::format("K/G = {}/{} groups, N = {}", d.k, d.group_size, d.n));
  detail::check_tensor(t.qzeros, qz, DType::i32, {d.num_groups, d.n / d.pack},
                       fmt::format("[K/G, N/{}] zero points packed along N", d.pack));
  detail::check_finite(t.scales, sc);
  if (t.g_idx.defined()) {
    const ActOrder a = act_order_from_g_idx(t.g_idx, d.k, d.num_groups, d.group_size, gi);
    MOELORA_CHECK(a.uniform,
                  "{}: every group must hold group_size = {} channels (GPTQ assigns "
                  "K/G channels per group), found an uneven assignment",
                  gi, d.group_size);
    MOELORA_CHECK(a.monotonic || cfg.desc_act,
                  "{}: g_idx is not monotonic (act-order) but the config says desc_act: false; "
                  "a kernel trusting the config would use the wrong scales",
                  gi);
  }
  if (cfg.sym) check_sym_zeros(t.qzeros, cfg, qz);
  return d;
}

int32_t gptq_q(const GptqTensors& t, int bits, int64_t n, int64_t k) {
  const int pack = 32 / bits;
  const int64_t cols = t.qweight.size(1);
  return int32_t(field(t.qweight.data<int32_t>()[(k / pack) * cols + n], int(k % pack), bits));
}

int32_t gptq_zero(const GptqTensors& t, const GptqConfig& cfg, int64_t g, int64_t n) {
  const int pack = 32 / cfg.bits;
  const int64_t cols = t.qzeros.size(1);
  const int32_t stored =
      int32_t(field(t.qzeros.data<int32_t>()[g * cols + n / pack], int(n % pack), cfg.bits));
  return cfg.zero_format == GptqZeroFormat::v1_minus_one ? stored + 1 : stored;
}

Tensor dequantize_gptq(const GptqTensors& t, const GptqConfig& cfg, const std::string& prefix) {
  const QuantDims d = validate_gptq(t, cfg, prefix);
  Tensor out = Tensor::empty({d.n, d.k}, DType::f32);
  float* w = out.data<float>();
  const int32_t* g_idx = t.g_idx.defined() ? t.g_idx.data<int32_t>() : nullptr;
  for (int64_t k = 0; k < d.k; ++k) {
    const int64_t g = g_idx ? g_idx[k] : k / d.group_size;
    for (int64_t n = 0; n < d.n; ++n) {
      const float s = detail::float_at(t.scales, g * d.n + n);
      w[n * d.k + k] = s * float(gptq_q(t, d.bits, n, k) - gptq_zero(t, cfg, g, n));
    }
  }
  return out;
}

GptqTensors quantize_gptq(const Tensor& weight, const GptqConfig& cfg,
                          const std::vector<int32_t>& act_order_perm) {
  int64_t n = 0, k = 0;
  const std::vector<float> w = detail::weight_values(weight, "quantize_gptq: weight", n, k);
  const QuantDims d = dims_for(cfg, n, k, "quantize_gptq");
  std::vector<int32_t> g_idx(static_cast<size_t>(k));
  if (!act_order_perm.empty()) {
    MOELORA_CHECK(cfg.desc_act, "quantize_gptq: an act-order permutation needs desc_act: true");
    MOELORA_CHECK(int64_t(act_order_perm.size()) == k,
                  "quantize_gptq: act-order permutation: expected {} entries (K), found {}", k,
                  act_order_perm.size());
    g_idx = g_idx_from_perm(act_order_perm, d.group_size);
  } else {
    for (int64_t i = 0; i < k; ++i) g_idx[size_t(i)] = int32_t(i / d.group_size);
  }
  const int maxq = (1 << cfg.bits) - 1;
  const bool v1 = cfg.zero_format == GptqZeroFormat::v1_minus_one;

  GptqTensors t;
  t.qweight = Tensor::zeros({d.packed_rows, n}, DType::i32);
  t.scales = Tensor::empty({d.num_groups, n}, DType::f16);
  t.qzeros = Tensor::zeros({d.num_groups, n / d.pack}, DType::i32);
  t.g_idx = Tensor::empty({k}, DType::i32);
  std::copy(g_idx.begin(), g_idx.end(), t.g_idx.data<int32_t>());
  auto* qweight = reinterpret_cast<uint32_t*>(t.qweight.data<int32_t>());
  auto* qzeros = reinterpret_cast<uint32_t*>(t.qzeros.data<int32_t>());
  f16_t* scales = t.scales.data<f16_t>();

  std::vector<float> lo(size_t(d.num_groups * n), 0.0f), hi(size_t(d.num_groups * n), 0.0f);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) {
      const size_t i = size_t(g_idx[size_t(c)] * n + r);
      lo[i] = std::min(lo[i], w[size_t(r * k + c)]);  // the range always includes 0
      hi[i] = std::max(hi[i], w[size_t(r * k + c)]);
    }
  std::vector<float> scale(lo.size());
  std::vector<int32_t> zero(lo.size());
  for (size_t i = 0; i < lo.size(); ++i) {
    float s;
    int32_t z;
    if (cfg.sym) {
      float amax = std::max(-lo[i], hi[i]);
      if (amax == 0.0f) amax = 1.0f;
      s = 2.0f * amax / float(maxq);
      z = (maxq + 1) / 2;
    } else {
      float a = lo[i], b = hi[i];
      if (a == 0.0f && b == 0.0f) a = -1.0f, b = 1.0f;
      s = (b - a) / float(maxq);
      z = int32_t(detail::round_even(-a / s));
      if (v1 && z == 0) {  // v1 cannot store a zero of 0: use zero 1 and stretch the scale
        z = 1;
        s = b / float(maxq - 1);
      }
    }
    scales[i] = float_to_f16(s);
    s = f16_to_float(scales[i]);
    if (!(s > 0.0f)) {  // underflowed to f16 zero: the smallest f16 subnormal keeps w / s finite
      scales[i] = f16_t{1};
      s = f16_to_float(scales[i]);
    }
    scale[i] = s;
    zero[i] = z;
    const uint32_t stored = uint32_t(v1 ? z - 1 : z) & uint32_t(maxq);
    const int64_t g = int64_t(i) / n, col = int64_t(i) % n;
    qzeros[g * (n / d.pack) + col / d.pack] |= stored << (cfg.bits * (col % d.pack));
  }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) {
      const size_t i = size_t(g_idx[size_t(c)] * n + r);
      const float q = detail::round_even(w[size_t(r * k + c)] / scale[i]) + float(zero[i]);
      const uint32_t qi = uint32_t(std::clamp(q, 0.0f, float(maxq)));
      qweight[(c / d.pack) * n + r] |= qi << (cfg.bits * (c % d.pack));
    }
  return t;
}

GptqTensors load_gptq(const SafetensorsFile& file, const std::string& prefix,
                      const GptqConfig& cfg) {
  GptqTensors t;
  t.qweight = file.tensor(prefix + ".qweight");
  t.scales = file.tensor(prefix + ".scales");
  t.qzeros = file.tensor(prefix + ".qzeros");
  if (file.contains(prefix + ".g_idx")) t.g_idx = file.tensor(prefix + ".g_idx");
  validate_gptq(t, cfg, prefix);
  return t;
}

void add_gptq_tensors(std::map<std::string, Tensor>& out, const std::string& prefix,
                      const GptqTensors& t) {
  out[prefix + ".qweight"] = t.qweight;
  out[prefix + ".scales"] = t.scales;
  out[prefix + ".qzeros"] = t.qzeros;
  if (t.g_idx.defined()) out[prefix + ".g_idx"] = t.g_idx;
}

}  // namespace moelora::quant
