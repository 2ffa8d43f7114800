// Token sampling: greedy, and seeded temperature / top-k / top-p. The random draw comes from a
// counter-based generator (splitmix64 of the seed and the step), so a request's tokens depend
// only on its own parameters and logits, never on what else runs in the batch.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "moelora/engine/engine.h"

namespace moelora {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in [0, 1) for (seed, step).
double uniform(uint64_t seed, int64_t step) {
  const uint64_t bits = splitmix64(splitmix64(seed) ^ splitmix64(uint64_t(step) + 0x5DEECE66Dull));
  return double(bits >> 11) * (1.0 / 9007199254740992.0);  // 53 bits
}

}  // namespace

int32_t sample_greedy(const float* logits, int64_t vocab) {
  MOELORA_CHECK(vocab > 0, "sample_greedy: empty vocabulary");
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return int32_t(best);
}

std::string check_sampling(const SamplingParams& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0)
    return fmt::format("temperature must be finite and >= 0, found {}", p.temperature);
  if (p.top_k < 0) return fmt::format("top_k must be >= 0 (0 = off), found {}", p.top_k);
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    return fmt::format("top_p must be in (0, 1], found {}", p.top_p);
  return "";
}

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p, int64_t step) {
  const std::string why = check_sampling(p);
  MOELORA_CHECK(why.empty(), "sampling: {}", why);
  if (p.temperature <= 0.0f) return sample_greedy(logits, vocab);
  MOELORA_CHECK(vocab > 0, "sample_token: empty vocabulary");
  // Candidates by decreasing logit (lower id first on ties), cut to top_k.
  std::vector<int32_t> idx(static_cast<size_t>(vocab));
  std::iota(idx.begin(), idx.end(), 0);
  const int64_t k = p.top_k > 0 ? std::min<int64_t>(p.top_k, vocab) : vocab;
  auto before = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), before);
  idx.resize(size_t(k));
  // Softmax of logits / temperature in double.
  std::vector<double> prob(idx.size());
  const double mx = double(logits[idx[0]]);
  double sum = 0;
  for (size_t i = 0; i < idx.size(); ++i) {
    prob[i] = std::exp((double(logits[idx[i]]) - mx) / double(p.temperature));
    sum += prob[i];
  }
  // Nucleus: the shortest prefix whose probability reaches top_p (at least one token).
  size_t keep = idx.size();
  if (p.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < idx.size(); ++i) {
      cum += prob[i] / sum;
      if (cum >= double(p.top_p)) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += prob[i];
  const double u = uniform(p.seed, step) * kept;
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += prob[i];
    if (u < cum) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace moelora
