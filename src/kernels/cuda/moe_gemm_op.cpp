// Expert GEMM ops on CUDA (layer 3 of 3): validate Tensors, throw moelora::Error naming the
// tensor, then call the launcher (moe_gemm.cu). Contracts: kernels/moe_ops.inc.
#include <cstdint>
#include <limits>
#include <utility>

#include "core/cuda_check.h"
#include "kernels/cuda/moe_gemm_config.h"
#include "kernels/cuda/moe_gemm_launch.h"
#include "kernels/cuda/moe_ops.h"

namespace moelora::cuda {
namespace {

int num_sms() {
  int device = 0, sms = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

void check_aligned_16(const Tensor& t, const char* what) {
  MOELORA_CHECK(reinterpret_cast<uintptr_t>(t.data()) % 16 == 0,
                "{}: data must be 16-byte aligned for the CUDA expert GEMMs, found address {}",
                what, t.data());
}

// Checks the plan's buffers against `num_slots` slots and returns the worst-case block count.
int64_t check_plan(const MoeAlignment& plan, int64_t num_slots, int64_t groups, Device d,
                   const char* op) {
  MOELORA_CHECK(plan.block_m >= 1 && plan.block_m <= kMaxBlockM,
                "{}: plan.block_m must be in [1, {}], found {}", op, kMaxBlockM, plan.block_m);
  MOELORA_CHECK(plan.num_groups == groups,
                "{}: weights hold {} groups but the plan was built for {}", op, groups,
                plan.num_groups);
  const int64_t cap = MoeAlignment::capacity(num_slots, plan.num_groups, plan.block_m);
  const int64_t blocks = cap / plan.block_m;
  for (auto [t, what] : {std::pair{&plan.sorted_slots, "plan.sorted_slots"},
                         std::pair{&plan.block_group, "plan.block_group"},
                         std::pair{&plan.num_padded, "plan.num_padded"}}) {
    check_dtype(*t, DType::i32, what);
    check_device(*t, d, what);
    check_contiguous(*t, what);
    MOELORA_CHECK(t->dim() == 1, "{}: {} must be 1-D, found {}", op, what, t->describe());
  }
  MOELORA_CHECK(plan.sorted_slots.size(0) >= cap,
                "{}: plan.sorted_slots holds {} entries, {} slots in blocks of {} need {}", op,
                plan.sorted_slots.size(0), num_slots, plan.block_m, cap);
  MOELORA_CHECK(plan.block_group.size(0) >= blocks,
                "{}: plan.block_group holds {} entries, expected at least {}", op,
                plan.block_group.size(0), blocks);
  MOELORA_CHECK(plan.num_padded.size(0) >= 1, "{}: plan.num_padded is empty", op);
  MOELORA_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "{}: {} blocks is too many", op,
                blocks);
  return blocks;
}

// Shared checks of both GEMMs: act [rows, K] bf16, w [G, N, K] bf16, out [num_slots, N] f32
// (out unchecked when out_name is null: the fused activation checks its own output).
void check_gemm(const Tensor& act, const Tensor& w, const Tensor& out, int64_t num_slots,
                const char* op, const char* act_name, const char* w_name, const char* out_name) {
  const Device d = act.device();
  MOELORA_CHECK(d.is_cuda(), "{}: {} must be on a CUDA device, found {}", op, act_name, d.str());
  check_dtype(act, DType::bf16, act_name);
  check_contiguous(act, act_name);
  check_dtype(w, DType::bf16, w_name);
  check_device(w, d, w_name);
  check_contiguous(w, w_name);
  if (out_name) {
    check_dtype(out, DType::f32, out_name);
    check_device(out, d, out_name);
    check_contiguous(out, out_name);
  }
  MOELORA_CHECK(act.dim() == 2, "{}: {} must be 2-D, found {}", op, act_name, act.describe());
  MOELORA_CHECK(w.dim() == 3, "{}: {} must be [G, N, K], found {}", op, w_name, w.describe());
  const int64_t K = act.size(1), N = w.size(1);
  MOELORA_CHECK(w.size(2) == K, "{}: {} has K = {} but {} has {} columns", op, w_name, w.size(2),
                act_name, K);
  MOELORA_CHECK(K % 8 == 0 && K > 0,
                "{}: the reduction length (K = {}) must be a positive multiple of 8 (16-byte "
                "rows for cp.async)", op, K);
  if (out_name) check_shape(out, {num_slots, N}, out_name);
  check_aligned_16(act, act_name);
  check_aligned_16(w, w_name);
  MOELORA_CHECK(num_slots <= std::numeric_limits<int32_t>::max() &&
                    N <= std::numeric_limits<int32_t>::max() &&
                    K <= std::numeric_limits<int32_t>::max(),
                "{}: sizes (slots {}, N {}, K {}) must fit in 32 bits", op, num_slots, N, K);
  MOELORA_CHECK((N + 31) / 32 <= 65535, "{}: N = {} needs more than 65535 row tiles", op, N);
  if (out_name == nullptr) check_aligned_16(out, "moe_gemm1_activation a");
}

void run(const MoeGemmArgs& p, int64_t max_blocks, const MoeGemmConfig& cfg,
         const Stream& stream) {
  MOELORA_CHECK(cfg.rows == 32 || cfg.rows == 64 || cfg.rows == 128,
                "expert GEMM tile: rows must be 32, 64 or 128, found {}", cfg.rows);
  MOELORA_CHECK(!cfg.row_tiles_fastest || max_blocks <= 65535,
                "expert GEMM: {} blocks on the grid's y axis, at most 65535", max_blocks);
  if (p.num_slots == 0) return;
  MOELORA_CUDA_CHECK(launch_moe_gemm(p, int(max_blocks), cfg.rows,
                                     static_cast<cudaStream_t>(stream.handle())));
}

}  // namespace

namespace {

// gemm1 into h f32 [M*k, 2I], or with the activation fused into a bf16 [M*k, I] when `fused`.
void gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const Tensor& w13, Tensor& out,
           const Stream& stream, const MoeGemmConfig& cfg, bool fused) {
  const char* op = fused ? "moe_gemm1_activation" : "moe_gemm1";
  MOELORA_CHECK(top_k >= 1, "{}: top_k must be >= 1, found {}", op, top_k);
  MOELORA_CHECK(x.dim() == 2, "{}: x must be [M, H], found {}", op, x.describe());
  const int64_t num_slots = x.size(0) * top_k;
  if (fused) {
    MOELORA_CHECK(w13.dim() == 3 && w13.size(1) % 2 == 0,
                  "{}: w13 must be [G, 2I, H], found {}", op, w13.describe());
    check_dtype(out, DType::bf16, "moe_gemm1_activation a");
    check_device(out, x.device(), "moe_gemm1_activation a");
    check_contiguous(out, "moe_gemm1_activation a");
    check_shape(out, {num_slots, w13.size(1) / 2}, "moe_gemm1_activation a");
  }
  check_gemm(x, w13, out, num_slots, op, "moe_gemm1 x", "moe_gemm1 w13",
             fused ? nullptr : "moe_gemm1 h");
  const int64_t blocks = check_plan(plan, num_slots, w13.size(0), x.device(), op);

  MoeGemmArgs p{};
  p.act = x.data();
  p.w = w13.data();
  p.out = fused ? nullptr : out.data<float>();
  p.act_out = fused ? out.data() : nullptr;
  p.slot_scale = nullptr;
  p.sorted_slots = plan.sorted_slots.data<int32_t>();
  p.block_group = plan.block_group.data<int32_t>();
  p.num_padded = plan.num_padded.data<int32_t>();
  p.num_slots = int(num_slots);
  p.rows_div = top_k;
  p.block_m = plan.block_m;
  p.n = int(w13.size(1));
  p.k = int(w13.size(2));
  p.pdl = cfg.pdl;
  p.plan_ready = cfg.plan_ready;
  p.row_tiles_fastest = cfg.row_tiles_fastest;
  run(p, blocks, cfg, stream);
}

}  // namespace

