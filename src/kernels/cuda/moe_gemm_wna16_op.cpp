// int4 / int8 expert GEMM ops (cuda_wna16, layer 3 of 3): validate the Tensors and the packed
// stack, throw moelora::Error naming the tensor, call the launcher (moe_gemm_wna16.cu).
#include <cstdint>
#include <limits>

#include <fmt/format.h>

#include "core/cuda_check.h"
#include "kernels/cuda/moe_gemm_config.h"
#include "kernels/cuda/moe_gemm_wna16_launch.h"
#include "kernels/cuda/moe_op_checks.h"
#include "kernels/cuda/moe_wna16_ops.h"
#include "quant/wna16_layout.h"

namespace moelora::cuda {

bool moe_wna16_group_supported(int bits, int64_t group_k, int64_t k, std::string* why) {
  auto fail = [&](std::string reason) {
    if (why) *why = std::move(reason);
    return false;
  };
  if (bits != 4 && bits != 8) return fail(fmt::format("{}-bit weights: int4 and int8 only", bits));
  if (k <= 0 || k % 8 != 0)
    return fail(fmt::format("reduction length K = {} is not a positive multiple of 8 (16-byte "
                            "activation rows); the reference backend can run it", k));
  if (group_k <= 0 || k % group_k != 0)
    return fail(fmt::format("group size {} does not divide K = {}", group_k, k));
  if (group_k != k && group_k != 32 && group_k != 64 && group_k != 128)
    return fail(fmt::format("group size {} (K = {}): cuda_wna16 runs 32, 64, 128 and "
                            "per-channel; the reference backend can run it", group_k, k));
  return true;
}

namespace {

int num_sms() {
  int device = 0, sms = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// The packed stack against its logical sizes (a packed size is never taken for a logical one).
void check_stack(const ExpertMatrices& w, int64_t k_expected, Device d, const char* what) {
  MOELORA_CHECK(w.format == WeightFormat::int4 || w.format == WeightFormat::int8,
                "{}: cuda_wna16 runs int4 / int8 stacks, found {}", what, format_name(w.format));
  const int bits = w.format == WeightFormat::int4 ? 4 : 8;
  MOELORA_CHECK(w.k == k_expected, "{}: logical K = {} but the activation has {} columns", what,
                w.k, k_expected);
  std::string why;
  MOELORA_CHECK(moe_wna16_group_supported(bits, w.group_k, w.k, &why), "{}: {}", what, why);
  const int64_t np = quant::wna16::padded_n(w.n), kp = quant::wna16::padded_k(w.k, bits);
  const std::string name(what);
  check_cuda_tensor(w.w, DType::i32, (name + " codes").c_str());
  check_device(w.w, d, (name + " codes").c_str());
  check_shape(w.w, {w.groups, np / 16, kp / quant::wna16::tile_k(bits), quant::wna16::kTileWords},
              (name + " codes (packed: padded rows / 16, K tiles, 128 words)").c_str());
  const Shape sshape{w.groups, w.k / w.group_k, np};
  check_cuda_tensor(w.scales, DType::f32, (name + " scales").c_str());
  check_device(w.scales, d, (name + " scales").c_str());
  check_shape(w.scales, sshape, (name + " scales [G, K/group_k, padded N]").c_str());
  if (w.zeros.defined()) {
    check_cuda_tensor(w.zeros, DType::f32, (name + " zeros").c_str());
    check_device(w.zeros, d, (name + " zeros").c_str());
    check_shape(w.zeros, sshape, (name + " zeros [G, K/group_k, padded N]").c_str());
  }
  if (w.perm.defined()) {
    check_cuda_tensor(w.perm, DType::i32, (name + " perm").c_str());
    check_device(w.perm, d, (name + " perm").c_str());
    check_shape(w.perm, {w.groups, w.k}, (name + " perm").c_str());
  }
  MOELORA_CHECK(w.n <= std::numeric_limits<int32_t>::max() / 2 && w.k <= (1 << 24),
                "{}: N = {}, K = {} too large", what, w.n, w.k);
}

// Plan buffers for `slots` slots; returns the worst-case block count.
int64_t plan_blocks(const MoeAlignment& plan, int64_t slots, int64_t groups, Device d,
                    const char* op) {
  MOELORA_CHECK(plan.block_m >= 1 && plan.block_m <= kMaxBlockM && plan.num_groups == groups,
                "{}: plan (block_m {}, {} groups) does not fit weights of {} groups", op,
                plan.block_m, plan.num_groups, groups);
  const int64_t cap = MoeAlignment::capacity(slots, plan.num_groups, plan.block_m);
  check_cuda_tensor(plan.sorted_slots, DType::i32, "plan.sorted_slots");
  check_cuda_tensor(plan.block_group, DType::i32, "plan.block_group");
  check_cuda_tensor(plan.num_padded, DType::i32, "plan.num_padded");
  for (const Tensor* t : {&plan.sorted_slots, &plan.block_group, &plan.num_padded})
    check_device(*t, d, "plan");
  MOELORA_CHECK(plan.sorted_slots.numel() >= cap && plan.block_group.numel() >= cap / plan.block_m &&
                    plan.num_padded.numel() >= 1,
                "{}: plan buffers ({} slots, {} blocks) are too small for {} slots in blocks of "
                "{} ({} entries)", op, plan.sorted_slots.numel(), plan.block_group.numel(), slots,
                plan.block_m, cap);
  return cap / plan.block_m;
}

// act bf16 [rows, K] on CUDA, 16-byte aligned.
void check_act(const Tensor& act, const char* what) {
  check_cuda_tensor(act, DType::bf16, what);
  MOELORA_CHECK(act.dim() == 2, "{}: expected [rows, K], found {}", what, act.describe());
  MOELORA_CHECK(reinterpret_cast<uintptr_t>(act.data()) % 16 == 0,
                "{}: data must be 16-byte aligned, found {}", what, act.data());
}

MoeGemmWna16Args base_args(const ExpertMatrices& w, const MoeAlignment& plan, int64_t slots) {
  MoeGemmWna16Args p{};
  p.w = w.w.data();
  p.scales = w.scales.data<float>();
  p.zeros = w.zeros.defined() ? w.zeros.data<float>() : nullptr;
  p.perm = w.perm.defined() ? w.perm.data<int32_t>() : nullptr;
  p.sorted_slots = plan.sorted_slots.data<int32_t>();
  p.block_group = plan.block_group.data<int32_t>();
  p.num_padded = plan.num_padded.data<int32_t>();
  p.num_slots = int(slots);
  p.block_m = plan.block_m;
  p.n = int(w.n);
  p.k = int(w.k);
  p.bits = w.format == WeightFormat::int4 ? 4 : 8;
  p.np = int(quant::wna16::padded_n(w.n));
  p.k_tiles = int(quant::wna16::padded_k(w.k, p.bits) / quant::wna16::tile_k(p.bits));
  p.group_k = int(w.group_k);
  p.num_groups_k = int(w.k / w.group_k);
  return p;
}

void launch(MoeGemmWna16Args p, int64_t blocks, int groups, bool plan_ready,
            const Stream& stream) {
  if (p.num_slots == 0) return;
  const MoeGemmConfig cfg =
      moe_gemm_config(p.n, p.k, p.block_m, p.num_slots, groups, num_sms());
  // The launcher picks its own tiles up to 32 tokens per block (moe_gemm_wna16.cu); above, 128
  // rows (2 MMA tiles per warp; 64 rows of one past 64 tokens: registers).
  const int rows = p.block_m > 32 ? 128 : cfg.rows;
  p.pdl = cfg.pdl;
  p.plan_ready = plan_ready;
  p.row_tiles_fastest = cfg.row_tiles_fastest;
  MOELORA_CHECK(!p.row_tiles_fastest || blocks <= 65535, "wna16 GEMM: {} blocks is too many",
                blocks);
  MOELORA_CUDA_CHECK(launch_moe_gemm_wna16(p, int(blocks), rows, raw_stream(stream)));
}

void gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const ExpertMatrices& w13,
           Tensor& out, const Stream& stream, bool fused) {
  const char* op = fused ? "moe_gemm1_activation_wna16" : "moe_gemm1_wna16";
  MOELORA_CHECK(top_k >= 1, "{}: top_k must be >= 1, found {}", op, top_k);
  check_act(x, "moe_gemm1_wna16 x");
  check_stack(w13, x.size(1), x.device(), "moe_gemm1_wna16 w13");
  const int64_t slots = x.size(0) * top_k;
  MOELORA_CHECK(slots <= std::numeric_limits<int32_t>::max(), "{}: {} slots", op, slots);
  if (fused) {
    MOELORA_CHECK(moe_wna16_fused_supported(w13),
                  "{}: N = {}: the fused activation needs N / 2 to be a multiple of 16", op,
                  w13.n);
    check_cuda_tensor(out, DType::bf16, "moe_gemm1_activation_wna16 a");
    check_shape(out, {slots, w13.n / 2}, "moe_gemm1_activation_wna16 a");
  } else {
    check_cuda_tensor(out, DType::f32, "moe_gemm1_wna16 h");
    check_shape(out, {slots, w13.n}, "moe_gemm1_wna16 h");
  }
  check_device(out, x.device(), op);
  const int64_t blocks = plan_blocks(plan, slots, w13.groups, x.device(), op);
  MoeGemmWna16Args p = base_args(w13, plan, slots);
  p.act = x.data();
  p.rows_div = top_k;
  p.out = fused ? nullptr : out.data<float>();
  p.act_out = fused ? out.data() : nullptr;
  launch(p, blocks, plan.num_groups, false, stream);
}

void gemm2(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
           const Tensor& slot_weights, Tensor& o, const Stream& stream, bool plan_ready) {
  constexpr const char* op = "moe_gemm2_wna16";
  check_act(a, "moe_gemm2_wna16 a");
  check_stack(w2, a.size(1), a.device(), "moe_gemm2_wna16 w2");
  const int64_t slots = a.size(0);
  MOELORA_CHECK(slots <= std::numeric_limits<int32_t>::max(), "{}: {} slots", op, slots);
  check_cuda_tensor(o, DType::f32, "moe_gemm2_wna16 o");
  check_device(o, a.device(), "moe_gemm2_wna16 o");
  check_shape(o, {slots, w2.n}, "moe_gemm2_wna16 o");
  if (slot_weights.defined()) {
    check_cuda_tensor(slot_weights, DType::f32, "moe_gemm2_wna16 slot_weights");
    check_device(slot_weights, a.device(), "moe_gemm2_wna16 slot_weights");
    check_shape(slot_weights, {slots}, "moe_gemm2_wna16 slot_weights");
  }
  const int64_t blocks = plan_blocks(plan, slots, w2.groups, a.device(), op);
  MoeGemmWna16Args p = base_args(w2, plan, slots);
  p.act = a.data();
  p.rows_div = 1;
  p.out = o.data<float>();
  p.slot_scale = slot_weights.defined() ? slot_weights.data<float>() : nullptr;
  launch(p, blocks, plan.num_groups, plan_ready, stream);
}

}  // namespace

bool moe_wna16_fused_supported(const ExpertMatrices& w13) { return w13.n % 32 == 0; }

void moe_gemm1_wna16(const Tensor& x, int top_k, const MoeAlignment& plan,
                     const ExpertMatrices& w13, Tensor& h, const Stream& stream) {
  gemm1(x, top_k, plan, w13, h, stream, false);
}

void moe_gemm1_activation_wna16(const Tensor& x, int top_k, const MoeAlignment& plan,
                                const ExpertMatrices& w13, Tensor& a, const Stream& stream) {
  gemm1(x, top_k, plan, w13, a, stream, true);
}

void moe_gemm2_wna16(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                     const Tensor& slot_weights, Tensor& o, const Stream& stream) {
  gemm2(a, plan, w2, slot_weights, o, stream, false);
}

void moe_gemm2_wna16_plan_ready(const Tensor& a, const MoeAlignment& plan,
                                const ExpertMatrices& w2, const Tensor& slot_weights, Tensor& o,
                                const Stream& stream) {
  gemm2(a, plan, w2, slot_weights, o, stream, true);
}

}  // namespace moelora::cuda
