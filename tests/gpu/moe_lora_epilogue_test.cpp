// The bf16 expert GEMMs with the LoRA expand in their epilogue (kernels/cuda/moe_lora_epilogue.h)
// and the fast path's shrink, on fresh random inputs, against the CPU reference (x, W and the
// LoRA of each slot) and against the hook path's kernels: base tokens mixed with adapters of
// ranks 8/16/32/64 (and 128 in an r_max 128 pool), separate and fused gate_up LoRAs, adapters
// targeting only some of gate/up/down; base tokens bit-identical to the LoRA-off kernels;
// rows of unrouted slots left poisoned; every tile shape the heuristics can pick.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gpu_op_test_util.h"
#include "kernels/cpu/moe_ops.h"
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_gemm_config.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_lora_epilogue.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/lora/moe_lora.h"

namespace moelora {
namespace {

using test::poisoned;
using test::to_gpu;

constexpr int kAdapters = 5;

MoeShape epi_shape() {
  MoeShape s;
  s.name = "lora-epilogue-test";
  s.hidden = 512, s.inter = 256, s.num_experts = 16, s.top_k = 4;
  return s;
}

Tensor rnd(const Shape& shape, std::mt19937_64& rng, float a) {
  return test::random_tensor(shape, DType::f32, rng, -a, a);
}

// 0: separate gate r8 / up r16, down r8.   1: fused gate_up r16, down r_max.
// 2: separate gate r32 / up r32, no down.  3: fused gate_up r_max, down r32.
// 4: gate only r8 (no up), down r16.
std::vector<MoeLoraWeights> make_adapters(const MoeShape& s, int r_max, std::mt19937_64& rng) {
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  const float a = 0.5f, b = 0.25f;
  std::vector<MoeLoraWeights> w(kAdapters);
  w[0].gate_a = rnd({E, 8, H}, rng, a), w[0].gate_b = rnd({E, I, 8}, rng, b);
  w[0].up_a = rnd({E, 16, H}, rng, a), w[0].up_b = rnd({E, I, 16}, rng, b);
  w[0].down_a = rnd({E, 8, I}, rng, a), w[0].down_b = rnd({E, H, 8}, rng, b);
  w[0].gate_scale = 2.0f, w[0].up_scale = 0.5f, w[0].down_scale = 1.5f;
  w[1].gate_up_a = rnd({E, 16, H}, rng, a), w[1].gate_up_b = rnd({E, 2 * I, 16}, rng, b);
  w[1].down_a = rnd({E, r_max, I}, rng, a), w[1].down_b = rnd({E, H, r_max}, rng, b);
  w[1].gate_up_scale = 1.5f, w[1].down_scale = 0.25f;
  w[2].gate_a = rnd({E, 32, H}, rng, a), w[2].gate_b = rnd({E, I, 32}, rng, b);
  w[2].up_a = rnd({E, 32, H}, rng, a), w[2].up_b = rnd({E, I, 32}, rng, b);
  w[3].gate_up_a = rnd({E, r_max, H}, rng, a), w[3].gate_up_b = rnd({E, 2 * I, r_max}, rng, b);
  w[3].down_a = rnd({E, 32, I}, rng, a), w[3].down_b = rnd({E, H, 32}, rng, b);
  w[3].gate_up_scale = 0.125f;
  w[4].gate_a = rnd({E, 8, H}, rng, a), w[4].gate_b = rnd({E, I, 8}, rng, b);
  w[4].down_a = rnd({E, 16, I}, rng, a), w[4].down_b = rnd({E, H, 16}, rng, b);
  return w;
}

struct Pools {
  MoeLoraPool cpu, gpu;
  Pools(const MoeShape& s, int r_max, std::mt19937_64& rng)
      : cpu(s, kAdapters, r_max, Device::cpu()), gpu(s, kAdapters, r_max, Device::cuda()) {
    const auto adapters = make_adapters(s, r_max, rng);
    for (int i = 0; i < kAdapters; ++i) {
      cpu.load(i, adapters[size_t(i)]);
      gpu.load(i, adapters[size_t(i)]);
    }
    test::device_sync();
  }
};

// ids [M, k]: distinct experts per token, ~1/8 of them -1 (unrouted: their rows stay unwritten).
Tensor random_ids(int64_t m, const MoeShape& s, std::mt19937_64& rng) {
  std::vector<int32_t> ids(size_t(m * s.top_k)), perm(size_t(s.num_experts));
  for (int e = 0; e < s.num_experts; ++e) perm[size_t(e)] = e;
  for (int64_t t = 0; t < m; ++t) {
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < s.top_k; ++j)
      ids[size_t(t * s.top_k + j)] = rng() % 8 == 0 ? -1 : perm[size_t(j)];
  }
  return test::from_ints(ids, {m, s.top_k});
}

// Entries the reference wrote (non-NaN there) match; the GPU leaves all others poisoned.
void expect_same_written(const Tensor& gpu, const Tensor& ref, double rel_tol, const char* what) {
  const auto g = test::to_floats(gpu), r = test::to_floats(ref);
  std::vector<float> gw, rw;
  int64_t stray = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    if (std::isnan(r[i])) {
      stray += !std::isnan(g[i]);
    } else {
      gw.push_back(g[i]);
      rw.push_back(r[i]);
    }
  }
  EXPECT_EQ(stray, 0) << what << ": entries written that the contract leaves untouched";
  EXPECT_TRUE(test::allclose(gw, rw, rel_tol, 1e-5)) << what;
}

