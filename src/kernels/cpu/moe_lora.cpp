// CPU reference MoE LoRA ops: virtual-expert ids (slot * E + expert), and the shrink / expand
// passes grouped by virtual expert. Each loops to its slot's own rank, never to r_max.
#include <cstdint>
#include <vector>

#include "kernels/cpu/cpu_op_util.h"
#include "kernels/cpu/moe_ops.h"
#include "moelora/lora/moe_lora.h"

namespace moelora::cpu {
namespace {

// Column ranges of u that a seam reads for one output half.
struct RankCols {
  int rank = 0;
  int col = 0;
};

// Checks the pool tensor `w` (bf16 [S, E, d2, d3]) and `meta` (i32 [S, 6]); returns S.
int64_t check_pool_tensor(const Tensor& w, const Tensor& meta, const MoeAlignment& vplan,
                          const char* what) {
  check_host(w, DType::bf16, what);
  MOELORA_CHECK(w.dim() == 4, "{}: expected bf16 [S, E, ., .], found {}", what, w.describe());
  const int64_t S = w.size(0), E = w.size(1);
  MOELORA_CHECK(vplan.num_groups == S * E,
                "{}: the plan has {} groups, expected S*E = {}*{} = {} virtual experts", what,
                vplan.num_groups, S, E, S * E);
  check_host(meta, DType::i32, "MoE LoRA slot_meta");
  check_shape(meta, {S, int64_t(sizeof(MoeLoraSlotMeta) / sizeof(int32_t))}, "MoE LoRA slot_meta");
  return S;
}

MoeLoraSlotMeta slot_meta(const Tensor& meta, int64_t slot) {
  const int32_t* m = meta.data<int32_t>() + slot * 6;
  return MoeLoraSlotMeta{m[0], m[1], m[2], m[3], m[4], m[5]};
}

}  // namespace

void moe_lora_group_ids(const Tensor& ids, const Tensor& token_slot, int num_experts, Tensor& vids,
                        const Stream& stream) {
  (void)stream;
  check_host(ids, DType::i32, "MoE LoRA ids");
  MOELORA_CHECK(ids.dim() == 2, "MoE LoRA ids: expected i32 [M, k], found {}", ids.describe());
  const int64_t M = ids.size(0), k = ids.size(1);
  check_host(token_slot, DType::i32, "MoE LoRA token_slot");
  check_shape(token_slot, {M}, "MoE LoRA token_slot");
  check_host(vids, DType::i32, "MoE LoRA vids");
  check_shape(vids, {M, k}, "MoE LoRA vids");
  MOELORA_CHECK(num_experts >= 1, "MoE LoRA: num_experts must be >= 1, found {}", num_experts);
  const int32_t* id = ids.data<int32_t>();
  const int32_t* ts = token_slot.data<int32_t>();
  int32_t* v = vids.data<int32_t>();
  for (int64_t t = 0; t < M; ++t) {
    MOELORA_CHECK(ts[t] >= -1, "MoE LoRA token_slot[{}] = {}: expected -1 (base) or a slot >= 0", t,
                  ts[t]);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = id[t * k + j];
      MOELORA_CHECK(e >= -1 && e < num_experts,
                    "MoE LoRA ids: expert id {} of token {} choice {} is outside [-1, {})", e, t, j,
                    num_experts);
      const int64_t vid = int64_t(ts[t]) * num_experts + e;
      MOELORA_CHECK(vid <= INT32_MAX, "MoE LoRA: virtual expert id {} overflows i32", vid);
      v[t * k + j] = (ts[t] >= 0 && e >= 0) ? int32_t(vid) : -1;
    }
  }
}