void moe_gemm1_tiled(const Tensor& x, int top_k, const MoeAlignment& plan, const Tensor& w13,
                     Tensor& h, const Stream& stream, const MoeGemmConfig& cfg) {
  gemm1(x, top_k, plan, w13, h, stream, cfg, false);
}

void moe_gemm1_activation_tiled(const Tensor& x, int top_k, const MoeAlignment& plan,
                                const Tensor& w13, Tensor& a, const Stream& stream,
                                const MoeGemmConfig& cfg) {
  gemm1(x, top_k, plan, w13, a, stream, cfg, true);
}

void moe_gemm2_tiled(const Tensor& a, const MoeAlignment& plan, const Tensor& w2,
                     const Tensor& slot_weights, Tensor& o, const Stream& stream,
                     const MoeGemmConfig& cfg) {
  constexpr const char* op = "moe_gemm2";
  MOELORA_CHECK(a.dim() == 2, "{}: a must be [M*k, I], found {}", op, a.describe());
  const int64_t num_slots = a.size(0);
  check_gemm(a, w2, o, num_slots, op, "moe_gemm2 a", "moe_gemm2 w2", "moe_gemm2 o");
  if (slot_weights.defined()) {
    check_dtype(slot_weights, DType::f32, "moe_gemm2 slot_weights");
    check_device(slot_weights, a.device(), "moe_gemm2 slot_weights");
    check_contiguous(slot_weights, "moe_gemm2 slot_weights");
    check_shape(slot_weights, {num_slots}, "moe_gemm2 slot_weights");
  }
  const int64_t blocks = check_plan(plan, num_slots, w2.size(0), a.device(), op);

  MoeGemmArgs p{};
  p.act = a.data();
  p.w = w2.data();
  p.out = o.data<float>();
  p.slot_scale = slot_weights.defined() ? slot_weights.data<float>() : nullptr;
  p.sorted_slots = plan.sorted_slots.data<int32_t>();
  p.block_group = plan.block_group.data<int32_t>();
  p.num_padded = plan.num_padded.data<int32_t>();
  p.num_slots = int(num_slots);
  p.rows_div = 1;
  p.block_m = plan.block_m;
  p.n = int(w2.size(1));
  p.k = int(w2.size(2));
  p.pdl = cfg.pdl;
  p.plan_ready = cfg.plan_ready;
  p.row_tiles_fastest = cfg.row_tiles_fastest;
  run(p, blocks, cfg, stream);
}