// Rows whose slot takes no LoRA on this seam carry exactly the LoRA-off kernel's bits.
void expect_base_rows_identical(const Tensor& lora, const Tensor& base,
                                const std::vector<bool>& no_lora_row, const char* what) {
  const Tensor hl = lora.to(Device::cpu()), hb = base.to(Device::cpu());
  const int64_t n = hl.size(0), row_bytes = hl.size(1) * int64_t(dtype_size(hl.dtype()));
  const auto* pl = static_cast<const unsigned char*>(hl.data());
  const auto* pb = static_cast<const unsigned char*>(hb.data());
  int64_t rows = 0, differ = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (!no_lora_row[size_t(r)]) continue;
    ++rows;
    differ += std::memcmp(pl + r * row_bytes, pb + r * row_bytes, size_t(row_bytes)) != 0;
  }
  EXPECT_EQ(differ, 0) << what << ": " << differ << " of " << rows
                       << " rows without LoRA differ from the LoRA-off kernel";
}

// Host sum of the K-split partials u [splits * n, ldu] -> [n, ldu] (NaN where unwritten).
Tensor sum_partials(const Tensor& parts, int splits) {
  const auto v = test::to_floats(parts);
  const int64_t rows = parts.size(0) / splits, ldu = parts.size(1);
  std::vector<float> out(size_t(rows * ldu), 0.0f);
  for (int sp = 0; sp < splits; ++sp)
    for (int64_t i = 0; i < rows * ldu; ++i) out[size_t(i)] += v[size_t(sp * rows * ldu + i)];
  return test::from_floats(out, {rows, ldu}, DType::f32);
}