void moe_lora_shrink(const Tensor& in, int rows_div, const MoeAlignment& vplan, const Tensor& A,
                     const Tensor& meta, LoraSeam seam, Tensor& u, const Stream& stream) {
  (void)stream;
  check_pool_tensor(A, meta, vplan, "MoE LoRA shrink A");
  const int64_t E = A.size(1), R = A.size(2), K = A.size(3);
  MOELORA_CHECK(rows_div >= 1, "MoE LoRA shrink: rows_div must be >= 1, found {}", rows_div);
  check_host(in, DType::bf16, "MoE LoRA shrink input");
  MOELORA_CHECK(in.dim() == 2 && in.size(1) == K,
                "MoE LoRA shrink input: expected bf16 [rows, {}] (A's last dim), found {}", K,
                in.describe());
  const int64_t slots = in.size(0) * rows_div;
  check_host(u, DType::f32, "MoE LoRA shrink u");
  MOELORA_CHECK(u.dim() == 2 && u.size(0) == slots && u.size(1) >= R,
                "MoE LoRA shrink u: expected f32 [{}, >= {}], found {}", slots, R, u.describe());
  const int64_t ldu = u.size(1);
  const PlanView pv = check_plan(vplan, slots, "MoE LoRA shrink");

  const bf16_t* a = A.data<bf16_t>();
  const bf16_t* x = in.data<bf16_t>();
  float* up = u.data<float>();
  std::vector<int32_t> group;
  std::vector<float> xs, arow(static_cast<size_t>(K));
  for (int v = 0; v < pv.num_groups; ++v) {
    group_slots(pv, v, slots, group);
    if (group.empty()) continue;
    const int64_t slot = v / E, e = v % E;
    const MoeLoraSlotMeta m = slot_meta(meta, slot);
    const int rank = seam == LoraSeam::gate_up ? m.shrink_rank : m.down_rank;
    MOELORA_CHECK(rank >= 0 && rank <= R,
                  "MoE LoRA shrink: slot {} has rank {}, outside the pool's 0..{} A rows", slot,
                  rank, R);
    if (rank == 0) continue;
    const size_t cnt = group.size();
    xs.resize(cnt * size_t(K));
    for (size_t i = 0; i < cnt; ++i)
      bf16_row_to_f32(x + group[i] / rows_div * K, K, xs.data() + i * size_t(K));
    const bf16_t* av = a + ((slot * E + e) * R) * K;
    for (int r = 0; r < rank; ++r) {
      bf16_row_to_f32(av + r * K, K, arow.data());
      for (size_t i = 0; i < cnt; ++i)
        up[int64_t(group[i]) * ldu + r] = dot_f32(xs.data() + i * size_t(K), arow.data(), K);
    }
  }
}

void moe_lora_expand(const Tensor& u, const MoeAlignment& vplan, const Tensor& B,
                     const Tensor& meta, LoraSeam seam, const Tensor& slot_weights, Tensor& out,
                     const Stream& stream) {
  (void)stream;
  check_pool_tensor(B, meta, vplan, "MoE LoRA expand B");
  const int64_t E = B.size(1), N = B.size(2), r_max = B.size(3);
  check_host(out, DType::f32, "MoE LoRA expand out");
  MOELORA_CHECK(out.dim() == 2 && out.size(1) == N,
                "MoE LoRA expand out: expected f32 [slots, {}] (B's rows), found {}", N,
                out.describe());
  MOELORA_CHECK(seam != LoraSeam::gate_up || N % 2 == 0,
                "MoE LoRA expand: gate_up B needs an even row count (gate and up), found {}", N);
  const int64_t slots = out.size(0);
  check_host(u, DType::f32, "MoE LoRA expand u");
  MOELORA_CHECK(u.dim() == 2 && u.size(0) == slots,
                "MoE LoRA expand u: expected f32 [{}, R], found {}", slots, u.describe());
  const int64_t ldu = u.size(1);
  const float* sw = nullptr;
  if (slot_weights.defined()) {
    check_host(slot_weights, DType::f32, "MoE LoRA expand slot_weights");
    check_shape(slot_weights, {slots}, "MoE LoRA expand slot_weights");
    sw = slot_weights.data<float>();
  }
  const PlanView pv = check_plan(vplan, slots, "MoE LoRA expand");

  const bf16_t* b = B.data<bf16_t>();
  const float* up = u.data<float>();
  float* op = out.data<float>();
  std::vector<int32_t> group;
  std::vector<float> brow(static_cast<size_t>(r_max));
  for (int v = 0; v < pv.num_groups; ++v) {
    group_slots(pv, v, slots, group);
    if (group.empty()) continue;
    const int64_t slot = v / E, e = v % E;
    const MoeLoraSlotMeta m = slot_meta(meta, slot);
    RankCols halves[2];
    if (seam == LoraSeam::gate_up) {
      halves[0] = {m.gate_rank, m.gate_col};
      halves[1] = {m.up_rank, m.up_col};
    } else {
      halves[0] = halves[1] = {m.down_rank, 0};
    }
    for (const RankCols& h : halves)
      MOELORA_CHECK(h.rank >= 0 && h.rank <= r_max && h.col >= 0 && h.col + h.rank <= ldu,
                    "MoE LoRA expand: slot {} reads u columns [{}, {}) with rank {}; expected "
                    "rank <= r_max={} and columns within u's {}",
                    slot, h.col, h.col + h.rank, h.rank, r_max, ldu);
    const bf16_t* bv = b + (slot * E + e) * N * r_max;
    for (int64_t i = 0; i < N; ++i) {
      const RankCols& h = halves[seam == LoraSeam::gate_up && i >= N / 2 ? 1 : 0];
      if (h.rank == 0) continue;
      bf16_row_to_f32(bv + i * r_max, h.rank, brow.data());
      for (int32_t s : group) {
        const float d = dot_f32(up + int64_t(s) * ldu + h.col, brow.data(), h.rank);
        op[int64_t(s) * N + i] += sw ? sw[s] * d : d;
      }
    }
  }
}

int moe_lora_block_m(int64_t num_tokens, int top_k) {
  (void)num_tokens;
  (void)top_k;
  return 1;
}

}  // namespace moelora::cpu
