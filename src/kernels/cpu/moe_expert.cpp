// CPU reference expert stages: the two grouped GEMMs (f32 accumulation of bf16 products),
// SiLU(gate)*up and the top-k sum with the optional shared expert.
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_op_util.h"
#include "kernels/cpu/moe_ops.h"

namespace moelora::cpu {
namespace {

// out[s, n] = scale(s) * in_row(s) . w[g, n, :] for every aligned slot s of every group g.
// `in` rows are bf16 (or f32) of length K; row(s) = s / rows_div. Weights are bf16, or f32 for
// the dequantized values of a quantized format. Each weight row is converted once per group and
// reused for all of the group's slots (K innermost, contiguous).
void row_to_f32(const bf16_t* src, int64_t n, float* dst) { bf16_row_to_f32(src, n, dst); }
void row_to_f32(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }

template <typename In, typename W>
void grouped_gemm(const In* in, int64_t rows_div, const PlanView& plan, int64_t num_slots,
                  const W* w, int64_t N, int64_t K, const float* slot_weights, float* out) {
  std::vector<int32_t> slots;
  std::vector<float> xs, wrow(static_cast<size_t>(K));
  for (int g = 0; g < plan.num_groups; ++g) {
    group_slots(plan, g, num_slots, slots);
    if (slots.empty()) continue;
    const size_t cnt = slots.size();
    xs.resize(cnt * size_t(K));
    for (size_t i = 0; i < cnt; ++i)
      row_to_f32(in + slots[i] / rows_div * K, K, xs.data() + i * size_t(K));
    const W* wg = w + int64_t(g) * N * K;
    for (int64_t n = 0; n < N; ++n) {
      row_to_f32(wg + n * K, K, wrow.data());
      for (size_t i = 0; i < cnt; ++i) {
        const float v = dot_f32(xs.data() + i * size_t(K), wrow.data(), K);
        out[int64_t(slots[i]) * N + n] = slot_weights ? slot_weights[slots[i]] * v : v;
      }
    }
  }
}

// bf16 or f32 (CPU only: the reference runs quantized formats on their dequantized values).
void check_host_real(const Tensor& t, const char* name) {
  MOELORA_CHECK(t.defined() && t.device().is_cpu(), "{}: expected a host tensor, found {}", name,
                t.defined() ? t.describe() : std::string("undefined"));
  MOELORA_CHECK(t.dtype() == DType::bf16 || t.dtype() == DType::f32,
                "{}: expected bf16 (or f32 on the CPU), found {}", name, t.describe());
  MOELORA_CHECK(t.is_contiguous(), "{}: expected a contiguous tensor, found {}", name,
                t.describe());
}

template <typename W>
void gemm_dispatch(const Tensor& in, int64_t rows_div, const PlanView& pv, int64_t slots,
                   const Tensor& w, int64_t N, int64_t K, const float* sw, float* out) {
  if (in.dtype() == DType::bf16)
    grouped_gemm(in.data<bf16_t>(), rows_div, pv, slots, w.data<W>(), N, K, sw, out);
  else
    grouped_gemm(in.data<float>(), rows_div, pv, slots, w.data<W>(), N, K, sw, out);
}

void grouped_gemm(const Tensor& in, int64_t rows_div, const PlanView& pv, int64_t slots,
                  const Tensor& w, int64_t N, int64_t K, const float* sw, float* out) {
  if (w.dtype() == DType::bf16)
    gemm_dispatch<bf16_t>(in, rows_div, pv, slots, w, N, K, sw, out);
  else
    gemm_dispatch<float>(in, rows_div, pv, slots, w, N, K, sw, out);
}

}  // namespace

void moe_gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const Tensor& w13, Tensor& h,
               const Stream& stream) {
  (void)stream;
  check_host_real(x, "moe_gemm1 x");
  MOELORA_CHECK(x.dim() == 2, "moe_gemm1 x: expected bf16 [M, H], found {}", x.describe());
  MOELORA_CHECK(top_k >= 1, "moe_gemm1: top_k must be >= 1, found {}", top_k);
  const int64_t M = x.size(0), H = x.size(1), slots = M * top_k;
  check_host_real(w13, "moe_gemm1 w13");
  MOELORA_CHECK(
      w13.dim() == 3 && w13.size(0) == plan.num_groups && w13.size(2) == H && w13.size(1) % 2 == 0,
      "moe_gemm1 w13: expected bf16 [{} (groups), 2I, {} (H)], found {}", plan.num_groups, H,
      w13.describe());
  const int64_t N = w13.size(1);
  check_host(h, DType::f32, "moe_gemm1 h");
  check_shape(h, {slots, N}, "moe_gemm1 h");
  const PlanView pv = check_plan(plan, slots, "moe_gemm1");
  grouped_gemm(x, top_k, pv, slots, w13, N, H, nullptr, h.data<float>());
}

