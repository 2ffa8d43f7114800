// CPU MLA ops (kernels/mla_ops.inc) against plain double loops: the absorbed path (q absorbed
// through W_UK, latent-space attention over a scattered paged cache, output through W_UV) equals
// attention over the expanded per-head K/V, and the kv_b_proj LoRA correction on the absorbed
// path (REFERENCE.md) equals running with the merged weight W_kv_b + s.B.A, per token slot.
#include <cmath>

#include "kernels/cpu/dense_ops.h"
#include "kernels/cpu/mla_ops.h"
#include "moelora/lora/dense_lora.h"
#include "test_util.h"

namespace moelora {
namespace {

constexpr int kHeads = 3, kNope = 8, kRope = 4, kVd = 6, kL = 16, kRank = 3;

struct MlaCase {
  int64_t m = 0;
  std::vector<int32_t> seq, pos, slots;  // per token
  Tensor block_table;                    // [2, 4]
  int page = 4;
};

// Two sequences of 9 and 6 tokens over scattered pages of 4 (all tokens of both in one step,
// as a prefill; each token attends to its own sequence's prefix).
MlaCase make_case() {
  MlaCase c;
  const std::vector<std::vector<int32_t>> pages = {{5, 0, 7, -1}, {2, 6, -1, -1}};
  const int lens[2] = {9, 6};
  std::vector<int32_t> bt;
  for (const auto& p : pages) bt.insert(bt.end(), p.begin(), p.end());
  c.block_table = test::from_ints(bt, {2, 4});
  for (int s = 0; s < 2; ++s)
    for (int p = 0; p < lens[s]; ++p) {
      c.seq.push_back(s);
      c.pos.push_back(p);
      c.slots.push_back(pages[size_t(s)][size_t(p / c.page)] * c.page + p % c.page);
    }
  c.m = int64_t(c.seq.size());
  return c;
}

// Reference: per head K_nope = W_UK.c, V = W_UV.c with W = W_kv_b (+ B.A for the token's slot),
// in double.
std::vector<float> expanded_reference(const MlaCase& c, const std::vector<float>& q,
                                      const std::vector<float>& kv, const std::vector<float>& w,
                                      const DenseLoraPool* pool, const std::vector<int32_t>& ts,
                                      float scale) {
  const int qk = kNope + kRope, row = kL + kRope, wr = kNope + kVd;
  std::vector<float> out(size_t(c.m * kHeads * kVd));
  std::vector<float> a, b;
  if (pool) {
    a = test::to_floats(pool->a());
    b = test::to_floats(pool->b());
  }
  const int64_t r_max = pool ? pool->r_max() : 0, n_out = int64_t(kHeads) * wr;
  for (int64_t t = 0; t < c.m; ++t) {
    // Effective weight for this token.
    std::vector<double> we(w.begin(), w.end());
    if (pool && ts[size_t(t)] >= 0) {
      const int s = ts[size_t(t)];
      for (int64_t n = 0; n < n_out; ++n)
        for (int64_t k = 0; k < kL; ++k)
          for (int64_t r = 0; r < r_max; ++r)
            we[size_t(n * kL + k)] += double(b[size_t((s * n_out + n) * r_max + r)]) *
                                      a[size_t((s * r_max + r) * kL + k)];
    }
    for (int h = 0; h < kHeads; ++h) {
      std::vector<double> sc;
      std::vector<std::vector<double>> vals;
      for (int64_t j = 0; j < c.m; ++j) {
        if (c.seq[size_t(j)] != c.seq[size_t(t)] || c.pos[size_t(j)] > c.pos[size_t(t)]) continue;
        const float* cj = kv.data() + j * row;
        double s = 0;
        for (int i = 0; i < kNope; ++i) {
          double k = 0;
          for (int l = 0; l < kL; ++l) k += we[size_t((h * wr + i) * kL + l)] * cj[l];
          s += double(q[size_t(t * kHeads * qk + h * qk + i)]) * k;
        }
        for (int i = 0; i < kRope; ++i)
          s += double(q[size_t(t * kHeads * qk + h * qk + kNope + i)]) * cj[kL + i];
        sc.push_back(s * scale);
        std::vector<double> v(kVd);
        for (int i = 0; i < kVd; ++i)
          for (int l = 0; l < kL; ++l) v[size_t(i)] += we[size_t((h * wr + kNope + i) * kL + l)] * cj[l];
        vals.push_back(v);
      }
      const double mx = *std::max_element(sc.begin(), sc.end());
      double sum = 0;
      for (double& s : sc) sum += (s = std::exp(s - mx));
      for (int i = 0; i < kVd; ++i) {
        double o = 0;
        for (size_t j = 0; j < sc.size(); ++j) o += sc[j] / sum * vals[j][size_t(i)];
        out[size_t((t * kHeads + h) * kVd + i)] = float(o);
      }
    }
  }
  return out;
}

struct MlaInputs {
  Tensor q, kv, w, cache, token_slot;
};

std::vector<float> absorbed(const MlaCase& c, MlaInputs& r, const DenseLoraPool* pool, float scale,
                            DType cache_dtype) {
  const Stream st = Stream::create(Device::cpu());
  r.cache = Tensor::zeros({8, c.page, 1, kL + kRope}, cache_dtype);
  const Tensor slots = test::from_ints(c.slots, {c.m}), seq = test::from_ints(c.seq, {c.m}),
               pos = test::from_ints(c.pos, {c.m});
  cpu::mla_cache_write(r.kv, slots, r.cache, st);
  Tensor q_lat = Tensor::empty({c.m, kHeads * (kL + kRope)}, DType::f32);
  cpu::mla_absorb_q(r.q, r.w, kHeads, kNope, kRope, kVd, q_lat, st);
  if (pool)
    cpu::mla_lora_absorb_q(r.q, r.token_slot, pool->a(), pool->b(), pool->ranks(), kHeads, kNope,
                           kRope, kVd, q_lat, st);
  Tensor lat = Tensor::empty({c.m, kHeads * kL}, DType::f32);
  cpu::mla_paged_attention(q_lat, r.cache, c.block_table, seq, pos, kHeads, scale, lat, st);
  Tensor out = Tensor::empty({c.m, kHeads * kVd}, DType::f32);
  cpu::mla_absorb_v(lat, r.w, kHeads, kNope, kVd, out, st);
  if (pool)
    cpu::mla_lora_absorb_v(lat, r.token_slot, pool->a(), pool->b(), pool->ranks(), kHeads, kNope,
                           kVd, out, st);
  return test::to_floats(out);
}

TEST(MlaOps, AbsorbedPathEqualsExpandedAttention) {
  std::mt19937_64 rng(test::fresh_seed());
  const MlaCase c = make_case();
  MlaInputs r;
  r.q = test::random_tensor({c.m, kHeads * (kNope + kRope)}, DType::f32, rng);
  r.kv = test::random_tensor({c.m, kL + kRope}, DType::f32, rng);
  r.w = test::random_tensor({kHeads * (kNope + kVd), kL}, DType::bf16, rng, -0.3f, 0.3f);
  const float scale = 1.0f / std::sqrt(float(kNope + kRope));
  const auto got = absorbed(c, r, nullptr, scale, DType::f32);
  const auto want = expanded_reference(c, test::to_floats(r.q), test::to_floats(r.kv),
                                       test::to_floats(r.w), nullptr, {}, scale);
  EXPECT_TRUE(test::allclose(got, want, 1e-5));
  // A bf16 latent cache rounds the rows once: bf16-level agreement.
  const auto got_bf16 = absorbed(c, r, nullptr, scale, DType::bf16);
  EXPECT_TRUE(test::allclose(got_bf16, want, 1e-2));
}

// The expanded path (latent rows gathered from the paged cache, K/V through kv_b_proj, causal
// attention per sequence) equals the same double-precision reference.
TEST(MlaOps, ExpandedPathEqualsReference) {
  std::mt19937_64 rng(test::fresh_seed());
  const MlaCase c = make_case();
  MlaInputs r;
  r.q = test::random_tensor({c.m, kHeads * (kNope + kRope)}, DType::f32, rng);
  r.kv = test::random_tensor({c.m, kL + kRope}, DType::f32, rng);
  r.w = test::random_tensor({kHeads * (kNope + kVd), kL}, DType::bf16, rng, -0.3f, 0.3f);
  const float scale = 1.0f / std::sqrt(float(kNope + kRope));
  const Stream st = Stream::create(Device::cpu());
  Tensor cache = Tensor::zeros({8, c.page, 1, kL + kRope}, DType::f32);
  cpu::mla_cache_write(r.kv, test::from_ints(c.slots, {c.m}), cache, st);
  Tensor out = Tensor::empty({c.m, kHeads * kVd}, DType::f32);
  int64_t row0 = 0;
  for (int s = 0; s < 2; ++s) {
    int64_t n = 0;
    while (row0 + n < c.m && c.seq[size_t(row0 + n)] == s) ++n;
    Tensor lat = Tensor::empty({n, kL + kRope}, DType::f32), ckv = Tensor::empty({n, kL}, DType::f32);
    cpu::mla_gather_latent(cache, c.block_table, s, n, lat, st);
    for (int64_t j = 0; j < n; ++j)
      std::copy_n(lat.data<float>() + j * (kL + kRope), kL, ckv.data<float>() + j * kL);
    Tensor kvb = Tensor::empty({n, kHeads * (kNope + kVd)}, DType::f32);
    cpu::linear(ckv, r.w, kvb, st);
    Tensor o = out.narrow(0, row0, n);
    cpu::mla_expanded_attention(r.q.narrow(0, row0, n), kvb, lat,
                                test::from_ints(std::vector<int32_t>(c.pos.begin() + row0,
                                                                     c.pos.begin() + row0 + n),
                                                {n}),
                                kHeads, kNope, kRope, kVd, scale, o, st);
    row0 += n;
  }
  const auto want = expanded_reference(c, test::to_floats(r.q), test::to_floats(r.kv),
                                       test::to_floats(r.w), nullptr, {}, scale);
  EXPECT_TRUE(test::allclose(test::to_floats(out), want, 1e-5));
  // And the absorbed path on the same inputs.
  EXPECT_TRUE(test::allclose(absorbed(c, r, nullptr, scale, DType::f32), test::to_floats(out), 1e-5));
}

// The kv_b_proj LoRA correction on the absorbed path equals the merged weight per token slot
// (two adapters of different ranks, base tokens untouched).
TEST(MlaOps, KvBProjLoraCorrectionEqualsMergedWeight) {
  std::mt19937_64 rng(test::fresh_seed());
  const MlaCase c = make_case();
  MlaInputs r;
  r.q = test::random_tensor({c.m, kHeads * (kNope + kRope)}, DType::f32, rng);
  r.kv = test::random_tensor({c.m, kL + kRope}, DType::f32, rng);
  r.w = test::random_tensor({kHeads * (kNope + kVd), kL}, DType::bf16, rng, -0.3f, 0.3f);
  const int64_t n_out = int64_t(kHeads) * (kNope + kVd);
  DenseLoraPool pool("layers.0.self_attn.kv_b_proj", kL, DenseLoraSlices::from_sizes({n_out}), 2,
                     kRank + 1, Device::cpu());
  for (int s = 0; s < 2; ++s) {
    const int64_t rank = s == 0 ? kRank : 1;
    DenseLoraSlice sl;
    sl.a = test::random_tensor({rank, kL}, DType::f32, rng, -0.5f, 0.5f);
    sl.b = test::random_tensor({n_out, rank}, DType::f32, rng, -0.5f, 0.5f);
    sl.scale = s == 0 ? 2.0f : 0.7f;
    pool.load(s, {sl});
  }
  std::vector<int32_t> ts(size_t(c.m));
  for (int64_t t = 0; t < c.m; ++t) ts[size_t(t)] = int32_t(t % 3) - 1;  // -1, 0, 1, ...
  r.token_slot = test::from_ints(ts, {c.m});
  const float scale = 1.0f / std::sqrt(float(kNope + kRope));
  const auto got = absorbed(c, r, &pool, scale, DType::f32);
  const auto want = expanded_reference(c, test::to_floats(r.q), test::to_floats(r.kv),
                                       test::to_floats(r.w), &pool, ts, scale);
  EXPECT_TRUE(test::allclose(got, want, 1e-5));
  // Base tokens: bit-identical to the run without LoRA.
  MlaInputs base = r;
  const auto plain = absorbed(c, base, nullptr, scale, DType::f32);
  for (int64_t t = 0; t < c.m; ++t)
    for (int64_t i = 0; i < kHeads * kVd; ++i) {
      const size_t k = size_t(t * kHeads * kVd + i);
      if (ts[size_t(t)] < 0) {
        EXPECT_EQ(got[k], plain[k]);
      }
    }
  // Without the correction the adapter tokens are off: the correction is what matches.
  EXPECT_FALSE(test::allclose(plain, want, 1e-3));
}

// Interleaved RoPE rotates pairs (2i, 2i+1) (DeepSeek's complex rotation); rotate-half equals
// the dense op's rope; only the rope part of each head moves.
TEST(MlaOps, RopeOnTheRopePart) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t m = 5, stride = kNope + kRope;
  const Tensor x0 = test::random_tensor({m, kHeads * stride}, DType::f32, rng);
  const Tensor pos = test::from_ints({0, 1, 7, 30, 63}, {m});
  const Stream st = Stream::create(Device::cpu());
  const double theta = 10000.0;
  Tensor x = Tensor::empty(x0.shape(), DType::f32);
  x.copy_from(x0);
  cpu::mla_rope(x, int(stride), kNope, kRope, pos, theta, /*interleaved=*/true, st);
  const auto a = test::to_floats(x), a0 = test::to_floats(x0);
  for (int64_t t = 0; t < m; ++t)
    for (int h = 0; h < kHeads; ++h) {
      const int64_t base = t * kHeads * stride + h * stride;
      for (int i = 0; i < kNope; ++i) EXPECT_EQ(a[size_t(base + i)], a0[size_t(base + i)]);
      for (int i = 0; i < kRope / 2; ++i) {
        const double f = pos.data<int32_t>()[t] * std::pow(theta, -2.0 * i / kRope);
        const double re = a0[size_t(base + kNope + 2 * i)], im = a0[size_t(base + kNope + 2 * i + 1)];
        EXPECT_NEAR(a[size_t(base + kNope + 2 * i)], re * std::cos(f) - im * std::sin(f), 1e-4);
        EXPECT_NEAR(a[size_t(base + kNope + 2 * i + 1)], im * std::cos(f) + re * std::sin(f), 1e-4);
      }
    }
  // Rotate-half over whole heads (offset 0) is the dense rope.
  Tensor y = Tensor::empty(x0.shape(), DType::f32), z = Tensor::empty(x0.shape(), DType::f32);
  y.copy_from(x0);
  z.copy_from(x0);
  cpu::mla_rope(y, int(stride), 0, int(stride), pos, theta, /*interleaved=*/false, st);
  cpu::rope(z, int(stride), pos, theta, st);
  EXPECT_EQ(test::to_floats(y), test::to_floats(z));
}

// A frequency table (YaRN's) replaces theta's frequencies and cos / sin take its scale: theta's
// own table gives theta's bits, any table the rotation by its frequencies times the scale.
TEST(MlaOps, RopeFrequencyTableAndScale) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t m = 4, stride = kNope + kRope;
  const Tensor x0 = test::random_tensor({m, kHeads * stride}, DType::f32, rng);
  const Tensor pos = test::from_ints({0, 3, 17, 250}, {m});
  const Stream st = Stream::create(Device::cpu());
  const double theta = 10000.0;
  auto run = [&](const Tensor& table, float scale) {
    Tensor x = Tensor::empty(x0.shape(), DType::f32);
    x.copy_from(x0);
    cpu::mla_rope(x, int(stride), kNope, kRope, pos, theta, true, st, table, scale);
    return test::to_floats(x);
  };
  std::vector<float> own;
  for (int i = 0; i < kRope / 2; ++i)
    own.push_back(1.0f / std::pow(float(theta), float(2 * i) / float(kRope)));
  EXPECT_EQ(run(test::from_floats(own, {kRope / 2}, DType::f32), 1.0f), run(Tensor(), 1.0f));

