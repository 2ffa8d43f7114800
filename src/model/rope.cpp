// RoPE frequencies from the config (see rope.h). The float / double split follows transformers:
// the frequency tensors are f32 (pos_freqs = base ** (arange(0, dim, 2) / dim), their
// reciprocals, the linear ramp and the blend), the correction range and the attention factor are
// Python floats (double) until they meet an f32 tensor.
#include "model/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "moelora/core/error.h"

namespace moelora {
namespace {

// yarn_get_mscale: 0.1 * mscale * ln(scale) + 1 above scale 1.
double yarn_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

// The YaRN factor: rope_parameters.factor, or max_position_embeddings over the original.
double yarn_factor(const HfModelConfig& c, int64_t original) {
  return c.yarn.factor > 0.0 ? c.yarn.factor : double(c.max_position_embeddings) / double(original);
}

int64_t yarn_original(const HfModelConfig& c) {
  return c.yarn.original_max_position > 0 ? c.yarn.original_max_position
                                          : c.max_position_embeddings;
}

}  // namespace

RopeFrequencies rope_frequencies(const HfModelConfig& c, int dim) {
  MOELORA_CHECK(dim > 0 && dim % 2 == 0, "{}: RoPE width must be even and > 0, found {}", c.path,
                dim);
  MOELORA_CHECK(c.rope_theta > 0.0, "{}: rope_theta must be > 0, found {}", c.path, c.rope_theta);
  const int half = dim / 2;
  RopeFrequencies f;
  f.inv_freq.resize(size_t(half));
  const float base = float(c.rope_theta);
  std::vector<float> pos_freqs(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) pos_freqs[size_t(i)] = std::pow(base, float(2 * i) / float(dim));
  if (c.rope_type == "default") {
    for (int i = 0; i < half; ++i) f.inv_freq[size_t(i)] = 1.0f / pos_freqs[size_t(i)];
    return f;
  }
  MOELORA_CHECK(c.rope_type == "yarn",
                "{}: rope type '{}' is not supported (\"default\" and \"yarn\" are)", c.path,
                c.rope_type);
  const YarnRope& y = c.yarn;
  const int64_t original = yarn_original(c);
  MOELORA_CHECK(original > 0,
                "{}: YaRN needs original_max_position_embeddings or max_position_embeddings > 0",
                c.path);
  const double factor = yarn_factor(c, original);
  MOELORA_CHECK(factor > 0.0 && std::isfinite(factor), "{}: YaRN factor must be > 0, found {}",
                c.path, factor);
  double attention = y.attention_factor;
  if (attention <= 0.0)
    attention = (y.mscale != 0.0 && y.mscale_all_dim != 0.0)
                    ? yarn_mscale(factor, y.mscale) / yarn_mscale(factor, y.mscale_all_dim)
                    : yarn_mscale(factor, 1.0);
  // The dims whose wavelength spans beta_fast .. beta_slow rotations over the original context.
  auto correction_dim = [&](double rotations) {
    return double(dim) * std::log(double(original) / (rotations * 2.0 * std::numbers::pi)) /
           (2.0 * std::log(c.rope_theta));
  };
  double low = correction_dim(y.beta_fast), high = correction_dim(y.beta_slow);
  if (y.truncate) low = std::floor(low), high = std::ceil(high);
  low = std::max(low, 0.0), high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;  // transformers' guard against a zero-width ramp
  const float low_f = float(low), width_f = float(high - low), factor_f = float(factor);
  for (int i = 0; i < half; ++i) {
    const float p = pos_freqs[size_t(i)];
    const float extrapolation = 1.0f / p, interpolation = 1.0f / (factor_f * p);
    const float ramp = std::clamp((float(i) - low_f) / width_f, 0.0f, 1.0f);
    const float keep = 1.0f - ramp;  // the share of the unscaled frequency
    f.inv_freq[size_t(i)] = interpolation * (1.0f - keep) + extrapolation * keep;
  }
  f.attention_scaling = float(attention);
  f.plain = false;
  return f;
}

RopeTable rope_table(const HfModelConfig& c, int dim, Device device) {
  const RopeFrequencies f = rope_frequencies(c, dim);
  RopeTable t;
  if (f.plain) return t;
  Tensor host = Tensor::empty({int64_t(f.inv_freq.size())}, DType::f32);
  std::copy(f.inv_freq.begin(), f.inv_freq.end(), host.data<float>());
  t.inv_freq = host.to(device);
  t.cos_sin_scale = f.attention_scaling;
  return t;
}

double deepseek_softmax_mscale2(const HfModelConfig& c) {
  if (c.rope_type == "default" || c.yarn.mscale_all_dim == 0.0) return 1.0;
  const double m = yarn_mscale(yarn_factor(c, yarn_original(c)), c.yarn.mscale_all_dim);
  return m * m;
}

}  // namespace moelora