void epilogue_matches_reference(int r_max, const std::vector<int64_t>& token_counts) {
  std::mt19937_64 rng(test::fresh_seed());
  const MoeShape sh = epi_shape();
  Pools pools(sh, r_max, rng);
  Stream s = Stream::create(Device::cuda());
  const Device dev = Device::cuda();
  const int k = sh.top_k, E = sh.num_experts;
  const int64_t H = sh.hidden, I = sh.inter;
  const Tensor w13 = test::random_tensor({E, 2 * I, H}, DType::bf16, rng, -0.25f, 0.25f);
  const Tensor w2 = test::random_tensor({E, H, I}, DType::bf16, rng, -0.25f, 0.25f);
  const Tensor dw13 = to_gpu(w13), dw2 = to_gpu(w2);
  // Which adapters have which seam (make_adapters).
  const bool has_down[kAdapters] = {true, true, false, true, true};

  for (int64_t m : token_counts) {
    SCOPED_TRACE(::testing::Message() << "M=" << m << " r_max=" << r_max);
    const int64_t n = m * k;
    const Tensor ids = random_ids(m, sh, rng);
    const Tensor ts = test::random_ints({m}, rng, -1, kAdapters - 1);
    const Tensor sw = test::random_tensor({n}, DType::f32, rng, 0.0f, 1.0f);
    const Tensor x = test::random_tensor({m, H}, DType::bf16, rng);
    const Tensor a_in = test::random_tensor({n, I}, DType::bf16, rng);
    const Tensor dids = to_gpu(ids), dts = to_gpu(ts), dsw = to_gpu(sw), dx = to_gpu(x),
                 da_in = to_gpu(a_in);
    const auto hids = test::to_ints(ids), hts = test::to_ints(ts);
    std::vector<bool> base_gu(static_cast<size_t>(n)), base_dn(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) {
      const int a = hts[size_t(r / k)];
      base_gu[size_t(r)] = a < 0;
      base_dn[size_t(r)] = a < 0 || !has_down[a];
    }

    // The (adapter, expert) plan and the fast path's shrinks.
    MoeAlignment vplan = test::poisoned_plan(n, kAdapters * E, cuda::moe_lora_stream_block_m(m, k, E), dev);
    cuda::moe_lora_align(dids, dts, E, vplan, s);
    s.synchronize();
    const MoeAlignment hvplan = test::host_copy(vplan);

    // CPU reference: h = x W13^T + B13 A13 x; a = act(h); o = w (a W2^T) + w B2 A2 a.
    MoeAlignment plan0 = test::poisoned_plan(n, E, cuda::moe_block_m(m, sh), dev);
    cuda::moe_align(dids, plan0, s);
    s.synchronize();
    const MoeAlignment hplan = test::host_copy(plan0);
    Tensor h_ref = poisoned({n, 2 * I}, DType::f32, Device::cpu(), test::kPoisonFloat);
    cpu::moe_gemm1(x, k, hplan, w13, h_ref, Stream());
    Tensor u13_ref = poisoned({n, 2 * r_max}, DType::f32, Device::cpu(), test::kPoisonFloat);
    cpu::moe_lora_shrink(x, k, hvplan, pools.cpu.a13(), pools.cpu.slot_meta(), LoraSeam::gate_up,
                         u13_ref, Stream());
    cpu::moe_lora_expand(u13_ref, hvplan, pools.cpu.b13(), pools.cpu.slot_meta(),
                         LoraSeam::gate_up, Tensor(), h_ref, Stream());
    Tensor a_ref = poisoned({n, I}, DType::bf16, Device::cpu(), test::kPoisonFloat);
    cpu::moe_activation(h_ref, ids, a_ref, Stream());
    Tensor o_ref = poisoned({n, H}, DType::f32, Device::cpu(), test::kPoisonFloat);
    cpu::moe_gemm2(a_in, hplan, w2, sw, o_ref, Stream());
    Tensor u2_ref = poisoned({n, r_max}, DType::f32, Device::cpu(), test::kPoisonFloat);
    cpu::moe_lora_shrink(a_in, 1, hvplan, pools.cpu.a2(), pools.cpu.slot_meta(), LoraSeam::down,
                         u2_ref, Stream());
    cpu::moe_lora_expand(u2_ref, hvplan, pools.cpu.b2(), pools.cpu.slot_meta(), LoraSeam::down, sw,
                         o_ref, Stream());

    for (int splits : {cuda::moe_lora_stream_splits(m, k, E), 3}) {
      SCOPED_TRACE(::testing::Message() << "splits=" << splits);
      Tensor u13 = poisoned({splits * n, 2 * r_max}, DType::f32, dev, test::kPoisonFloat);
      Tensor u2 = poisoned({splits * n, r_max}, DType::f32, dev, test::kPoisonFloat);
      cuda::moe_lora_shrink_stream(dx, k, vplan, pools.gpu.a13(), pools.gpu.slot_meta(),
                                   LoraSeam::gate_up, splits, u13, s);
      cuda::moe_lora_shrink_stream(da_in, 1, vplan, pools.gpu.a2(), pools.gpu.slot_meta(),
                                   LoraSeam::down, splits, u2, s);
      s.synchronize();
      // The shrink: the reference's columns (r < rank of each aligned slot).
      {
        const auto g13 = test::to_floats(sum_partials(u13, splits)), r13 = test::to_floats(u13_ref);
        const auto g2 = test::to_floats(sum_partials(u2, splits)), r2 = test::to_floats(u2_ref);
        std::vector<float> gw, rw;
        for (size_t i = 0; i < r13.size(); ++i)
          if (!std::isnan(r13[i])) gw.push_back(g13[i]), rw.push_back(r13[i]);
        for (size_t i = 0; i < r2.size(); ++i)
          if (!std::isnan(r2[i])) gw.push_back(g2[i]), rw.push_back(r2[i]);
        EXPECT_TRUE(test::allclose(gw, rw, 1e-4, 1e-4)) << "moe_lora_shrink_stream u";
      }
      const cuda::MoeGemmLora l13{dts, u13, splits, pools.gpu.b13(), pools.gpu.slot_meta()};
      const cuda::MoeGemmLora l2{dts, u2, splits, pools.gpu.b2(), pools.gpu.slot_meta()};

      for (int bm : {cuda::moe_block_m(m, sh), 8, 128}) {
        MoeAlignment plan = test::poisoned_plan(n, E, bm, dev);
        cuda::moe_align(dids, plan, s);
        for (int rows : {32, 64, 128}) {
          SCOPED_TRACE(::testing::Message() << "block_m=" << bm << " rows=" << rows);
          const cuda::MoeGemmConfig cfg{rows, true, false, bm >= 32, false};
          if (r_max > 64 && bm == 128 && rows == 128) {
            // u of 128 tokens x 256 columns, the f32 tile and one adapter's B exceed 227 KB.
            Tensor a = Tensor::empty({n, I}, DType::bf16, dev);
            test::expect_error(
                [&] { cuda::moe_gemm1_activation_lora_tiled(dx, k, plan, dw13, l13, a, s, cfg); },
                "shared memory");
            continue;
          }
          Tensor a = poisoned({n, I}, DType::bf16, dev, test::kPoisonFloat);
          Tensor a_base = poisoned({n, I}, DType::bf16, dev, test::kPoisonFloat);
          Tensor h = poisoned({n, 2 * I}, DType::f32, dev, test::kPoisonFloat);
          Tensor o = poisoned({n, H}, DType::f32, dev, test::kPoisonFloat);
          Tensor o_base = poisoned({n, H}, DType::f32, dev, test::kPoisonFloat);
          cuda::moe_gemm1_activation_lora_tiled(dx, k, plan, dw13, l13, a, s, cfg);
          cuda::moe_gemm1_activation_tiled(dx, k, plan, dw13, a_base, s, cfg);
          cuda::moe_gemm1_lora_tiled(dx, k, plan, dw13, l13, h, s, cfg);
          cuda::moe_gemm2_lora_tiled(da_in, k, plan, dw2, dsw, l2, o, s, cfg);
          cuda::moe_gemm2_tiled(da_in, plan, dw2, dsw, o_base, s, cfg);
          s.synchronize();
          expect_same_written(h, h_ref, 1e-4, "gemm1 + LoRA (h)");
          expect_same_written(a, a_ref, 1e-2, "gemm1 + LoRA + activation");
          expect_same_written(o, o_ref, 1e-4, "gemm2 + LoRA");
          expect_base_rows_identical(a, a_base, base_gu, "gemm1 + activation");
          expect_base_rows_identical(o, o_base, base_dn, "gemm2");
        }
      }

      // The hook path's kernels on the same partials: gemm1 -> expand -> activation, and
      // gemm2 -> expand (acc * w + w * delta: equal up to rounding).
      Tensor h_hook = poisoned({n, 2 * I}, DType::f32, dev, test::kPoisonFloat);
      Tensor a_hook = poisoned({n, I}, DType::bf16, dev, test::kPoisonFloat);
      Tensor o_hook = poisoned({n, H}, DType::f32, dev, test::kPoisonFloat);
      Tensor a = poisoned({n, I}, DType::bf16, dev, test::kPoisonFloat);
      Tensor o = poisoned({n, H}, DType::f32, dev, test::kPoisonFloat);
      MoeAlignment plan = test::poisoned_plan(n, E, cuda::moe_block_m(m, sh), dev);
      cuda::moe_align(dids, plan, s);
      cuda::moe_gemm1(dx, k, plan, dw13, h_hook, s);
      cuda::moe_lora_expand_split(u13, splits, vplan, pools.gpu.b13(), pools.gpu.slot_meta(),
                                  LoraSeam::gate_up, Tensor(), h_hook, s);
      cuda::moe_activation(h_hook, dids, a_hook, s);
      cuda::moe_gemm2(da_in, plan, dw2, dsw, o_hook, s);
      cuda::moe_lora_expand_split(u2, splits, vplan, pools.gpu.b2(), pools.gpu.slot_meta(),
                                  LoraSeam::down, dsw, o_hook, s);
      cuda::moe_gemm1_activation_lora(dx, k, plan, dw13, l13, a, s);
      cuda::moe_gemm2_lora(da_in, k, plan, dw2, dsw, l2, o, s);
      s.synchronize();
      expect_same_written(a, a_hook.to(Device::cpu()), 1e-2, "epilogue vs hook path (a)");
      expect_same_written(o, o_hook.to(Device::cpu()), 1e-5, "epilogue vs hook path (o)");
    }
  }
}