  const std::vector<float> table = {0.25f, 0.0031f};
  const float scale = 1.3f;
  const auto a = run(test::from_floats(table, {kRope / 2}, DType::f32), scale),
             a0 = test::to_floats(x0);
  for (int64_t t = 0; t < m; ++t)
    for (int h = 0; h < kHeads; ++h) {
      const int64_t base = t * kHeads * stride + h * stride + kNope;
      for (int i = 0; i < kRope / 2; ++i) {
        const double f = double(pos.data<int32_t>()[t]) * table[size_t(i)];
        const double re = a0[size_t(base + 2 * i)], im = a0[size_t(base + 2 * i + 1)];
        EXPECT_NEAR(a[size_t(base + 2 * i)], scale * (re * std::cos(f) - im * std::sin(f)), 1e-4);
        EXPECT_NEAR(a[size_t(base + 2 * i + 1)], scale * (im * std::cos(f) + re * std::sin(f)),
                    1e-4);
      }
    }
  Tensor x = Tensor::empty(x0.shape(), DType::f32);
  test::expect_error(
      [&] {
        cpu::mla_rope(x, int(stride), kNope, kRope, pos, theta, true, st,
                      test::from_floats({1.0f, 2.0f, 3.0f}, {3}, DType::f32), 1.0f);
      },
      "mla_rope inv_freq");
  test::expect_error(
      [&] { cpu::mla_rope(x, int(stride), kNope, kRope, pos, theta, true, st, Tensor(), 0.0f); },
      "cos_sin_scale must be finite and > 0");
}

