// CUDA dense ops against the CPU reference: fresh random inputs, poisoned outputs, f32 and bf16
// activations, decode- and prefill-sized token counts, scattered KV pages.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cpu/dense_ops.h"
#include "kernels/cuda/dense_ops.h"
#include "test_util.h"

namespace moelora {
namespace {

Tensor gpu(const Tensor& t) {
  return t.to(Device::cuda());
}

Tensor poisoned(const Shape& s, DType dt) {
  Tensor t = Tensor::empty(s, dt, Device::cuda());
  t.fill_bytes(0xFF);
  return t;
}

double tol(DType dt) {
  return dt == DType::bf16 ? 1e-2 : 1e-4;
}

class DenseOpsGpu : public ::testing::TestWithParam<std::tuple<int64_t, DType>> {};

TEST_P(DenseOpsGpu, ElementwiseNormLinearRope) {
  MOELORA_REQUIRE_GPU();
  const auto [m, dt] = GetParam();
  std::mt19937_64 rng(test::fresh_seed());
  const Stream s = Stream::create(Device::cuda());
  const int64_t h = 200, k = 136, n = 70, vocab = 50;  // odd sizes on purpose (k % 8 == 0)

  // embedding
  Tensor ids = test::random_ints({m}, rng, 0, int(vocab) - 1);
  Tensor table = test::random_tensor({vocab, h}, DType::bf16, rng);
  Tensor e_cpu = Tensor::empty({m, h}, dt), e_gpu = poisoned({m, h}, dt);
  cpu::embedding(ids, table, e_cpu, Stream());
  cuda::embedding(gpu(ids), gpu(table), e_gpu, s);
  s.synchronize();  // the stream is non-blocking: finish before reading
  EXPECT_TRUE(test::allclose(test::to_floats(e_gpu), test::to_floats(e_cpu), 0, 0));

  // rms_norm, full rows and per head (D = 40 over [m, 200]); in place on the GPU
  for (int64_t d : {h, int64_t(40)}) {
    Tensor x = test::random_tensor({m, h}, dt, rng);
    Tensor w = test::random_tensor({d}, DType::bf16, rng, 0.5f, 1.5f);
    Tensor r_cpu = Tensor::empty({m, h}, dt);
    cpu::rms_norm(x, w, 1e-6f, r_cpu, Stream());
    Tensor r_gpu = gpu(x);
    cuda::rms_norm(r_gpu, gpu(w), 1e-6f, r_gpu, s);
    s.synchronize();  // the stream is non-blocking: finish before reading
    EXPECT_TRUE(test::allclose(test::to_floats(r_gpu), test::to_floats(r_cpu), tol(dt), 1e-5))
        << "rms_norm D=" << d;
  }

  // linear (x dtype = dt, y f32 and bf16)
  Tensor x = test::random_tensor({m, k}, dt, rng);
  Tensor w = test::random_tensor({n, k}, DType::bf16, rng, -0.2f, 0.2f);
  for (DType yt : {DType::f32, DType::bf16}) {
    Tensor y_cpu = Tensor::empty({m, n}, yt), y_gpu = poisoned({m, n}, yt);
    cpu::linear(x, w, y_cpu, Stream());
    cuda::linear(gpu(x), gpu(w), y_gpu, s);
    s.synchronize();  // the stream is non-blocking: finish before reading
    EXPECT_TRUE(test::allclose(test::to_floats(y_gpu), test::to_floats(y_cpu), tol(yt), 1e-5))
        << "linear";
  }

  // rope over 4 heads of 50... head_dim must be even: 5 heads of 40
  Tensor pos = test::random_ints({m}, rng, 0, 5000);
  Tensor q = test::random_tensor({m, h}, dt, rng);
  Tensor q_gpu = gpu(q);
  cpu::rope(q, 40, pos, 1e6, Stream());
  cuda::rope(q_gpu, 40, gpu(pos), 1e6, s);
  s.synchronize();  // the stream is non-blocking: finish before reading
  EXPECT_TRUE(test::allclose(test::to_floats(q_gpu), test::to_floats(q), tol(dt), 1e-4)) << "rope";

  // silu_mul, residual_add
  Tensor gu = test::random_tensor({m, 2 * n}, DType::f32, rng, -4, 4);
  Tensor a_cpu = Tensor::empty({m, n}, dt), a_gpu = poisoned({m, n}, dt);
  cpu::silu_mul(gu, a_cpu, Stream());
  cuda::silu_mul(gpu(gu), a_gpu, s);
  s.synchronize();  // the stream is non-blocking: finish before reading
  EXPECT_TRUE(test::allclose(test::to_floats(a_gpu), test::to_floats(a_cpu), tol(dt), 1e-6));
  Tensor r = test::random_tensor({m, n}, dt, rng),
         add = test::random_tensor({m, n}, DType::f32, rng);
  Tensor r_gpu = gpu(r);
  cpu::residual_add(r, add, Stream());
  cuda::residual_add(r_gpu, gpu(add), s);
  s.synchronize();  // the stream is non-blocking: finish before reading
  EXPECT_TRUE(test::allclose(test::to_floats(r_gpu), test::to_floats(r), tol(dt), 1e-6));
}

TEST_P(DenseOpsGpu, PagedAttention) {
  MOELORA_REQUIRE_GPU();
  const auto [m, dt] = GetParam();
  std::mt19937_64 rng(test::fresh_seed());
  const Stream s = Stream::create(Device::cuda());
  // (heads, kv heads, head_dim): the grouped-query cluster kernel's shapes (groups of 1..8,
  // head_dim 32..128), then ones only the plain kernel takes (head_dim 40, groups of 16).
  const int shapes[][3] = {{8, 2, 64}, {32, 4, 128}, {4, 4, 32}, {6, 3, 40}, {16, 1, 64}};
  // Up to 1600 positions: a cluster CTA's share (200) spans every warp and gives warp 0 a
  // second 32-position block. A bf16 cache past a few tokens takes the tensor-core kernel
  // (gqa_attention.cu).
  const int page = 16, seqs = 3, max_pages = 100;
  const int64_t pages = seqs * max_pages;
  int kvh = 0, d = 0;
  Tensor kc, vc;
  for (const auto& shape : shapes) {
    const int heads = shape[0];
    kvh = shape[1], d = shape[2];
    SCOPED_TRACE(::testing::Message() << "heads " << heads << " kv " << kvh << " d " << d);
    // A shuffled page assignment so each sequence's pages are scattered through the cache.
    std::vector<int32_t> order(static_cast<size_t>(pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    Tensor bt = test::from_ints(order, {seqs, max_pages});
    kc = test::random_tensor({pages, page, kvh, d}, dt, rng);
    vc = test::random_tensor({pages, page, kvh, d}, dt, rng);
    // Tokens: each to a random sequence and position (decode-like, long contexts included).
    std::vector<int32_t> ts(static_cast<size_t>(m)), tp(static_cast<size_t>(m));
    for (int64_t t = 0; t < m; ++t) {
      ts[size_t(t)] = int32_t(rng() % seqs);
      tp[size_t(t)] = int32_t(rng() % (max_pages * page));
    }
    if (m > 0) tp[0] = 0;  // a single position: seven of the eight cluster CTAs get none
    Tensor seq = test::from_ints(ts, {m}), posn = test::from_ints(tp, {m});
    Tensor q = test::random_tensor({m, heads * d}, dt, rng);
    Tensor o_cpu = Tensor::empty({m, heads * d}, dt), o_gpu = poisoned({m, heads * d}, dt);
    const float scale = 1.0f / std::sqrt(float(d));
    cpu::paged_attention(q, kc, vc, bt, seq, posn, scale, o_cpu, Stream());
    cuda::paged_attention(gpu(q), gpu(kc), gpu(vc), gpu(bt), gpu(seq), gpu(posn), scale, o_gpu, s);
    s.synchronize();  // the stream is non-blocking: finish before reading
    EXPECT_TRUE(test::allclose(test::to_floats(o_gpu), test::to_floats(o_cpu), tol(dt), 1e-4));
  }

  // kv_cache_write into poisoned caches, then read back.
  Tensor k = test::random_tensor({m, kvh * d}, dt, rng),
         v = test::random_tensor({m, kvh * d}, dt, rng);
  std::vector<int32_t> slots(static_cast<size_t>(pages * page));
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  slots.resize(size_t(std::min<int64_t>(m, pages * page)));
  Tensor sm = test::from_ints(slots, {int64_t(slots.size())});
  if (int64_t(slots.size()) == m) {
    Tensor kc_cpu = kc, vc_cpu = vc;  // same buffers: fine, CPU writes into copies below
    Tensor kc2 = Tensor::empty(kc.shape(), dt), vc2 = Tensor::empty(vc.shape(), dt);
    kc2.copy_from(kc);
    vc2.copy_from(vc);
    Tensor kg = gpu(kc), vg = gpu(vc);
    cpu::kv_cache_write(k, v, sm, kc2, vc2, Stream());
    cuda::kv_cache_write(gpu(k), gpu(v), gpu(sm), kg, vg, s);
    s.synchronize();  // the stream is non-blocking: finish before reading
    EXPECT_TRUE(test::allclose(test::to_floats(kg), test::to_floats(kc2), 0, 0));
    EXPECT_TRUE(test::allclose(test::to_floats(vg), test::to_floats(vc2), 0, 0));
  }
}

// attention_prologue: CUDA's one kernel gives exactly the bits of rms_norm (q_norm, k_norm),
// rope and kv_cache_write run one after another on CUDA, and the CPU's within tolerance.
// Head dims 64 / 128 / 256, grouped and plain kv heads, norms on and off, f32 and bf16 caches,
// padding slots (-1) and scattered slots; theta's frequencies and a frequency table with a
// cos / sin scale (YaRN's, as the model passes it).
TEST(DenseOpsGpu, AttentionPrologueMatchesTheOps) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  const Stream s = Stream::create(Device::cuda());
  struct Case {
    int d, heads, kv_heads;
    bool norms;
    DType cache;
  };
  for (const Case& c : {Case{128, 4, 2, true, DType::bf16}, Case{64, 8, 8, false, DType::f32},
                        Case{256, 2, 1, true, DType::f32}, Case{128, 6, 3, false, DType::bf16}}) {
    for (int64_t m : {1, 7, 37}) {
      const bool yarn = m != 7;
      SCOPED_TRACE(::testing::Message() << "d=" << c.d << " heads=" << c.heads << "/" << c.kv_heads
                                        << " norms=" << c.norms << " m=" << m << " yarn=" << yarn);
      const Tensor table =
          yarn ? test::random_tensor({c.d / 2}, DType::f32, rng, 1e-6f, 1.0f) : Tensor();
      const float scale = yarn ? 1.13f : 1.0f;
      const int64_t page = 4, pages = (m + page - 1) / page + 3, row = int64_t(c.kv_heads) * c.d;
      Tensor q = test::random_tensor({m, int64_t(c.heads) * c.d}, DType::f32, rng, -2, 2);
      Tensor k = test::random_tensor({m, row}, DType::f32, rng, -2, 2);
      Tensor v = test::random_tensor({m, row}, DType::f32, rng, -2, 2);
      Tensor qn = c.norms ? test::random_tensor({c.d}, DType::bf16, rng, 0.5f, 1.5f) : Tensor();
      Tensor kn = c.norms ? test::random_tensor({c.d}, DType::bf16, rng, 0.5f, 1.5f) : Tensor();
      Tensor pos = test::random_ints({m}, rng, 0, 30000);
      std::vector<int32_t> perm(size_t(pages * page));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      Tensor slots = Tensor::empty({m}, DType::i32);
      for (int64_t t = 0; t < m; ++t) slots.data<int32_t>()[t] = t % 5 == 3 ? -1 : perm[size_t(t)];
      const Shape cs{pages, page, c.kv_heads, c.d};
      const double theta = 1e6;
      const float eps = 1e-6f;
      // Fused (one kernel) and the ops one after another, both on CUDA from the same inputs.
      Tensor qf = gpu(q), kf = gpu(k), qs = gpu(q), ks = gpu(k), vg = gpu(v);
      Tensor kcf = poisoned(cs, c.cache), vcf = poisoned(cs, c.cache);
      Tensor kcs = poisoned(cs, c.cache), vcs = poisoned(cs, c.cache);
      const Tensor qng = c.norms ? gpu(qn) : Tensor(), kng = c.norms ? gpu(kn) : Tensor();
      const Tensor posg = gpu(pos), slotsg = gpu(slots), tableg = yarn ? gpu(table) : Tensor();
      cuda::attention_prologue(qf, kf, vg, qng, kng, eps, c.d, posg, theta, slotsg, kcf, vcf, s,
                               tableg, scale);
      if (c.norms) {
        cuda::rms_norm(qs, qng, eps, qs, s);
        cuda::rms_norm(ks, kng, eps, ks, s);
      }
      cuda::rope(qs, c.d, posg, theta, s, tableg, scale);
      cuda::rope(ks, c.d, posg, theta, s, tableg, scale);
      cuda::kv_cache_write(ks, vg, slotsg, kcs, vcs, s);
      // The CPU op.
      Tensor qc = Tensor::empty(q.shape(), DType::f32), kc = Tensor::empty(k.shape(), DType::f32);
      qc.copy_from(q);
      kc.copy_from(k);
      Tensor kcc = Tensor::zeros(cs, c.cache), vcc = Tensor::zeros(cs, c.cache);
      cpu::attention_prologue(qc, kc, v, qn, kn, eps, c.d, pos, theta, slots, kcc, vcc, Stream(),
                              table, scale);
      s.synchronize();  // the stream is non-blocking: finish before reading
      const auto bits = [](const Tensor& a, const Tensor& b) {
        const Tensor ah = a.to(Device::cpu()), bh = b.to(Device::cpu());
        return std::memcmp(ah.data(), bh.data(), ah.nbytes()) == 0;
      };
      EXPECT_TRUE(bits(qf, qs)) << "q";
      EXPECT_TRUE(bits(kf, ks)) << "k";
      EXPECT_TRUE(bits(kcf, kcs)) << "k cache";
      EXPECT_TRUE(bits(vcf, vcs)) << "v cache";
      EXPECT_TRUE(test::allclose(test::to_floats(qf), test::to_floats(qc), 1e-4, 1e-5))
          << "q vs CPU";
      EXPECT_TRUE(test::allclose(test::to_floats(kf), test::to_floats(kc), 1e-4, 1e-5))
          << "k vs CPU";
      // Cache rows the step wrote (the others stay poisoned on the GPU, zero on the CPU).
      const auto kg_h = test::to_floats(kcf), kc_h = test::to_floats(kcc);
      const auto vg_h = test::to_floats(vcf), vc_h = test::to_floats(vcc);
      const double tol = c.cache == DType::bf16 ? 1e-2 : 1e-4;
      for (int64_t t = 0; t < m; ++t) {
        const int32_t sl = slots.data<int32_t>()[t];
        if (sl < 0) continue;
        const std::vector<float> a(kg_h.begin() + sl * row, kg_h.begin() + (sl + 1) * row);
        const std::vector<float> b(kc_h.begin() + sl * row, kc_h.begin() + (sl + 1) * row);
        EXPECT_TRUE(test::allclose(a, b, tol, 1e-5)) << "k cache row of token " << t;
        const std::vector<float> va(vg_h.begin() + sl * row, vg_h.begin() + (sl + 1) * row);
        const std::vector<float> vb(vc_h.begin() + sl * row, vc_h.begin() + (sl + 1) * row);
        EXPECT_TRUE(test::allclose(va, vb, 0, 0)) << "v cache row of token " << t;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, DenseOpsGpu,
                         ::testing::Combine(::testing::Values(1, 7, 64, 257),
                                            ::testing::Values(DType::f32, DType::bf16)));

TEST(DenseOpsGpuErrors, BadInput) {
  MOELORA_REQUIRE_GPU();
  const Stream s = Stream::create(Device::cuda());
  Tensor x = Tensor::zeros({2, 12}, DType::bf16, Device::cuda());
  Tensor w = Tensor::zeros({4, 12}, DType::bf16, Device::cuda());
  Tensor y = Tensor::zeros({2, 4}, DType::f32, Device::cuda());
  test::expect_error([&] { cuda::linear(x, w, y, s); }, "not a multiple of 8");
  Tensor host = Tensor::zeros({2, 16}, DType::bf16);
  Tensor w16 = Tensor::zeros({4, 16}, DType::bf16, Device::cuda());
  test::expect_error([&] { cuda::linear(host, w16, y, s); }, "expected a CUDA tensor");
  Tensor y_bad = Tensor::zeros({2, 5}, DType::f32, Device::cuda());
  Tensor x16 = Tensor::zeros({2, 16}, DType::bf16, Device::cuda());
  test::expect_error([&] { cuda::linear(x16, w16, y_bad, s); }, "linear output y");
}

}  // namespace
}  // namespace moelora