void moe_gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const Tensor& w13,
               Tensor& h, const Stream& stream) {
  const int64_t slots = x.dim() == 2 ? x.size(0) * top_k : 0;
  const int64_t n = w13.dim() == 3 ? w13.size(1) : 0, k = w13.dim() == 3 ? w13.size(2) : 0;
  moe_gemm1_tiled(x, top_k, plan, w13, h, stream,
                  moe_gemm_config(n, k, plan.block_m, slots, plan.num_groups, num_sms()));
}

void moe_gemm1_activation(const Tensor& x, int top_k, const MoeAlignment& plan,
                          const Tensor& w13, Tensor& a, const Stream& stream) {
  const int64_t slots = x.dim() == 2 ? x.size(0) * top_k : 0;
  const int64_t n = w13.dim() == 3 ? w13.size(1) : 0, k = w13.dim() == 3 ? w13.size(2) : 0;
  moe_gemm1_activation_tiled(
      x, top_k, plan, w13, a, stream,
      moe_gemm_config(n, k, plan.block_m, slots, plan.num_groups, num_sms()));
}

void moe_gemm2_plan_ready(const Tensor& a, const MoeAlignment& plan, const Tensor& w2,
                          const Tensor& slot_weights, Tensor& o, const Stream& stream) {
  const int64_t slots = a.dim() == 2 ? a.size(0) : 0;
  const int64_t n = w2.dim() == 3 ? w2.size(1) : 0, k = w2.dim() == 3 ? w2.size(2) : 0;
  MoeGemmConfig cfg = moe_gemm_config(n, k, plan.block_m, slots, plan.num_groups, num_sms());
  cfg.plan_ready = true;
  moe_gemm2_tiled(a, plan, w2, slot_weights, o, stream, cfg);
}

void moe_gemm2(const Tensor& a, const MoeAlignment& plan, const Tensor& w2,
               const Tensor& slot_weights, Tensor& o, const Stream& stream) {
  const int64_t slots = a.dim() == 2 ? a.size(0) : 0;
  const int64_t n = w2.dim() == 3 ? w2.size(1) : 0, k = w2.dim() == 3 ? w2.size(2) : 0;
  moe_gemm2_tiled(a, plan, w2, slot_weights, o, stream,
                  moe_gemm_config(n, k, plan.block_m, slots, plan.num_groups, num_sms()));
}

}  // namespace moelora::cuda