TEST(MlaOps, BadArguments) {
  const Stream st = Stream::create(Device::cpu());
  const int64_t m = 2;
  Tensor q = Tensor::zeros({m, kHeads * (kNope + kRope)}, DType::f32);
  Tensor w = Tensor::zeros({kHeads * (kNope + kVd) + 1, kL}, DType::bf16);
  Tensor q_lat = Tensor::zeros({m, kHeads * (kL + kRope)}, DType::f32);
  test::expect_error([&] { cpu::mla_absorb_q(q, w, kHeads, kNope, kRope, kVd, q_lat, st); },
                     "w_kv_b: expected bf16 [42 (heads x (nope + v)), L]");
  Tensor x = Tensor::zeros({m, 10}, DType::f32);
  test::expect_error(
      [&] {
        cpu::mla_rope(x, 10, 8, 4, test::from_ints({0, 1}, {m}), 1e4, true, st);
      },
      "must fit the head stride 10");
  Tensor cache = Tensor::zeros({2, 4, 1, kL + kRope}, DType::f32);
  Tensor kv = Tensor::zeros({m, kL + kRope}, DType::f32);
  test::expect_error([&] { cpu::mla_cache_write(kv, test::from_ints({0, 8}, {m}), cache, st); },
                     "slot_mapping[1]=8 outside the cache's 8 slots");
  DenseLoraPool pool("kv_b", kL, DenseLoraSlices::from_sizes({kHeads * (kNope + kVd)}), 1, 2,
                     Device::cpu());
  Tensor good_w = Tensor::zeros({kHeads * (kNope + kVd), kL}, DType::bf16);
  test::expect_error(
      [&] {
        cpu::mla_lora_absorb_q(q, test::from_ints({0, 1}, {m}), pool.a(), pool.b(), pool.ranks(),
                               kHeads, kNope, kRope, kVd, q_lat, st);
      },
      "token_slot[1] = 1: expected -1 or 0..0");
}

}  // namespace
}  // namespace moelora
