// Ops (layer 3) for LoRA on experts on CUDA: virtual-expert ids, shrink, expand, block_m.
#include <algorithm>
#include <cmath>
#include <string>

#include <fmt/format.h>

#include "core/cuda_check.h"
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_lora_epilogue.h"
#include "kernels/cuda/moe_lora_launch.h"
#include "kernels/cuda/moe_op_checks.h"
#include "kernels/cuda/moe_ops.h"
#include "kernels/cuda/moe_ops_launch.h"

namespace moelora::cuda {
namespace {

// Validates the virtual-expert plan against `n` slots and a pool tensor [S, E, ., .].
detail::LoraPlanView check_vplan(const MoeAlignment& vplan, int64_t n, const Tensor& pool,
                                 const char* op) {
  MOELORA_CHECK(pool.dim() == 4, "{}: pool tensor: expected [S, E, ., .], found {}", op,
                pool.describe());
  const int64_t S = pool.size(0), E = pool.size(1);
  MOELORA_CHECK(vplan.num_groups == S * E,
                "{}: vplan.num_groups must be slots * experts = {} * {} = {}, found {}", op, S, E,
                S * E, vplan.num_groups);
  MOELORA_CHECK(vplan.block_m >= 1 && vplan.block_m <= kMaxBlockM,
                "{}: vplan.block_m must be in [1, {}], found {}", op, kMaxBlockM, vplan.block_m);
  check_cuda_tensor(vplan.sorted_slots, DType::i32, "vplan sorted_slots");
  check_cuda_tensor(vplan.block_group, DType::i32, "vplan block_group");
  check_cuda_tensor(vplan.num_padded, DType::i32, "vplan num_padded");
  const int64_t cap = MoeAlignment::capacity(n, vplan.num_groups, vplan.block_m);
  MOELORA_CHECK(
      vplan.sorted_slots.numel() >= cap && vplan.block_group.numel() >= cap / vplan.block_m,
      "{}: vplan holds {} slots / {} blocks; {} slots may need {} / {}", op,
      vplan.sorted_slots.numel(), vplan.block_group.numel(), n, cap, cap / vplan.block_m);
  return {vplan.sorted_slots.data<int32_t>(), vplan.block_group.data<int32_t>(),
          vplan.num_padded.data<int32_t>(), vplan.block_m, int(n), int(E)};
}

void check_meta(const Tensor& meta, const Tensor& pool, const char* op) {
  check_cuda_tensor(meta, DType::i32, "LoRA slot meta");
  MOELORA_CHECK(meta.dim() == 2 && meta.size(0) == pool.size(0) && meta.size(1) == 6,
                "{}: slot meta: expected [{}, 6], found {}", op, pool.size(0), meta.describe());
}

// Every block the plan can hold for `n` slots (the kernels exit past *num_padded).
int plan_blocks(const MoeAlignment& plan, int64_t n) {
  return int(MoeAlignment::capacity(n, plan.num_groups, plan.block_m) / plan.block_m);
}

}  // namespace

void moe_lora_group_ids(const Tensor& ids, const Tensor& token_slot, int num_experts,
                        Tensor& vids, const Stream& stream) {
  check_cuda_tensor(ids, DType::i32, "moe_lora_group_ids ids");
  MOELORA_CHECK(ids.dim() == 2, "moe_lora_group_ids ids: expected [M, k], found {}",
                ids.describe());
  check_cuda_tensor(token_slot, DType::i32, "moe_lora_group_ids token_slot");
  check_shape(token_slot, {ids.size(0)}, "moe_lora_group_ids token_slot");
  check_cuda_tensor(vids, DType::i32, "moe_lora_group_ids vids");
  check_shape(vids, ids.shape(), "moe_lora_group_ids vids");
  MOELORA_CHECK(num_experts >= 1, "moe_lora_group_ids: num_experts must be >= 1, found {}",
                num_experts);
  MOELORA_CUDA_CHECK(detail::launch_moe_lora_group_ids(
      ids.data<int32_t>(), token_slot.data<int32_t>(), int(ids.size(1)), num_experts,
      ids.numel(), vids.data<int32_t>(), raw_stream(stream)));
}

void moe_lora_shrink(const Tensor& in, int rows_div, const MoeAlignment& vplan, const Tensor& A,
                     const Tensor& meta, LoraSeam seam, Tensor& u, const Stream& stream) {
  moe_lora_shrink_split(in, rows_div, vplan, A, meta, seam, 1, u, stream);
}

namespace {

// The K-split shrink's checks and launch (`stream_kernel`: the fast path's kernel shape).
void shrink_split(const Tensor& in, int rows_div, const MoeAlignment& vplan, const Tensor& A,
                  const Tensor& meta, LoraSeam seam, int splits, Tensor& u, const Stream& stream,
                  bool stream_kernel) {
  MOELORA_CHECK(splits >= 1 && splits <= kMaxLoraSplits,
                "moe_lora_shrink: splits must be in [1, {}], found {}", kMaxLoraSplits, splits);
  check_cuda_tensor(in, DType::bf16, "moe_lora_shrink input");
  check_cuda_tensor(A, DType::bf16, "moe_lora_shrink A");
  check_cuda_tensor(u, DType::f32, "moe_lora_shrink u");
  MOELORA_CHECK(rows_div >= 1, "moe_lora_shrink: rows_div must be >= 1, found {}", rows_div);
  MOELORA_CHECK(in.dim() == 2, "moe_lora_shrink input: expected [rows, K], found {}",
                in.describe());
  MOELORA_CHECK(A.dim() == 4 && A.size(3) == in.size(1),
                "moe_lora_shrink A: expected [S, E, R, K={}], found {}", in.size(1),
                A.describe());
  const int64_t n = in.size(0) * rows_div, R = A.size(2), K = in.size(1);
  MOELORA_CHECK(K % 8 == 0, "moe_lora_shrink: K={} must be a multiple of 8 on CUDA", K);
  MOELORA_CHECK(u.dim() == 2 && u.size(0) == splits * n && u.size(1) >= R,
                "moe_lora_shrink u: expected [{} * {}, >= {}], found {}", splits, n, R,
                u.describe());
  check_meta(meta, A, "moe_lora_shrink");
  const detail::LoraPlanView pv = check_vplan(vplan, n, A, "moe_lora_shrink");
  detail::ShrinkArgs a{in.data(), rows_div, A.data(), int(R), int(K), meta.data<int32_t>(),
                       seam == LoraSeam::gate_up ? 0 : 5, u.data<float>(), int(u.size(1)), splits,
                       n * u.size(1)};
  const int blocks = plan_blocks(vplan, n);
  MOELORA_CUDA_CHECK(stream_kernel
                         ? detail::launch_moe_lora_shrink_stream(pv, a, blocks, raw_stream(stream))
                         : detail::launch_moe_lora_shrink(pv, a, blocks, raw_stream(stream)));
}

}  // namespace

void moe_lora_shrink_split(const Tensor& in, int rows_div, const MoeAlignment& vplan,
                           const Tensor& A, const Tensor& meta, LoraSeam seam, int splits,
                           Tensor& u, const Stream& stream) {
  shrink_split(in, rows_div, vplan, A, meta, seam, splits, u, stream, false);
}

void moe_lora_shrink_stream(const Tensor& in, int rows_div, const MoeAlignment& vplan,
                            const Tensor& A, const Tensor& meta, LoraSeam seam, int splits,
                            Tensor& u, const Stream& stream) {
  shrink_split(in, rows_div, vplan, A, meta, seam, splits, u, stream, true);
}

int moe_lora_stream_block_m(int64_t num_tokens, int top_k, int num_experts) {
  // One block per (adapter, expert) pair even when every token carries the same adapter
  // (the worst case for a pair's load): mean + 3 standard deviations, as moe_block_m sizes
  // the base plan. Wider blocks only cost padding tiles, which the shrink skips.
  const double slots = double(std::max<int64_t>(num_tokens, 1)) * std::max(top_k, 1);
  const double mean = slots / std::max(num_experts, 1);
  const double want = mean + 3.0 * std::sqrt(mean) + 1.0;
  int block_m = 8;
  while (block_m < want && block_m < 64) block_m *= 2;
  return block_m;
}

int moe_lora_stream_splits(int64_t num_tokens, int top_k, int num_experts) {
  // Measured on H100 at the qwen3-30b-a3b shape (bench/NOTES.md, "LoRA in the GEMM
  // epilogue": a sweep of 1/2/4/8 for both shrinks at batch 1/16/64/256, r16x1/r16x4/r64x1):
  // a handful of slots wants every CTA it can get (8); from a few dozen slots, 2 was best or
  // within 1 us of it; at 1024+ slots the pairs alone fill the GPU and 1 wins with several
  // adapters (batch 256 r16x4: 40 vs 44 us gate_up, 18 vs 27 us down).
  (void)num_experts;
  const int64_t slots = std::max<int64_t>(num_tokens, 1) * std::max(top_k, 1);
  if (slots <= 64) return 8;
  if (slots < 1024) return 2;
  return 1;
}

void moe_lora_expand(const Tensor& u, const MoeAlignment& vplan, const Tensor& B,
                     const Tensor& meta, LoraSeam seam, const Tensor& slot_weights, Tensor& out,
                     const Stream& stream) {
  moe_lora_expand_split(u, 1, vplan, B, meta, seam, slot_weights, out, stream);
}

namespace {

struct ExpandLaunch {
  detail::LoraPlanView plan;
  detail::ExpandArgs args;
  int blocks;
};

// Validates the expand's operands (`op` names it in errors) and packs the launch arguments.
ExpandLaunch check_expand(const Tensor& u, int splits, const MoeAlignment& vplan,
                          const Tensor& B, const Tensor& meta, LoraSeam seam,
                          const Tensor& slot_weights, Tensor& out, const char* op) {
  MOELORA_CHECK(splits >= 1 && splits <= kMaxLoraSplits, "{}: splits must be in [1, {}], found {}",
                op, kMaxLoraSplits, splits);
  check_cuda_tensor(u, DType::f32, "moe_lora_expand u");
  check_cuda_tensor(B, DType::bf16, "moe_lora_expand B");
  check_cuda_tensor(out, DType::f32, "moe_lora_expand out");
  MOELORA_CHECK(B.dim() == 4, "{} B: expected [S, E, N, r_max], found {}", op, B.describe());
  const int64_t N = B.size(2), r_max = B.size(3);
  MOELORA_CHECK(out.dim() == 2 && out.size(1) == N, "{} out: expected [M*k, N={}], found {}", op,
                N, out.describe());
  MOELORA_CHECK(N % 2 == 0, "{}: N={} must be even on CUDA", op, N);
  const int64_t n = out.size(0);
  const int64_t need = seam == LoraSeam::gate_up ? 2 * r_max : r_max;
  MOELORA_CHECK(u.dim() == 2 && u.size(0) == splits * n && u.size(1) >= need && u.size(1) <= 1024,
                "{} u: expected [{} * {}, {}..1024], found {}", op, splits, n, need, u.describe());
  const float* sw = nullptr;
  if (slot_weights.defined()) {
    check_cuda_tensor(slot_weights, DType::f32, "moe_lora_expand slot_weights");
    MOELORA_CHECK(slot_weights.numel() == n, "{} slot_weights: expected [{}], found {}", op, n,
                  slot_weights.describe());
    sw = slot_weights.data<float>();
  }
  check_meta(meta, B, op);
  const detail::LoraPlanView pv = check_vplan(vplan, n, B, op);
  const detail::ExpandArgs a{u.data<float>(), int(u.size(1)), splits, n * u.size(1), B.data(),
                             int(N), int(r_max), meta.data<int32_t>(), seam == LoraSeam::gate_up,
                             sw, out.data<float>()};
  return {pv, a, plan_blocks(vplan, n)};
}

}  // namespace

void moe_lora_expand_split(const Tensor& u, int splits, const MoeAlignment& vplan,
                           const Tensor& B, const Tensor& meta, LoraSeam seam,
                           const Tensor& slot_weights, Tensor& out, const Stream& stream) {
  const ExpandLaunch l =
      check_expand(u, splits, vplan, B, meta, seam, slot_weights, out, "moe_lora_expand");
  MOELORA_CUDA_CHECK(detail::launch_moe_lora_expand(l.plan, l.args, l.blocks, raw_stream(stream)));
}

bool moe_lora_delta_supported(int64_t hidden, int64_t inter, int r_max) {
  return hidden % 4 == 0 && inter % 4 == 0 && r_max % 8 == 0;
}

void moe_lora_expand_delta_split(const Tensor& u, int splits, const MoeAlignment& vplan,
                                 const Tensor& B, const Tensor& meta, LoraSeam seam,
                                 const Tensor& slot_weights, Tensor& d, const Stream& stream) {
  const ExpandLaunch l =
      check_expand(u, splits, vplan, B, meta, seam, slot_weights, d, "moe_lora_expand_delta");
  MOELORA_CHECK(detail::lora_expand4_ok(l.args),
                "moe_lora_expand_delta: needs N % 4 == 0 (and I % 4 == 0), r_max % 8 == 0 and a "
                "16-byte aligned output; found N={}, r_max={}, {}",
                l.args.N, l.args.r_max, d.describe());
  MOELORA_CUDA_CHECK(
      detail::launch_moe_lora_expand_delta(l.plan, l.args, l.blocks, raw_stream(stream)));
}

void moe_lora_add_delta(const Tensor& d, const Tensor& ids, const Tensor& token_slot,
                        int num_lora_slots, int num_experts, Tensor& out, const Stream& stream) {
  check_cuda_tensor(d, DType::f32, "moe_lora_add_delta d");
  check_cuda_tensor(out, DType::f32, "moe_lora_add_delta out");
  check_cuda_tensor(ids, DType::i32, "moe_lora_add_delta ids");
  check_cuda_tensor(token_slot, DType::i32, "moe_lora_add_delta token_slot");
  MOELORA_CHECK(ids.dim() == 2, "moe_lora_add_delta ids: expected [M, k], found {}",
                ids.describe());
  check_shape(token_slot, {ids.size(0)}, "moe_lora_add_delta token_slot");
  MOELORA_CHECK(out.dim() == 2 && out.size(0) == ids.numel() && out.size(1) % 4 == 0,
                "moe_lora_add_delta out: expected [{}, N] with N % 4 == 0, found {}", ids.numel(),
                out.describe());
  check_shape(d, out.shape(), "moe_lora_add_delta d");
  MOELORA_CHECK(reinterpret_cast<uintptr_t>(d.data()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(out.data()) % 16 == 0,
                "moe_lora_add_delta: d and out must be 16-byte aligned");
  MOELORA_CUDA_CHECK(detail::launch_moe_lora_add_delta(
      d.data<float>(), ids.data<int32_t>(), token_slot.data<int32_t>(), int(ids.size(1)),
      num_experts, num_lora_slots, out.size(0), int(out.size(1)), out.data<float>(),
      raw_stream(stream)));
}

std::string moe_lora_direct_unsupported(int64_t hidden, int64_t inter, int num_experts,
                                        int num_slots, int r_max, int64_t max_slots) {
  if (hidden % 8 != 0 || inter % 8 != 0)
    return fmt::format("hidden and intermediate sizes must be multiples of 8, found H {}, I {}",
                       hidden, inter);
  if (r_max % 8 != 0) return fmt::format("r_max must be a multiple of 8, found {}", r_max);
  const int64_t keys = int64_t(num_slots) * num_experts;
  const size_t smem = detail::moe_lora_direct_smem(int(std::min<int64_t>(max_slots, 1 << 20)),
                                                   int(keys), 2 * r_max, num_slots);
  if (max_slots > (1 << 20) || keys > (1 << 20) || smem > detail::kDirectMaxSmem)
    return fmt::format(
        "{} token-slots with {} LoRA slots x {} experts and r_max {} need {} bytes of shared "
        "memory per CTA, the kernel takes at most {}",
        max_slots, num_slots, num_experts, r_max, smem, detail::kDirectMaxSmem);
  return {};
}

void moe_lora_direct(const Tensor& in, int rows_div, const Tensor& ids, const Tensor& token_slot,
                     const Tensor& A, const Tensor& B, const Tensor& meta, LoraSeam seam,
                     const Tensor& slot_weights, Tensor& d, int cluster_size, int max_clusters,
                     const Stream& stream) {
  const char* op = "moe_lora_direct";
  const bool gate_up = seam == LoraSeam::gate_up;
  check_cuda_tensor(in, DType::bf16, "moe_lora_direct input");
  check_cuda_tensor(ids, DType::i32, "moe_lora_direct ids");
  check_cuda_tensor(token_slot, DType::i32, "moe_lora_direct token_slot");
  check_cuda_tensor(A, DType::bf16, "moe_lora_direct A");
  check_cuda_tensor(B, DType::bf16, "moe_lora_direct B");
  check_cuda_tensor(d, DType::f32, "moe_lora_direct d");
  MOELORA_CHECK(ids.dim() == 2, "{} ids: expected [M, k], found {}", op, ids.describe());
  const int64_t M = ids.size(0), k = ids.size(1), n = M * k;
  check_shape(token_slot, {M}, "moe_lora_direct token_slot");
  MOELORA_CHECK(rows_div == (gate_up ? k : 1), "{}: rows_div must be {} for the {} seam, found {}",
                op, gate_up ? k : 1, gate_up ? "gate_up" : "down", rows_div);
  MOELORA_CHECK(in.dim() == 2 && in.size(0) * rows_div == n, "{} input: expected [{}, K], found {}",
                op, n / rows_div, in.describe());
  const int64_t K = in.size(1);
  MOELORA_CHECK(A.dim() == 4 && A.size(3) == K, "{} A: expected [S, E, R, K={}], found {}", op, K,
                A.describe());
  const int64_t S = A.size(0), E = A.size(1), R = A.size(2);
  MOELORA_CHECK(B.dim() == 4 && B.size(0) == S && B.size(1) == E,
                "{} B: expected [S={}, E={}, N, r_max], found {}", op, S, E, B.describe());
  const int64_t N = B.size(2), r_max = B.size(3);
  MOELORA_CHECK(R == (gate_up ? 2 : 1) * r_max,
                "{} A: expected {} shrink rows for r_max {}, found {}", op,
                (gate_up ? 2 : 1) * r_max, r_max, A.describe());
  MOELORA_CHECK(!gate_up || N % 2 == 0, "{} B: the gate_up seam needs an even N, found {}", op,
                B.describe());
  check_shape(d, {n, N}, "moe_lora_direct d");
  check_meta(meta, A, op);
  const float* sw = nullptr;
  if (slot_weights.defined()) {
    check_cuda_tensor(slot_weights, DType::f32, "moe_lora_direct slot_weights");
    MOELORA_CHECK(slot_weights.numel() == n, "{} slot_weights: expected [{}], found {}", op, n,
                  slot_weights.describe());
    sw = slot_weights.data<float>();
  }
  MOELORA_CHECK(cluster_size == 1 || cluster_size == 2 || cluster_size == 4 || cluster_size == 8,
                "{}: cluster_size must be 1, 2, 4 or 8, found {}", op, cluster_size);
  MOELORA_CHECK(max_clusters >= 1, "{}: max_clusters must be >= 1, found {}", op, max_clusters);
  MOELORA_CHECK(K % 8 == 0 && r_max % 8 == 0,
                "{}: needs K and r_max multiples of 8, found K {}, r_max {}", op, K, r_max);
  MOELORA_CHECK(N % 4 == 0 && (!gate_up || (N / 2) % 4 == 0),
                "{}: the output width (and the gate / up halves) must be multiples of 4, found N "
                "{}",
                op, N);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&in, &A, &B, &d})
    MOELORA_CHECK(reinterpret_cast<uintptr_t>(t->data()) % 16 == 0,
                  "{}: {} must be 16-byte aligned", op, t->describe());
  const size_t smem = detail::moe_lora_direct_smem(int(n), int(S * E), int(R), int(S));
  MOELORA_CHECK(smem <= detail::kDirectMaxSmem,
                "{}: {} token-slots, {} LoRA slots x {} experts and {} shrink rows need {} bytes "
                "of shared memory, the kernel takes at most {}",
                op, n, S, E, R, smem, detail::kDirectMaxSmem);
  if (n == 0) return;
  const detail::DirectLoraArgs a{.in = in.data(),
                                 .rows_div = rows_div,
                                 .ids = ids.data<int32_t>(),
                                 .token_slot = token_slot.data<int32_t>(),
                                 .top_k = int(k),
                                 .n = int(n),
                                 .num_experts = int(E),
                                 .num_lora_slots = int(S),
                                 .A = A.data(),
                                 .R = int(R),
                                 .K = int(K),
                                 .B = B.data(),
                                 .N = int(N),
                                 .r_max = int(r_max),
                                 .meta = meta.data<int32_t>(),
                                 .gate_up = gate_up,
                                 .slot_weights = sw,
                                 .out = d.data<float>()};
  MOELORA_CUDA_CHECK(
      detail::launch_moe_lora_direct(a, cluster_size, max_clusters, raw_stream(stream)));
}

int moe_lora_shrink_splits(int64_t num_slots) {
  // Few (adapter, expert) blocks leave most SMs idle and each CTA latency-bound on its A
  // tile: split K so ~8x more CTAs each stream a slice.
  if (num_slots <= 16) return 8;
  if (num_slots <= 64) return 4;
  if (num_slots <= 256) return 2;
  return 1;
}

int moe_lora_block_m(int64_t num_tokens, int top_k) {
  // The shrink MMA covers 8 slots; a wider block lets one CTA reuse its A fragments over
  // two 8-slot tiles (and the expand its staged B), which pays off once (adapter, expert)
  // pairs hold 16+ slots; padding tiles cost little (both kernels stop at them).
  const int64_t slots = num_tokens * top_k;
  if (slots <= 512) return 8;
  if (slots <= 4096) return 16;
  return 32;
}

}  // namespace moelora::cuda
