// CUDA MLA ops against the CPU reference ops: fresh random inputs, poisoned outputs, DeepSeek-
// V2-Lite-like shapes (16 heads, nope 128, rope 64, vd 128, L 512), the tiny fixtures' shapes and
// an odd one (3 heads: no 4-head groups, L not a multiple of 32); several sequences of different
// lengths over a paged cache with shuffled (non-contiguous) pages, f32 and bf16 caches and
// activations; kv_b_proj LoRA with mixed token slots (-1, adapters of different ranks, an empty
// slot). Each op gets the CPU op's own inputs, so a mismatch points at one op.
#include <algorithm>
#include <cmath>
#include <numeric>

#include <gtest/gtest.h>

#include "kernels/cpu/mla_ops.h"
#include "kernels/cpu/mla_step_ops.h"
#include "kernels/cuda/mla_ops.h"
#include "kernels/cuda/mla_ops_step.h"
#include "moelora/lora/dense_lora.h"
#include "test_util.h"

namespace moelora {
namespace {

Tensor gpu(const Tensor& t) { return t.to(Device::cuda()); }

Tensor poisoned(const Shape& s, DType dt) {
  Tensor t = Tensor::empty(s, dt, Device::cuda());
  t.fill_bytes(0xFF);  // NaN in f32 and bf16
  return t;
}

std::string dn(DType dt) { return std::string(dtype_name(dt)); }

// Relative tolerance of a result rounded to / read from dt.
double tol(DType dt) { return dt == DType::bf16 ? 1e-2 : 2e-5; }
// RoPE angles reach thousands of radians: one ulp of powf (glibc vs CUDA) in inv_freq moves
// them by ~5e-4 rad, so f32 RoPE agrees to ~1e-4, not to f32 rounding.
double rope_tol(DType dt) { return dt == DType::bf16 ? 1e-2 : 1e-4; }

struct MlaShape {
  const char* name;
  int heads, nope, rope, vd, L;
};

const MlaShape kShapes[] = {
    {"v2_lite", 16, 128, 64, 128, 512},
    {"tiny", 4, 16, 8, 16, 32},
    {"odd", 3, 20, 6, 12, 50},
};

// Sequences over a paged cache: page tables drawn from a shuffled pool of pages, and the query
// tokens of the step (a few positions of each sequence, decode-like, or a trailing chunk).
struct PagedCase {
  int page = 16;
  std::vector<int64_t> lens;
  Tensor block_table;                       // host i32 [S, max_pages]
  std::vector<int32_t> all_slots;           // cache slot of every (seq, pos), seq-major
  std::vector<int32_t> q_seq, q_pos;        // the query tokens
  int64_t num_pages = 0, rows_total = 0;
};

PagedCase make_paged(const std::vector<int64_t>& lens, int page, int per_seq_queries,
                     std::mt19937_64& rng) {
  PagedCase c;
  c.page = page;
  c.lens = lens;
  int64_t max_pages = 1, need = 0;
  for (int64_t l : lens) {
    max_pages = std::max(max_pages, (l + page - 1) / page);
    need += (l + page - 1) / page;
  }
  c.num_pages = need + 3;  // a few pages nobody uses
  std::vector<int32_t> pool(static_cast<size_t>(c.num_pages));
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<int32_t> bt(size_t(int64_t(lens.size()) * max_pages), -1);
  size_t next = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    const int64_t np = (lens[s] + page - 1) / page;
    for (int64_t j = 0; j < np; ++j) bt[s * size_t(max_pages) + size_t(j)] = pool[next++];
    for (int64_t p = 0; p < lens[s]; ++p)
      c.all_slots.push_back(bt[s * size_t(max_pages) + size_t(p / page)] * page +
                            int32_t(p % page));
    // The last position (decode) and a few random earlier ones.
    c.q_seq.push_back(int32_t(s));
    c.q_pos.push_back(int32_t(lens[s] - 1));
    for (int i = 1; i < per_seq_queries; ++i) {
      c.q_seq.push_back(int32_t(s));
      c.q_pos.push_back(int32_t(std::uniform_int_distribution<int64_t>(0, lens[s] - 1)(rng)));
    }
  }
  c.rows_total = int64_t(c.all_slots.size());
  c.block_table = test::from_ints(bt, {int64_t(lens.size()), max_pages});
  return c;
}

class MlaOpsGpu : public ::testing::TestWithParam<int> {};

// mla_rope (interleaved and rotate-half, q-like and kv-like layouts) and mla_cache_write.
TEST_P(MlaOpsGpu, RopeAndCacheWrite) {
  MOELORA_REQUIRE_GPU();
  const MlaShape sh = kShapes[GetParam()];
  std::mt19937_64 rng(test::fresh_seed());
  const Stream s = Stream::create(Device::cuda());
  const int64_t m = 37, qk = sh.nope + sh.rope, row = sh.L + sh.rope;
  const Tensor pos = test::random_ints({m}, rng, 0, 6000);
  for (DType dt : {DType::f32, DType::bf16})
    for (bool inter : {true, false}) {
      Tensor q = test::random_tensor({m, sh.heads * qk}, dt, rng);
      Tensor q_gpu = gpu(q);
      cpu::mla_rope(q, int(qk), sh.nope, sh.rope, pos, 10000.0, inter, Stream());
      cuda::mla_rope(q_gpu, int(qk), sh.nope, sh.rope, gpu(pos), 10000.0, inter, s);
      Tensor kv = test::random_tensor({m, row}, dt, rng);
      Tensor kv_gpu = gpu(kv);
      cpu::mla_rope(kv, int(row), sh.L, sh.rope, pos, 10000.0, inter, Stream());
      cuda::mla_rope(kv_gpu, int(row), sh.L, sh.rope, gpu(pos), 10000.0, inter, s);
      s.synchronize();  // the stream is non-blocking: finish before reading
      EXPECT_TRUE(test::allclose(test::to_floats(q_gpu), test::to_floats(q), rope_tol(dt), 1e-4))
          << sh.name << " q rope " << dn(dt) << " interleaved " << inter;
      EXPECT_TRUE(test::allclose(test::to_floats(kv_gpu), test::to_floats(kv), rope_tol(dt), 1e-4))
          << sh.name << " kv rope " << dn(dt) << " interleaved " << inter;

      // A frequency table (YaRN's) with a cos / sin scale, as the model passes it.
      const Tensor table = test::random_tensor({sh.rope / 2}, DType::f32, rng, 1e-5f, 1.0f);
      Tensor qt = test::random_tensor({m, sh.heads * qk}, dt, rng);
      Tensor qt_gpu = gpu(qt);
      cpu::mla_rope(qt, int(qk), sh.nope, sh.rope, pos, 10000.0, inter, Stream(), table, 1.2f);
      cuda::mla_rope(qt_gpu, int(qk), sh.nope, sh.rope, gpu(pos), 10000.0, inter, s, gpu(table),
                     1.2f);
      s.synchronize();
      EXPECT_TRUE(test::allclose(test::to_floats(qt_gpu), test::to_floats(qt), rope_tol(dt), 1e-4))
          << sh.name << " q rope with a table " << dn(dt) << " interleaved " << inter;

      // cache write into scattered slots (distinct), rest of the cache untouched
      for (DType ct : {DType::f32, DType::bf16}) {
        const int64_t pages = 9, page = 8;
        std::vector<int32_t> slots(static_cast<size_t>(pages * page));
        std::iota(slots.begin(), slots.end(), 0);
        std::shuffle(slots.begin(), slots.end(), rng);
        slots.resize(size_t(m));
        const Tensor sm = test::from_ints(slots, {m});
        Tensor cache = test::random_tensor({pages, page, 1, row}, ct, rng);
        Tensor cache_gpu = gpu(cache);
        cpu::mla_cache_write(kv, sm, cache, Stream());
        cuda::mla_cache_write(gpu(kv), gpu(sm), cache_gpu, s);
        s.synchronize();
        EXPECT_EQ(test::to_floats(cache_gpu), test::to_floats(cache))
            << sh.name << " cache_write " << dn(dt) << " -> " << dn(ct);
      }
    }
}

// The absorbed (decode) path op by op: absorb_q, paged latent attention, absorb_v, and the
// kv_b_proj LoRA corrections on both sides.
TEST_P(MlaOpsGpu, AbsorbedPath) {
  MOELORA_REQUIRE_GPU();
  const MlaShape sh = kShapes[GetParam()];
  std::mt19937_64 rng(test::fresh_seed());
  const Stream s = Stream::create(Device::cuda());
  const bool big = sh.L >= 256;
  const int64_t qk = sh.nope + sh.rope, row = sh.L + sh.rope;
  const int64_t wrows = int64_t(sh.heads) * (sh.nope + sh.vd);
  const PagedCase pc = big ? make_paged({1, 17, 300, 1203}, 16, 3, rng)
                           : make_paged({1, 5, 9, 64}, 4, 4, rng);
  const int64_t m = int64_t(pc.q_seq.size());
  const Tensor w = test::random_tensor({wrows, sh.L}, DType::bf16, rng, -0.1f, 0.1f);
  const Tensor w_gpu = gpu(w);
  const Tensor seq = test::from_ints(pc.q_seq, {m}), pos = test::from_ints(pc.q_pos, {m});
  const Tensor bt_gpu = gpu(pc.block_table), seq_gpu = gpu(seq), pos_gpu = gpu(pos);
  const float scale = 1.0f / std::sqrt(float(qk));

  // LoRA on kv_b_proj: slot 0 rank 8, slot 1 rank 3, slot 2 empty; tokens -1 / 0 / 1 / 2.
  const int r_max = 8;
  DenseLoraPool pool("kv_b_proj", sh.L, DenseLoraSlices::from_sizes({wrows}), 3, r_max,
                     Device::cpu());
  for (int slot = 0; slot < 2; ++slot) {
    const int64_t rank = slot == 0 ? 8 : 3;
    DenseLoraSlice sl;
    sl.a = test::random_tensor({rank, sh.L}, DType::f32, rng, -0.2f, 0.2f);
    sl.b = test::random_tensor({wrows, rank}, DType::f32, rng, -0.2f, 0.2f);
    sl.scale = slot == 0 ? 2.0f : 0.5f;
    pool.load(slot, {sl});
  }
  std::vector<int32_t> ts(static_cast<size_t>(m));
  for (int64_t t = 0; t < m; ++t) ts[size_t(t)] = int32_t(t % 4) - 1;
  const Tensor token_slot = test::from_ints(ts, {m});
  const Tensor la = gpu(pool.a()), lb = gpu(pool.b()), lr = gpu(pool.ranks()),
               ts_gpu = gpu(token_slot);

  for (DType ct : {DType::f32, DType::bf16}) {
    // The cache: every position of every sequence written by the op under test.
    const Tensor kv = test::random_tensor({pc.rows_total, row}, DType::f32, rng);
    const Tensor slots = test::from_ints(pc.all_slots, {pc.rows_total});
    Tensor cache = Tensor::zeros({pc.num_pages, pc.page, 1, row}, ct);
    cpu::mla_cache_write(kv, slots, cache, Stream());
    Tensor cache_gpu = poisoned(cache.shape(), ct);  // unused rows stay NaN: must not be read
    cuda::mla_cache_write(gpu(kv), gpu(slots), cache_gpu, s);

    for (DType qt : {DType::f32, DType::bf16}) {
      const std::string what = std::string(sh.name) + " cache " + dn(ct) + " q " +
                               dn(qt);
      const Tensor q = test::random_tensor({m, sh.heads * qk}, qt, rng);
      Tensor ql = Tensor::empty({m, sh.heads * row}, DType::f32);
      Tensor ql_gpu = poisoned(ql.shape(), DType::f32);
      cpu::mla_absorb_q(q, w, sh.heads, sh.nope, sh.rope, sh.vd, ql, Stream());
      cuda::mla_absorb_q(gpu(q), w_gpu, sh.heads, sh.nope, sh.rope, sh.vd, ql_gpu, s);
      s.synchronize();
      EXPECT_TRUE(test::allclose(test::to_floats(ql_gpu), test::to_floats(ql), tol(DType::f32)))
          << what << " absorb_q";

      // LoRA q side on the CPU's q_latent.
      Tensor ql_lora_gpu = gpu(ql);
      cpu::mla_lora_absorb_q(q, token_slot, pool.a(), pool.b(), pool.ranks(), sh.heads, sh.nope,
                             sh.rope, sh.vd, ql, Stream());
      cuda::mla_lora_absorb_q(gpu(q), ts_gpu, la, lb, lr, sh.heads, sh.nope, sh.rope, sh.vd,
                              ql_lora_gpu, s);
      s.synchronize();
      EXPECT_TRUE(
          test::allclose(test::to_floats(ql_lora_gpu), test::to_floats(ql), tol(DType::f32)))
          << what << " lora_absorb_q";

      // Attention on the CPU's q_latent (with LoRA), over the same cache contents.
      Tensor lat = Tensor::empty({m, int64_t(sh.heads) * sh.L}, DType::f32);
      Tensor lat_gpu = poisoned(lat.shape(), DType::f32);
      cpu::mla_paged_attention(ql, cache, pc.block_table, seq, pos, sh.heads, scale, lat,
                               Stream());
      cuda::mla_paged_attention(gpu(ql), cache_gpu, bt_gpu, seq_gpu, pos_gpu, sh.heads, scale,
                                lat_gpu, s);
      s.synchronize();
      EXPECT_TRUE(test::allclose(test::to_floats(lat_gpu), test::to_floats(lat), 1e-4))
          << what << " paged_attention";

      for (DType ot : {DType::f32, DType::bf16}) {
        Tensor out = Tensor::empty({m, int64_t(sh.heads) * sh.vd}, ot);
        Tensor out_gpu = poisoned(out.shape(), ot);
        cpu::mla_absorb_v(lat, w, sh.heads, sh.nope, sh.vd, out, Stream());
        cuda::mla_absorb_v(gpu(lat), w_gpu, sh.heads, sh.nope, sh.vd, out_gpu, s);
        s.synchronize();
        EXPECT_TRUE(test::allclose(test::to_floats(out_gpu), test::to_floats(out), tol(ot)))
            << what << " absorb_v -> " << dn(ot);
        if (ot != DType::f32) continue;
        Tensor out_lora_gpu = gpu(out);
        cpu::mla_lora_absorb_v(lat, token_slot, pool.a(), pool.b(), pool.ranks(), sh.heads,
                               sh.nope, sh.vd, out, Stream());
        cuda::mla_lora_absorb_v(gpu(lat), ts_gpu, la, lb, lr, sh.heads, sh.nope, sh.vd,
                                out_lora_gpu, s);
        s.synchronize();
        EXPECT_TRUE(
            test::allclose(test::to_floats(out_lora_gpu), test::to_floats(out), tol(DType::f32)))
            << what << " lora_absorb_v";
      }
    }
  }
}

// The expanded (prefill) path: gather each sequence's latent rows from the paged cache, then
// causal attention of a trailing chunk of queries over expanded K/V.
TEST_P(MlaOpsGpu, ExpandedPath) {
  MOELORA_REQUIRE_GPU();
  const MlaShape sh = kShapes[GetParam()];
  std::mt19937_64 rng(test::fresh_seed());
  const Stream s = Stream::create(Device::cuda());
  const bool big = sh.L >= 256;
  const int64_t qk = sh.nope + sh.rope, row = sh.L + sh.rope;
  const int64_t kv_cols = int64_t(sh.heads) * (sh.nope + sh.vd);
  const PagedCase pc = big ? make_paged({3, 130, 700}, 16, 1, rng)
                           : make_paged({1, 7, 40}, 4, 1, rng);
  const float scale = 1.0f / std::sqrt(float(qk));
  const Tensor bt_gpu = gpu(pc.block_table);
  for (DType ct : {DType::f32, DType::bf16}) {
    const Tensor kv = test::random_tensor({pc.rows_total, row}, ct, rng);
    const Tensor slots = test::from_ints(pc.all_slots, {pc.rows_total});
    Tensor cache = Tensor::zeros({pc.num_pages, pc.page, 1, row}, ct);
    cpu::mla_cache_write(kv, slots, cache, Stream());
    const Tensor cache_gpu = gpu(cache);
    for (size_t sq = 0; sq < pc.lens.size(); ++sq) {
      const int64_t len = pc.lens[sq], n = std::min<int64_t>(len, 48);
      const std::string what = std::string(sh.name) + " cache " + dn(ct) + " seq len " +
                               std::to_string(len);
      Tensor lat = Tensor::empty({len, row}, DType::f32), lat_gpu = poisoned({len, row}, DType::f32);
      cpu::mla_gather_latent(cache, pc.block_table, int(sq), len, lat, Stream());
      cuda::mla_gather_latent(cache_gpu, bt_gpu, int(sq), len, lat_gpu, s);
      s.synchronize();
      EXPECT_EQ(test::to_floats(lat_gpu), test::to_floats(lat)) << what << " gather_latent";

      const Tensor kvb = test::random_tensor({len, kv_cols}, DType::f32, rng);
      const Tensor q = test::random_tensor({n, sh.heads * qk}, DType::f32, rng);
      std::vector<int32_t> qpos(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) qpos[size_t(i)] = int32_t(len - n + i);
      const Tensor tp = test::from_ints(qpos, {n});
      Tensor out = Tensor::empty({n, int64_t(sh.heads) * sh.vd}, DType::f32);
      Tensor out_gpu = poisoned(out.shape(), DType::f32);
      cpu::mla_expanded_attention(q, kvb, lat, tp, sh.heads, sh.nope, sh.rope, sh.vd, scale, out,
                                  Stream());
      cuda::mla_expanded_attention(gpu(q), gpu(kvb), gpu(lat), gpu(tp), sh.heads, sh.nope,
                                   sh.rope, sh.vd, scale, out_gpu, s);
      s.synchronize();
      EXPECT_TRUE(test::allclose(test::to_floats(out_gpu), test::to_floats(out), 1e-4))
          << what << " expanded_attention";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, MlaOpsGpu, ::testing::Values(0, 1, 2),
                         [](const ::testing::TestParamInfo<int>& i) {
                           return std::string(kShapes[i.param].name);
                         });

// DeepSeek step ops: kv_a_layernorm on the compressed part of each kv row (k_pe untouched), and
// the group-limited router margins (V2 softmax / max, V3 sigmoid + bias / top-2 sum, plain
// top-k), with exact ties planted.
TEST(MlaStepOpsGpu, KvNormAndGroupedRouterMargin) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  const Stream s = Stream::create(Device::cuda());
  for (const MlaShape& sh : kShapes)
    for (DType dt : {DType::f32, DType::bf16}) {
      const int64_t m = 37, row = sh.L + sh.rope;
      Tensor kv = test::random_tensor({m, row}, dt, rng, -3.f, 3.f);
      const Tensor w = test::random_tensor({sh.L}, DType::bf16, rng, 0.5f, 1.5f);
      Tensor kv_gpu = gpu(kv);
      cpu::mla_kv_norm(kv, w, 1e-6f, Stream());
      cuda::mla_kv_norm(kv_gpu, gpu(w), 1e-6f, s);
      s.synchronize();
      EXPECT_TRUE(test::allclose(test::to_floats(kv_gpu), test::to_floats(kv), tol(dt), 1e-6))
          << sh.name << " kv_norm " << dn(dt);
    }

  auto router = [](int E, int k, int groups, int topk_groups, bool v3) {
    RouterConfig r;
    r.num_experts = E;
    r.top_k = k;
    r.n_group = groups;
    r.topk_group = topk_groups;
    r.scoring = v3 ? ScoringFunc::sigmoid : ScoringFunc::softmax;
    r.group_score = v3 ? GroupScore::top2_sum : GroupScore::max;
    r.use_correction_bias = v3;
    return r;
  };
  const RouterConfig configs[] = {router(64, 6, 8, 3, false), router(256, 8, 8, 4, true),
                                  router(60, 4, 1, 1, false), router(8, 2, 4, 2, false),
                                  router(8, 2, 4, 2, true)};
  for (const RouterConfig& rc : configs) {
    const int64_t m = 300, E = rc.num_experts, cols = 3;
    Tensor logits = test::random_tensor({m, E}, DType::f32, rng, -4.f, 4.f);
    float* l = logits.data<float>();
    for (int64_t t = 0; t < m; t += 3) l[t * E + (t % E)] = l[t * E + ((t + 1) % E)];  // ties
    const Tensor bias = test::random_tensor({E}, DType::f32, rng, -0.1f, 0.1f);
    Tensor margin = Tensor::zeros({m, cols}, DType::f32), margin_gpu = poisoned({m, cols}, DType::f32);
    for (int64_t c = 0; c < cols; ++c) {
      cpu::grouped_router_margin(logits, bias, rc, margin, c, Stream());
      cuda::grouped_router_margin(gpu(logits), gpu(bias), rc, margin_gpu, c, s);
    }
    s.synchronize();
    const auto got = test::to_floats(margin_gpu), want = test::to_floats(margin);
    int bad = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      const bool same = std::isinf(want[i]) ? got[i] == want[i]
                                            : std::fabs(got[i] - want[i]) <= 1e-6f * (1 + std::fabs(want[i]));
      if (!same && bad++ < 5)
        ADD_FAILURE() << "router E " << E << " groups " << rc.n_group << ": margin[" << i
                      << "] = " << got[i] << ", CPU " << want[i];
    }
    EXPECT_EQ(bad, 0);
  }
}

// The CUDA ops make the CPU ops' checks (shared header) and their own limits.
TEST(MlaOpsGpuChecks, BadArguments) {
  MOELORA_REQUIRE_GPU();
  const Stream s = Stream::create(Device::cuda());
  const int heads = 3, nope = 8, rope = 4, vd = 6, L = 16;
  Tensor q = Tensor::zeros({2, heads * (nope + rope)}, DType::f32, Device::cuda());
  Tensor w = Tensor::zeros({heads * (nope + vd) + 1, L}, DType::bf16, Device::cuda());
  Tensor ql = Tensor::zeros({2, heads * (L + rope)}, DType::f32, Device::cuda());
  test::expect_error([&] { cuda::mla_absorb_q(q, w, heads, nope, rope, vd, ql, s); },
                     "w_kv_b: expected bf16 [42 (heads x (nope + v)), L]");
  Tensor host_q = Tensor::zeros({2, heads * (nope + rope)}, DType::f32);
  Tensor good_w = Tensor::zeros({heads * (nope + vd), L}, DType::bf16, Device::cuda());
  test::expect_error([&] { cuda::mla_absorb_q(host_q, good_w, heads, nope, rope, vd, ql, s); },
                     "mla_absorb_q q");
  Tensor x = Tensor::zeros({2, 10}, DType::f32, Device::cuda());
  Tensor p = Tensor::zeros({2}, DType::i32, Device::cuda());
  test::expect_error([&] { cuda::mla_rope(x, 10, 8, 4, p, 1e4, true, s); },
                     "must fit the head stride 10");
  Tensor big_q = Tensor::zeros({2, 2 * (250 + 8)}, DType::f32, Device::cuda());
  Tensor kvb = Tensor::zeros({4, 2 * (250 + 8)}, DType::f32, Device::cuda());
  Tensor lat = Tensor::zeros({4, 24}, DType::f32, Device::cuda());
  Tensor out = Tensor::zeros({2, 2 * 8}, DType::f32, Device::cuda());
  test::expect_error(
      [&] { cuda::mla_expanded_attention(big_q, kvb, lat, p, 2, 250, 8, 8, 1.f, out, s); },
      "must be <= 256");
}

}  // namespace
}  // namespace moelora
