// fp8 block-scale expert GEMM ops on CUDA (layer 3 of 3): validate Tensors and the packed
// stack, throw moelora::Error naming the tensor, then call the launcher (moe_gemm_fp8.cu).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include <fmt/format.h>

#include "core/cuda_check.h"
#include "kernels/cuda/moe_fp8_ops.h"
#include "kernels/cuda/moe_gemm_fp8_launch.h"
#include "kernels/cuda/moe_lora_inline_ops.h"
#include "kernels/cuda/moe_op_checks.h"

namespace moelora::cuda {
namespace {

int sm_count() {
  int device = 0, sms = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

void check_16(const void* p, const std::string& what) {
  MOELORA_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0,
                "{}: data must be 16-byte aligned for the fp8 expert GEMMs, found address {}", what,
                p);
}

// The packed stack (experts_fp8.cpp): codes e4m3 [G, N, K], scales f32 [G, P, NBp, KB].
// Fills the weight fields of `p`.
void check_stack(const ExpertMatrices& w, Device d, const std::string& name, MoeGemmFp8Args& p) {
  MOELORA_CHECK(w.format == WeightFormat::fp8_block, "{}: expected an fp8_block stack, found {}",
                name, format_name(w.format));
  std::string why;
  MOELORA_CHECK(moe_fp8_stack_supported(w.group_n, w.group_k, w.k, &why), "{}: {}", name, why);
  const std::string wn = name + " codes", sn = name + " scales";
  check_cuda_tensor(w.w, DType::f8_e4m3, wn.c_str());
  check_device(w.w, d, wn.c_str());
  check_shape(w.w, {w.groups, w.n, w.k}, wn.c_str());
  check_cuda_tensor(w.scales, DType::f32, sn.c_str());
  check_device(w.scales, d, sn.c_str());
  MOELORA_CHECK(w.scales.dim() == 4 && w.scales.size(0) == w.groups && w.scales.size(1) >= 1 &&
                    w.n % w.scales.size(1) == 0,
                "{}: expected [G = {}, P, NBp, KB] with P parts dividing N = {}, found {}", sn,
                w.groups, w.n, w.scales.describe());
  const int64_t parts = w.scales.size(1), part_rows = w.n / parts;
  const int64_t part_blocks = (part_rows + w.group_n - 1) / w.group_n;
  const int64_t k_blocks = (w.k + kFp8BlockK - 1) / kFp8BlockK;
  check_shape(w.scales, {w.groups, parts, part_blocks, k_blocks}, sn.c_str());
  check_16(w.w.data(), wn);
  MOELORA_CHECK(w.n * w.k <= std::numeric_limits<int32_t>::max() && (w.n + 31) / 32 <= 65535,
                "{}: N = {}, K = {} out of the kernels' range", name, w.n, w.k);
  p.w = static_cast<const uint8_t*>(w.w.data());
  p.w_scale = w.scales.data<float>();
  p.n = int(w.n);
  p.k = int(w.k);
  p.block_n = int(w.group_n);
  p.part_rows = int(part_rows);
  p.part_blocks = int(part_blocks);
  p.k_blocks = int(k_blocks);
}

// The plan against `num_slots` slots; returns the worst-case block count.
int64_t check_plan(const MoeAlignment& plan, int64_t num_slots, int64_t groups, Device d,
                   const char* op) {
  MOELORA_CHECK(plan.block_m >= 1 && plan.block_m <= kMaxBlockM,
                "{}: plan.block_m must be in [1, {}], found {}", op, kMaxBlockM, plan.block_m);
  MOELORA_CHECK(plan.num_groups == groups,
                "{}: weights hold {} groups but the plan was built for {}", op, groups,
                plan.num_groups);
  const int64_t cap = MoeAlignment::capacity(num_slots, plan.num_groups, plan.block_m);
  const char* names[3] = {"plan.sorted_slots", "plan.block_group", "plan.num_padded"};
  const Tensor* ts[3] = {&plan.sorted_slots, &plan.block_group, &plan.num_padded};
  const int64_t need[3] = {cap, cap / plan.block_m, 1};
  for (int i = 0; i < 3; ++i) {
    check_cuda_tensor(*ts[i], DType::i32, names[i]);
    check_device(*ts[i], d, names[i]);
    MOELORA_CHECK(ts[i]->dim() == 1 && ts[i]->size(0) >= need[i],
                  "{}: {} must be 1-D with at least {} entries, found {}", op, names[i], need[i],
                  ts[i]->describe());
  }
  MOELORA_CHECK(cap / plan.block_m <= std::numeric_limits<int32_t>::max(),
                "{}: {} blocks is too many", op, cap / plan.block_m);
  return cap / plan.block_m;
}

// Activation in (bf16 [rows, K]); the output is checked by the callers.
void check_act(const Tensor& act, int64_t k, const char* what, const char* op) {
  check_cuda_tensor(act, DType::bf16, what);
  MOELORA_CHECK(act.dim() == 2 && act.size(1) == k,
                "{}: {} must be [rows, {}] (the weights' K), found {}", op, what, k,
                act.describe());
  check_16(act.data(), what);
}

// The buffer holds `rows` x `k` codes and their scales; fills the activation fields of `p`.
void check_buffer(const Fp8ActBuffer& b, int64_t rows, int64_t k, Device d, const char* op,
                  MoeGemmFp8Args& p) {
  check_cuda_tensor(b.q, DType::f8_e4m3, "fp8 activation buffer q");
  check_device(b.q, d, "fp8 activation buffer q");
  check_cuda_tensor(b.scale, DType::f32, "fp8 activation buffer scale");
  check_device(b.scale, d, "fp8 activation buffer scale");
  MOELORA_CHECK(b.fits(rows, k),
                "{}: the fp8 activation buffer must hold {} x {} codes and {} scales, found q {} "
                "and scale {}",
                op, rows, k, rows * ((k + kFp8BlockK - 1) / kFp8BlockK), b.q.describe(),
                b.scale.describe());
  check_16(b.q.data(), "fp8 activation buffer q");
  p.act_q = static_cast<const uint8_t*>(b.q.data());
  p.act_scale = b.scale.data<float>();
}

// Quantizes `act` into the buffer (checked), then runs the GEMM on it.
void run(MoeGemmFp8Args& p, const Tensor& act, const MoeAlignment& plan, int64_t blocks,
         const MoeGemmConfig& cfg, const Stream& stream) {
  MOELORA_CHECK(cfg.rows == 32 || cfg.rows == 64 || cfg.rows == 128,
                "fp8 expert GEMM tile: rows must be 32, 64 or 128, found {}", cfg.rows);
  MOELORA_CHECK(!cfg.row_tiles_fastest || blocks <= 65535,
                "fp8 expert GEMM: {} blocks on the grid's y axis, at most 65535", blocks);
  p.sorted_slots = plan.sorted_slots.data<int32_t>();
  p.block_group = plan.block_group.data<int32_t>();
  p.num_padded = plan.num_padded.data<int32_t>();
  p.block_m = plan.block_m;
  p.pdl = cfg.pdl;
  // The kernel right before the GEMM is the quantization, whose CTAs let it start only after
  // waiting for their own predecessor: the plan is older than that (see moe_fp8_ops.h).
  p.plan_ready = true;
  p.row_tiles_fastest = cfg.row_tiles_fastest;
  if (p.num_slots == 0) return;
  MOELORA_CUDA_CHECK(
      launch_fp8_quantize_act(act.data(), int(act.size(0)), p.k, const_cast<uint8_t*>(p.act_q),
                              const_cast<float*>(p.act_scale), cfg.pdl, raw_stream(stream)));
  MOELORA_CUDA_CHECK(launch_moe_gemm_fp8(p, int(blocks), cfg.rows, raw_stream(stream)));
}

// The bf16 heuristic's tile. With the per-thread copy plans, its 64 rows beat the 128-row
// override the first pass had measured better (H100, qwen3-30b-a3b, fused gemm1 / gemm2 us,
// 64 vs 128 rows: batch 16 94.7 / 52.7 vs 98.7 / 55.1, batch 64 143.9 / 85.0 vs 148.6 / 84.7,
// batch 256 153.0 / 91.7 vs 155.5 / 93.8; bench/NOTES.md, fp8 section, second pass).
MoeGemmConfig heuristic(const ExpertMatrices& w, const MoeAlignment& plan, int64_t slots) {
  return moe_gemm_config(w.n, w.k, plan.block_m, slots, plan.num_groups, sm_count());
}

}  // namespace

Fp8ActBuffer Fp8ActBuffer::allocate(int64_t rows, int64_t k, Device d) {
  MOELORA_CHECK(rows >= 0 && k >= 0, "Fp8ActBuffer: rows and K must be >= 0, found {} x {}", rows,
                k);
  const int64_t kb = (k + kFp8BlockK - 1) / kFp8BlockK;
  // At least one element each: a defined tensor even for an empty problem.
  return {Tensor::empty({std::max<int64_t>(rows * k, 16)}, DType::f8_e4m3, d),
          Tensor::empty({std::max<int64_t>(rows * kb, 1)}, DType::f32, d)};
}

bool Fp8ActBuffer::fits(int64_t rows, int64_t k) const {
  const int64_t kb = (k + kFp8BlockK - 1) / kFp8BlockK;
  return q.defined() && scale.defined() && q.numel() >= rows * k && scale.numel() >= rows * kb;
}

void fp8_quantize_act(const Tensor& x, Fp8ActBuffer& buf, const Stream& stream) {
  check_cuda_tensor(x, DType::bf16, "fp8_quantize_act x");
  MOELORA_CHECK(x.dim() == 2 && x.size(1) > 0 && x.size(1) % 16 == 0 &&
                    x.size(0) <= std::numeric_limits<int32_t>::max() &&
                    x.size(1) <= std::numeric_limits<int32_t>::max(),
                "fp8_quantize_act x: expected [M, K] with K a positive multiple of 16, found {}",
                x.describe());
  check_16(x.data(), "fp8_quantize_act x");
  MoeGemmFp8Args p{};
  check_buffer(buf, x.size(0), x.size(1), x.device(), "fp8_quantize_act", p);
  MOELORA_CUDA_CHECK(launch_fp8_quantize_act(x.data(), int(x.size(0)), int(x.size(1)),
                                             static_cast<uint8_t*>(buf.q.data()),
                                             buf.scale.data<float>(), true, raw_stream(stream)));
}

bool moe_fp8_stack_supported(int64_t block_n, int64_t block_k, int64_t k, std::string* why) {
  if (block_k != kFp8BlockK) {
    if (why)
      *why = fmt::format(
          "cuda_fp8_block runs 128-channel K blocks only (its K tile), found "
          "block_k = {}; block_n may be any size (the reference backend runs "
          "every block size)",
          block_k);
    return false;
  }
  if (block_n < 1) {
    if (why) *why = fmt::format("block_n must be positive, found {}", block_n);
    return false;
  }
  if (k <= 0 || k % 16 != 0) {
    if (why)
      *why = fmt::format(
          "the reduction length K = {} must be a positive multiple of 16 "
          "(16-byte rows of e4m3 codes)",
          k);
    return false;
  }
  return true;
}

void moe_gemm1_fp8_tiled(const Tensor& x, int top_k, const MoeAlignment& plan,
                         const ExpertMatrices& w13, Tensor& out, bool fused, Fp8ActBuffer& act_buf,
                         const Stream& stream, const MoeGemmConfig& cfg,
                         const MoeLoraInline* lora) {
  const char* op = fused ? "moe_gemm1_fp8_activation" : "moe_gemm1_fp8";
  MOELORA_CHECK(!(fused && lora),
                "{}: inline LoRA needs the unfused h (the delta is added "
                "before SiLU by the activation)",
                op);
  MOELORA_CHECK(top_k >= 1, "{}: top_k must be >= 1, found {}", op, top_k);
  MoeGemmFp8Args p{};
  check_cuda_tensor(x, DType::bf16, "moe_gemm1_fp8 x");
  const Device d = x.device();
  check_stack(w13, d, "moe_gemm1_fp8 w13", p);
  check_act(x, w13.k, "moe_gemm1_fp8 x", op);
  const int64_t num_slots = x.size(0) * top_k;
  MOELORA_CHECK(num_slots <= std::numeric_limits<int32_t>::max(), "{}: {} slots is too many", op,
                num_slots);
  if (fused) {
    MOELORA_CHECK(w13.n % 2 == 0, "{}: w13 must have 2I rows, found {}", op, w13.n);
    check_cuda_tensor(out, DType::bf16, "moe_gemm1_fp8_activation a");
    check_device(out, d, "moe_gemm1_fp8_activation a");
    check_shape(out, {num_slots, w13.n / 2}, "moe_gemm1_fp8_activation a");
  } else {
    check_cuda_tensor(out, DType::f32, "moe_gemm1_fp8 h");
    check_device(out, d, "moe_gemm1_fp8 h");
    check_shape(out, {num_slots, w13.n}, "moe_gemm1_fp8 h");
  }
  const int64_t blocks = check_plan(plan, num_slots, w13.groups, d, op);
  check_buffer(act_buf, x.size(0), w13.k, d, op, p);
  p.out = fused ? nullptr : out.data<float>();
  p.act_out = fused ? out.data() : nullptr;
  p.slot_scale = nullptr;
  p.num_slots = int(num_slots);
  p.rows_div = top_k;
  if (lora)
    p.inline_lora = inline_lora_args(*lora, true, x, top_k, num_slots, w13.groups, w13.n, op);
  run(p, x, plan, blocks, cfg, stream);
}

void moe_gemm2_fp8_tiled(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                         const Tensor& slot_weights, Tensor& o, Fp8ActBuffer& act_buf,
                         const Stream& stream, const MoeGemmConfig& cfg,
                         const MoeLoraInline* lora) {
  constexpr const char* op = "moe_gemm2_fp8";
  MoeGemmFp8Args p{};
  check_cuda_tensor(a, DType::bf16, "moe_gemm2_fp8 a");
  const Device d = a.device();
  check_stack(w2, d, "moe_gemm2_fp8 w2", p);
  check_act(a, w2.k, "moe_gemm2_fp8 a", op);
  const int64_t num_slots = a.size(0);
  MOELORA_CHECK(num_slots <= std::numeric_limits<int32_t>::max(), "{}: {} slots is too many", op,
                num_slots);
  check_cuda_tensor(o, DType::f32, "moe_gemm2_fp8 o");
  check_device(o, d, "moe_gemm2_fp8 o");
  check_shape(o, {num_slots, w2.n}, "moe_gemm2_fp8 o");
  if (slot_weights.defined()) {
    check_cuda_tensor(slot_weights, DType::f32, "moe_gemm2_fp8 slot_weights");
    check_device(slot_weights, d, "moe_gemm2_fp8 slot_weights");
    check_shape(slot_weights, {num_slots}, "moe_gemm2_fp8 slot_weights");
  }
  const int64_t blocks = check_plan(plan, num_slots, w2.groups, d, op);
  check_buffer(act_buf, num_slots, w2.k, d, op, p);
  p.out = o.data<float>();
  p.slot_scale = slot_weights.defined() ? slot_weights.data<float>() : nullptr;
  p.num_slots = int(num_slots);
  p.rows_div = 1;
  if (lora) p.inline_lora = inline_lora_args(*lora, false, a, 1, num_slots, w2.groups, w2.n, op);
  run(p, a, plan, blocks, cfg, stream);
}

void moe_gemm1_fp8(const Tensor& x, int top_k, const MoeAlignment& plan, const ExpertMatrices& w13,
                   Tensor& h, Fp8ActBuffer& act_buf, const Stream& stream,
                   const MoeLoraInline* lora) {
  const int64_t slots = x.dim() == 2 ? x.size(0) * top_k : 0;
  moe_gemm1_fp8_tiled(x, top_k, plan, w13, h, false, act_buf, stream, heuristic(w13, plan, slots),
                      lora);
}

void moe_gemm1_fp8_activation(const Tensor& x, int top_k, const MoeAlignment& plan,
                              const ExpertMatrices& w13, Tensor& a, Fp8ActBuffer& act_buf,
                              const Stream& stream) {
  const int64_t slots = x.dim() == 2 ? x.size(0) * top_k : 0;
  moe_gemm1_fp8_tiled(x, top_k, plan, w13, a, true, act_buf, stream, heuristic(w13, plan, slots));
}

void moe_gemm2_fp8(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                   const Tensor& slot_weights, Tensor& o, Fp8ActBuffer& act_buf,
                   const Stream& stream, const MoeLoraInline* lora) {
  const int64_t slots = a.dim() == 2 ? a.size(0) : 0;
  moe_gemm2_fp8_tiled(a, plan, w2, slot_weights, o, act_buf, stream, heuristic(w2, plan, slots),
                      lora);
}

}  // namespace moelora::cuda