void moe_activation(const Tensor& h, const Tensor& ids, Tensor& a, const Stream& stream) {
  (void)stream;
  check_host(h, DType::f32, "moe_activation h");
  MOELORA_CHECK(h.dim() == 2 && h.size(1) % 2 == 0,
                "moe_activation h: expected f32 [slots, 2I], found {}", h.describe());
  const int64_t slots = h.size(0), I = h.size(1) / 2;
  check_host(ids, DType::i32, "moe_activation ids");
  MOELORA_CHECK(ids.numel() == slots,
                "moe_activation ids: expected {} entries (one per row of h), "
                "found {}",
                slots, ids.describe());
  check_host(a, DType::bf16, "moe_activation a");
  check_shape(a, {slots, I}, "moe_activation a");
  const float* hp = h.data<float>();
  const int32_t* id = ids.data<int32_t>();
  bf16_t* ap = a.data<bf16_t>();
  for (int64_t s = 0; s < slots; ++s) {
    if (id[s] < 0) continue;
    const float* gate = hp + s * 2 * I;
    const float* up = gate + I;
    for (int64_t i = 0; i < I; ++i) {
      const float g = gate[i];
      ap[s * I + i] = float_to_bf16(g / (1.0f + std::exp(-g)) * up[i]);
    }
  }
}

void moe_gemm2(const Tensor& a, const MoeAlignment& plan, const Tensor& w2,
               const Tensor& slot_weights, Tensor& o, const Stream& stream) {
  (void)stream;
  check_host_real(a, "moe_gemm2 a");
  MOELORA_CHECK(a.dim() == 2, "moe_gemm2 a: expected bf16 [slots, I], found {}", a.describe());
  const int64_t slots = a.size(0), I = a.size(1);
  check_host_real(w2, "moe_gemm2 w2");
  MOELORA_CHECK(w2.dim() == 3 && w2.size(0) == plan.num_groups && w2.size(2) == I,
                "moe_gemm2 w2: expected bf16 [{} (groups), H, {} (I)], found {}", plan.num_groups,
                I, w2.describe());
  const int64_t H = w2.size(1);
  const float* sw = nullptr;
  if (slot_weights.defined()) {
    check_host(slot_weights, DType::f32, "moe_gemm2 slot_weights");
    check_shape(slot_weights, {slots}, "moe_gemm2 slot_weights");
    sw = slot_weights.data<float>();
  }
  check_host(o, DType::f32, "moe_gemm2 o");
  check_shape(o, {slots, H}, "moe_gemm2 o");
  const PlanView pv = check_plan(plan, slots, "moe_gemm2");
  grouped_gemm(a, 1, pv, slots, w2, H, I, sw, o.data<float>());
}

void moe_reduce(const Tensor& o, const Tensor& ids, const Tensor& shared_o,
                const Tensor& shared_gate_logits, Tensor& y, const Stream& stream) {
  (void)stream;
  check_host(ids, DType::i32, "moe_reduce ids");
  MOELORA_CHECK(ids.dim() == 2, "moe_reduce ids: expected i32 [M, k], found {}", ids.describe());
  const int64_t M = ids.size(0), k = ids.size(1);
  check_host(o, DType::f32, "moe_reduce o");
  MOELORA_CHECK(o.dim() == 2 && o.size(0) == M * k,
                "moe_reduce o: expected f32 [{} (M*k), H], found {}", M * k, o.describe());
  const int64_t H = o.size(1);
  check_host(y, DType::bf16, "moe_reduce y");
  check_shape(y, {M, H}, "moe_reduce y");
  const float* so = nullptr;
  const float* gl = nullptr;
  if (shared_o.defined()) {
    check_host(shared_o, DType::f32, "moe_reduce shared_o");
    check_shape(shared_o, {M, H}, "moe_reduce shared_o");
    so = shared_o.data<float>();
  }
  if (shared_gate_logits.defined()) {
    MOELORA_CHECK(so, "moe_reduce: shared_gate_logits given without shared_o");
    check_host(shared_gate_logits, DType::f32, "moe_reduce shared_gate_logits");
    MOELORA_CHECK(shared_gate_logits.numel() == M,
                  "moe_reduce shared_gate_logits: expected f32 [{}], found {}", M,
                  shared_gate_logits.describe());
    gl = shared_gate_logits.data<float>();
  }
  const float* op = o.data<float>();
  const int32_t* id = ids.data<int32_t>();
  bf16_t* yp = y.data<bf16_t>();
  std::vector<float> acc(static_cast<size_t>(H));
  for (int64_t t = 0; t < M; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      if (id[t * k + j] < 0) continue;
      const float* row = op + (t * k + j) * H;
      for (int64_t c = 0; c < H; ++c) acc[size_t(c)] += row[c];
    }
    if (so) {
      const float gate = gl ? 1.0f / (1.0f + std::exp(-gl[t])) : 1.0f;
      for (int64_t c = 0; c < H; ++c) acc[size_t(c)] += gate * so[t * H + c];
    }
    for (int64_t c = 0; c < H; ++c) yp[t * H + c] = float_to_bf16(acc[size_t(c)]);
  }
}

}  // namespace moelora::cpu