TEST(CudaMoeLoraEpilogue, MatchesReferenceRmax64) {
  MOELORA_REQUIRE_GPU();
  epilogue_matches_reference(64, {1, 7, 64, 256});
}

// Ranks past 64 take the epilogue's second rank chunk.
TEST(CudaMoeLoraEpilogue, MatchesReferenceRmax128) {
  MOELORA_REQUIRE_GPU();
  epilogue_matches_reference(128, {1, 7, 64, 256});
}

// The same at two batch sizes only: small enough for compute-sanitizer (memcheck, racecheck).
TEST(CudaMoeLoraEpilogue, SanitizerSubset) {
  MOELORA_REQUIRE_GPU();
  epilogue_matches_reference(64, {7, 33});
}

// The fast path's shrink against the hook path's on the hook path's own plan (any block_m).
TEST(CudaMoeLoraEpilogue, StreamShrinkMatchesHookShrink) {
  MOELORA_REQUIRE_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  const MoeShape sh = epi_shape();
  const Device dev = Device::cuda();
  Stream s = Stream::create(dev);
  const int k = sh.top_k, E = sh.num_experts;
  for (int r_max : {8, 16, 32, 64}) {
    MoeLoraPool pool(sh, kAdapters, r_max, dev);
    for (int i = 0; i < kAdapters; ++i) {
      MoeLoraWeights w;
      const int r = std::max(1, r_max - 8 * i);  // ranks below r_max too, some not multiples of 8
      w.gate_up_a = rnd({E, r, sh.hidden}, rng, 0.5f);
      w.gate_up_b = rnd({E, 2 * int64_t(sh.inter), r}, rng, 0.5f);
      w.down_a = rnd({E, r, sh.inter}, rng, 0.5f), w.down_b = rnd({E, sh.hidden, r}, rng, 0.5f);
      pool.load(i, w);
    }
    for (int64_t m : {int64_t(1), int64_t(33), int64_t(256)}) {
      SCOPED_TRACE(::testing::Message() << "M=" << m << " r_max=" << r_max);
      const int64_t n = m * k;
      const Tensor dids = to_gpu(random_ids(m, sh, rng));
      const Tensor dts = to_gpu(test::random_ints({m}, rng, -1, kAdapters - 1));
      for (int bm : {cuda::moe_lora_block_m(m, k), 64}) {
        MoeAlignment vplan = test::poisoned_plan(n, kAdapters * E, bm, dev);
        cuda::moe_lora_align(dids, dts, E, vplan, s);
        const Tensor x = to_gpu(test::random_tensor({m, sh.hidden}, DType::bf16, rng));
        for (int splits : {1, 2, 8}) {
          Tensor u_old = poisoned({splits * n, 2 * r_max}, DType::f32, dev, test::kPoisonFloat);
          Tensor u_new = poisoned({splits * n, 2 * r_max}, DType::f32, dev, test::kPoisonFloat);
          cuda::moe_lora_shrink_split(x, k, vplan, pool.a13(), pool.slot_meta(),
                                      LoraSeam::gate_up, splits, u_old, s);
          cuda::moe_lora_shrink_stream(x, k, vplan, pool.a13(), pool.slot_meta(),
                                       LoraSeam::gate_up, splits, u_new, s);
          s.synchronize();
          // Same entries written (NaN pattern) and values within f32 summation-order noise.
          expect_same_written(u_new, u_old.to(Device::cpu()), 1e-5, "shrink partials");
        }
      }
    }
  }
}

