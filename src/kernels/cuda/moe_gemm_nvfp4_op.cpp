// NVFP4 expert GEMM ops on CUDA (layer 3 of 3): validate Tensors, throw naming the tensor,
// call the launcher (moe_gemm_nvfp4.cu). Contracts: moe_nvfp4_ops.h.
#include <cstdint>
#include <cstdlib>
#include <limits>

#include "core/cuda_check.h"
#include "kernels/cuda/moe_gemm_nvfp4_launch.h"
#include "kernels/cuda/moe_nvfp4_ops.h"
#include "kernels/cuda/moe_op_checks.h"

namespace moelora::cuda {
namespace {

int device_sms() {
  int device = 0, sms = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// The nvfp4 stack as the kernel reads it; fills the weight fields of `p`.
void set_weights(const ExpertMatrices& w, const Device& d, const char* op, const char* name,
                 MoeGemmNvfp4Args& p) {
  MOELORA_CHECK(w.format == WeightFormat::nvfp4, "{}: {} must be an nvfp4 stack, found {}", op,
                name, format_name(w.format));
  MOELORA_CHECK(w.k > 0 && w.k % 16 == 0 && w.n > 0 && w.groups > 0,
                "{}: {} must have N > 0 and K a positive multiple of 16, found [{}, {}, {}]", op,
                name, w.groups, w.n, w.k);
  const int64_t np = (w.n + 15) / 16 * 16, kp = (w.k + 63) / 64 * 64;
  check_cuda_tensor(w.w, DType::u8, name);
  check_device(w.w, d, name);
  MOELORA_CHECK(w.w.numel() == w.groups * np * kp / 2,
                "{}: {} codes must hold [{}, {}, {}] bytes (N, K padded to 16, 64), found {}", op,
                name, w.groups, np, kp / 2, w.w.describe());
  check_cuda_tensor(w.scales, DType::f8_e4m3, name);
  check_device(w.scales, d, name);
  MOELORA_CHECK(w.scales.numel() == w.groups * np * kp / 16,
                "{}: {} scales must hold [{}, {}, {}] e4m3 values, found {}", op, name, w.groups,
                np, kp / 16, w.scales.describe());
  check_cuda_tensor(w.global_scale, DType::f32, name);
  check_device(w.global_scale, d, name);
  const bool per_row = w.global_scale.dim() == 2;
  MOELORA_CHECK(w.global_scale.numel() == (per_row ? w.groups * w.n : w.groups),
                "{}: {} global_scale must be f32 [{}] or [{}, {}], found {}", op, name, w.groups,
                w.groups, w.n, w.global_scale.describe());
  MOELORA_CHECK(w.n <= std::numeric_limits<int32_t>::max() / 2 && kp <= (1 << 30),
                "{}: {} is too large for 32-bit indexing ([{}, {}])", op, name, w.n, w.k);
  p.codes = w.w.data<uint8_t>();
  p.scales = static_cast<const uint8_t*>(w.scales.data());
  p.gscale = w.global_scale.data<float>();
  p.gs_group_stride = per_row ? int(w.n) : 1;
  p.gs_row_stride = per_row ? 1 : 0;
  p.n = int(w.n);
  p.k = int(w.k);
  p.row_tiles16 = int(np / 16);
  p.k_chunks64 = int(kp / 64);
}

// The plan against `num_slots` slots; returns the worst-case block count and sets p's plan.
int64_t set_plan(const MoeAlignment& plan, int64_t num_slots, int64_t groups, const Device& d,
                 const char* op, MoeGemmNvfp4Args& p) {
  MOELORA_CHECK(plan.block_m >= 1 && plan.block_m <= kMaxBlockM && plan.num_groups == groups,
                "{}: plan (block_m {}, {} groups) must have block_m in [1, {}] and the "
                "weights' {} groups", op, plan.block_m, plan.num_groups, kMaxBlockM, groups);
  const int64_t cap = MoeAlignment::capacity(num_slots, plan.num_groups, plan.block_m);
  const int64_t blocks = cap / plan.block_m;
  check_cuda_tensor(plan.sorted_slots, DType::i32, "plan.sorted_slots");
  check_cuda_tensor(plan.block_group, DType::i32, "plan.block_group");
  check_cuda_tensor(plan.num_padded, DType::i32, "plan.num_padded");
  for (const Tensor* t : {&plan.sorted_slots, &plan.block_group, &plan.num_padded})
    check_device(*t, d, "plan");
  MOELORA_CHECK(plan.sorted_slots.numel() >= cap && plan.block_group.numel() >= blocks &&
                    plan.num_padded.numel() >= 1,
                "{}: plan buffers (sorted_slots {}, block_group {}) are smaller than {} slots in "
                "blocks of {} need ({}, {})", op, plan.sorted_slots.numel(),
                plan.block_group.numel(), num_slots, plan.block_m, cap, blocks);
  MOELORA_CHECK(num_slots <= std::numeric_limits<int32_t>::max() && blocks <= 65535 * 2048,
                "{}: {} slots is too many", op, num_slots);
  p.sorted_slots = plan.sorted_slots.data<int32_t>();
  p.block_group = plan.block_group.data<int32_t>();
  p.num_padded = plan.num_padded.data<int32_t>();
  p.num_slots = int(num_slots);
  p.block_m = plan.block_m;
  return blocks;
}

void check_act(const Tensor& act, int64_t k, const char* op, const char* name) {
  check_cuda_tensor(act, DType::bf16, name);
  MOELORA_CHECK(act.dim() == 2 && act.size(1) == k,
                "{}: {} must be [rows, {}] (the weights' K), found {}", op, name, k,
                act.describe());
  MOELORA_CHECK(reinterpret_cast<uintptr_t>(act.data()) % 16 == 0,
                "{}: {} must be 16-byte aligned, found address {}", op, name, act.data());
}

void launch(const MoeGemmNvfp4Args& p, int64_t blocks, const MoeGemmConfig& cfg,
            const Stream& stream) {
  MOELORA_CHECK(cfg.rows == 32 || cfg.rows == 64 || cfg.rows == 128,
                "nvfp4 expert GEMM tile: rows must be 32, 64 or 128, found {}", cfg.rows);
  MOELORA_CHECK(!cfg.row_tiles_fastest || blocks <= 65535,
                "nvfp4 expert GEMM: {} blocks on the grid's y axis, at most 65535", blocks);
  if (p.num_slots == 0) return;
  MoeGemmNvfp4Args q = p;
  q.pdl = cfg.pdl;
  q.plan_ready = cfg.plan_ready;
  q.row_tiles_fastest = cfg.row_tiles_fastest;
  q.split_k = cfg.split_k;
  MOELORA_CUDA_CHECK(launch_moe_gemm_nvfp4(q, int(blocks), cfg.rows, raw_stream(stream)));
}

MoeGemmConfig heuristic(const ExpertMatrices& w, const MoeAlignment& plan, int64_t slots) {
  return moe_gemm_config(w.n, w.k, plan.block_m, slots, plan.num_groups, device_sms());
}

}  // namespace

bool moe_gemm1_nvfp4_fusable(const ExpertMatrices& w13) {
  return w13.n % 2 == 0 && (w13.n / 2) % 16 == 0;
}

void moe_gemm1_nvfp4_tiled(const Tensor& x, int top_k, const MoeAlignment& plan,
                           const ExpertMatrices& w13, Tensor& out, const Stream& stream,
                           const MoeGemmConfig& cfg, bool fused) {
  const char* op = fused ? "moe_gemm1_activation_nvfp4" : "moe_gemm1_nvfp4";
  MOELORA_CHECK(top_k >= 1, "{}: top_k must be >= 1, found {}", op, top_k);
  MoeGemmNvfp4Args p{};
  set_weights(w13, x.device(), op, "w13", p);
  check_act(x, w13.k, op, "x");
  const int64_t slots = x.size(0) * top_k;
  if (fused) {
    MOELORA_CHECK(moe_gemm1_nvfp4_fusable(w13),
                  "{}: the fused activation needs I = N / 2 a multiple of 16, found N = {}", op,
                  w13.n);
    check_cuda_tensor(out, DType::bf16, "a");
    check_shape(out, {slots, w13.n / 2}, "a");
    check_device(out, x.device(), "a");
    p.act_out = out.data();
  } else {
    check_cuda_tensor(out, DType::f32, "h");
    check_shape(out, {slots, w13.n}, "h");
    check_device(out, x.device(), "h");
    p.out = out.data<float>();
  }
  const int64_t blocks = set_plan(plan, slots, w13.groups, x.device(), op, p);
  p.act = x.data();
  p.rows_div = top_k;
  launch(p, blocks, cfg, stream);
}

void moe_gemm2_nvfp4_tiled(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                           const Tensor& slot_weights, Tensor& o, const Stream& stream,
                           const MoeGemmConfig& cfg) {
  constexpr const char* op = "moe_gemm2_nvfp4";
  MoeGemmNvfp4Args p{};
  set_weights(w2, a.device(), op, "w2", p);
  check_act(a, w2.k, op, "a");
  const int64_t slots = a.size(0);
  check_cuda_tensor(o, DType::f32, "o");
  check_shape(o, {slots, w2.n}, "o");
  check_device(o, a.device(), "o");
  if (slot_weights.defined()) {
    check_cuda_tensor(slot_weights, DType::f32, "slot_weights");
    check_shape(slot_weights, {slots}, "slot_weights");
    check_device(slot_weights, a.device(), "slot_weights");
    p.slot_scale = slot_weights.data<float>();
  }
  const int64_t blocks = set_plan(plan, slots, w2.groups, a.device(), op, p);
  p.act = a.data();
  p.out = o.data<float>();
  p.rows_div = 1;
  launch(p, blocks, cfg, stream);
}

void moe_gemm1_nvfp4(const Tensor& x, int top_k, const MoeAlignment& plan,
                     const ExpertMatrices& w13, Tensor& h, const Stream& stream) {
  const int64_t slots = x.dim() == 2 ? x.size(0) * top_k : 0;
  moe_gemm1_nvfp4_tiled(x, top_k, plan, w13, h, stream, heuristic(w13, plan, slots), false);
}

void moe_gemm1_activation_nvfp4(const Tensor& x, int top_k, const MoeAlignment& plan,
                                const ExpertMatrices& w13, Tensor& a, const Stream& stream) {
  const int64_t slots = x.dim() == 2 ? x.size(0) * top_k : 0;
  moe_gemm1_nvfp4_tiled(x, top_k, plan, w13, a, stream, heuristic(w13, plan, slots), true);
}

void moe_gemm2_nvfp4(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                     const Tensor& slot_weights, Tensor& o, const Stream& stream,
                     bool plan_ready) {
  const int64_t slots = a.dim() == 2 ? a.size(0) : 0;
  MoeGemmConfig cfg = heuristic(w2, plan, slots);
  cfg.plan_ready = plan_ready;
  moe_gemm2_nvfp4_tiled(a, plan, w2, slot_weights, o, stream, cfg);
}

}  // namespace moelora::cuda
