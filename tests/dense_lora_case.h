// A random dense-LoRA problem shared by the CPU and GPU tests: a pool of adapters with mixed
// ranks (one slice left without LoRA), a batch mixing base tokens and several slots, and the
// expected delta computed in double from the unpadded host A/B.
#pragma once

#include <cmath>
#include <random>
#include <vector>

#include "moelora/lora/dense_lora.h"
#include "test_util.h"

namespace moelora::test {

struct DenseLoraCase {
  int64_t k = 0;
  DenseLoraSlices slices;
  int slots = 0, r_max = 0;
  std::vector<std::vector<DenseLoraSlice>> adapters;  // [slot][slice]
  Tensor x, token_slot;                               // host bf16 [M, K], i32 [M]

  static DenseLoraCase make(int64_t m, int64_t k, const std::vector<int64_t>& widths,
                            const std::vector<std::vector<int>>& ranks, int r_max,
                            std::mt19937_64& rng) {
    DenseLoraCase c;
    c.k = k;
    c.slices = DenseLoraSlices::from_sizes(widths);
    c.slots = int(ranks.size());
    c.r_max = r_max;
    for (size_t s = 0; s < ranks.size(); ++s) {
      std::vector<DenseLoraSlice> ad;
      for (size_t j = 0; j < widths.size(); ++j) {
        DenseLoraSlice l;
        const int r = ranks[s][j];
        if (r > 0) {
          const float a = 1.0f / std::sqrt(float(k));
          l.a = random_tensor({r, k}, DType::bf16, rng, -a, a);
          l.b = random_tensor({widths[j], r}, DType::f32, rng, -0.5f, 0.5f);
          l.scale = 2.0f / float(r);
        }
        ad.push_back(l);
      }
      c.adapters.push_back(ad);
    }
    c.x = random_tensor({m, k}, DType::bf16, rng);
    std::vector<int32_t> ts(static_cast<size_t>(m));
    for (int64_t t = 0; t < m; ++t)
      ts[size_t(t)] = int32_t(int64_t(rng() % uint64_t(c.slots + 1)) - 1);  // -1 = base
    c.token_slot = from_ints(ts, {m});
    return c;
  }

  DenseLoraPool pool(Device d) const {
    DenseLoraPool p("test.qkv", k, slices, slots, r_max, d);
    for (int s = 0; s < slots; ++s) p.load(s, adapters[size_t(s)]);
    return p;
  }

  // The delta per token in double: scale * B . (A . x) with B, scale as given (f32 B rounds to
  // bf16 when loaded together with the scale, so compare at bf16 tolerance).
  std::vector<float> expected_delta() const {
    const int64_t m = x.size(0), n = slices.total();
    const auto xs = to_floats(x);
    const auto ts = to_ints(token_slot);
    std::vector<float> out(size_t(m * n), 0.0f);
    for (int64_t t = 0; t < m; ++t) {
      if (ts[size_t(t)] < 0) continue;
      for (int j = 0; j < slices.count; ++j) {
        const DenseLoraSlice& l = adapters[size_t(ts[size_t(t)])][size_t(j)];
        if (!l.defined()) continue;
        const int64_t r = l.a.size(0);
        const auto a = to_floats(l.a), b = to_floats(l.b);
        std::vector<double> u(size_t(r), 0.0);
        for (int64_t i = 0; i < r; ++i)
          for (int64_t c2 = 0; c2 < k; ++c2) u[size_t(i)] += double(a[size_t(i * k + c2)]) * xs[size_t(t * k + c2)];
        for (int64_t o = 0; o < slices.offset[size_t(j) + 1] - slices.offset[size_t(j)]; ++o) {
          double acc = 0;
          for (int64_t i = 0; i < r; ++i) acc += double(l.scale) * b[size_t(o * r + i)] * u[size_t(i)];
          out[size_t(t * n + slices.offset[size_t(j)] + o)] = float(acc);
        }
      }
    }
    return out;
  }
};

}  // namespace moelora::test