TEST(CudaMoeLoraEpilogue, BadInput) {
  MOELORA_REQUIRE_GPU();
  const MoeShape sh = epi_shape();
  const Device dev = Device::cuda();
  Stream s = Stream::create(dev);
  MoeLoraPool pool(sh, kAdapters, 16, dev);
  const int k = sh.top_k, E = sh.num_experts;
  const int64_t m = 4, n = m * k, H = sh.hidden, I = sh.inter;
  MoeAlignment plan = MoeAlignment::allocate(n, E, kMaxBlockM, dev);
  plan.block_m = 8;
  Tensor x = Tensor::zeros({m, H}, DType::bf16, dev), w13 = Tensor::zeros({E, 2 * I, H}, DType::bf16, dev);
  Tensor a = Tensor::zeros({n, I}, DType::bf16, dev), ts = Tensor::zeros({m}, DType::i32, dev);
  Tensor u = Tensor::zeros({n, 32}, DType::f32, dev);
  // u narrower than 2 * r_max for the gate_up seam.
  test::expect_error(
      [&] {
        cuda::moe_gemm1_activation_lora(
            x, k, plan, w13, {ts, Tensor::zeros({n, 16}, DType::f32, dev), 1, pool.b13(), pool.slot_meta()},
            a, s);
      },
      "LoRA u");
  // Partials that do not match `splits`.
  test::expect_error(
      [&] { cuda::moe_gemm1_activation_lora(x, k, plan, w13, {ts, u, 2, pool.b13(), pool.slot_meta()}, a, s); },
      "LoRA u");
  // token_slot of the wrong length; B whose rows are not w13's.
  test::expect_error(
      [&] {
        cuda::moe_gemm1_activation_lora(
            x, k, plan, w13, {Tensor::zeros({m + 1}, DType::i32, dev), u, 1, pool.b13(), pool.slot_meta()},
            a, s);
      },
      "token_slot");
  test::expect_error(
      [&] {
        cuda::moe_gemm1_activation_lora(
            x, k, plan, w13,
            {ts, u, 1, Tensor::zeros({kAdapters, E, 2 * I + 8, 16}, DType::bf16, dev), pool.slot_meta()},
            a, s);
      },
      "LoRA B");
}

}  // namespace
}  // namespace moelora
