// Expert GEMM ops on CUDA (layer 3 of 3): validate Tensors, throw moelora::Error naming the
// tensor, then call the launcher (moe_gemm.cu). Contracts: kernels/moe_ops.inc.
#include <cstdint>
#include <limits>
#include <utility>

#include "core/cuda_check.h"
#include "kernels/cuda/moe_gemm_config.h"
#include "kernels/cuda/moe_gemm_launch.h"
#include "kernels/cuda/moe_lora_epilogue.h"
#include "kernels/cuda/moe_op_checks.h"
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

// Validates the LoRA epilogue's operands for a GEMM of `num_slots` slots of top_k per token
// over weights w [G, N, K] and packs them into p.lora.
void set_lora(MoeGemmArgs& p, const MoeGemmLora& l, int64_t num_slots, int top_k,
              const Tensor& w, bool gate_up, const char* op) {
  MOELORA_CHECK(top_k >= 1 && num_slots % top_k == 0,
                "{}: {} slots are not whole tokens of top_k = {}", op, num_slots, top_k);
  const int64_t m = num_slots / top_k, G = w.size(0), N = w.size(1);
  check_cuda_tensor(l.token_slot, DType::i32, "LoRA epilogue token_slot");
  check_shape(l.token_slot, {m}, "LoRA epilogue token_slot");
  check_cuda_tensor(l.b, DType::bf16, "LoRA epilogue B");
  MOELORA_CHECK(l.b.dim() == 4 && l.b.size(1) == G && l.b.size(2) == N,
                "{}: LoRA B must be [S, E={}, N={}, r_max] (the weights' experts and rows), "
                "found {}", op, G, N, l.b.describe());
  const int64_t S = l.b.size(0), r_max = l.b.size(3);
  MOELORA_CHECK(r_max >= 8 && r_max % 8 == 0,
                "{}: LoRA B's r_max must be a positive multiple of 8 (16-byte rows), found {}",
                op, r_max);
  check_aligned_16(l.b, "LoRA epilogue B");
  check_cuda_tensor(l.meta, DType::i32, "LoRA epilogue slot meta");
  check_shape(l.meta, {S, 6}, "LoRA epilogue slot meta");
  MOELORA_CHECK(l.splits >= 1 && l.splits <= kMaxLoraEpilogueSplits,
                "{}: LoRA splits must be in [1, {}], found {}", op, kMaxLoraEpilogueSplits,
                l.splits);
  check_cuda_tensor(l.u, DType::f32, "LoRA epilogue u");
  const int64_t need = gate_up ? 2 * r_max : r_max;
  MOELORA_CHECK(l.u.dim() == 2 && l.u.size(0) == l.splits * num_slots && l.u.size(1) >= need,
                "{}: LoRA u must be [{} splits * {} slots, >= {}], found {}", op, l.splits,
                num_slots, need, l.u.describe());
  MOELORA_CHECK(l.u.size(1) % 4 == 0, "{}: LoRA u rows must hold a multiple of 4 floats "
                "(16-byte loads), found {}", op, l.u.describe());
  check_aligned_16(l.u, "LoRA epilogue u");
  for (const Tensor* t : {&l.token_slot, &l.b, &l.meta, &l.u})
    check_device(*t, w.device(), "LoRA epilogue operand");
  MOELORA_CHECK(S <= std::numeric_limits<int32_t>::max() && l.u.size(1) <= 4096,
                "{}: LoRA pool of {} slots / u width {} out of range", op, S, l.u.size(1));
  MoeGemmLoraArgs& a = p.lora;
  a.token_slot = l.token_slot.data<int32_t>();
  a.top_k = top_k;
  a.num_adapters = int(S);
  a.u = l.u.data<float>();
  a.ldu = int(l.u.size(1));
  a.splits = l.splits;
  a.split_stride = num_slots * l.u.size(1);
  a.b = l.b.data();
  a.num_experts = int(G);
  a.r_max = int(r_max);
  a.meta = l.meta.data<int32_t>();
  a.gate_up = gate_up;
}

void run(const MoeGemmArgs& p, int64_t max_blocks, const MoeGemmConfig& cfg,
         const Stream& stream) {
  MOELORA_CHECK(cfg.rows == 32 || cfg.rows == 64 || cfg.rows == 128,
                "expert GEMM tile: rows must be 32, 64 or 128, found {}", cfg.rows);
  if (p.lora.token_slot) {
    const int bytes = moe_gemm_smem_bytes(p, cfg.rows);
    MOELORA_CHECK(bytes > 0 && bytes <= 227 * 1024,
                  "expert GEMM with LoRA: a {}-token tile of {} rows with u {} floats wide needs "
                  "{} bytes of shared memory, more than the 227 KB a block may have",
                  p.block_m, cfg.rows, p.lora.ldu, bytes);
  }
  MOELORA_CHECK(!cfg.row_tiles_fastest || max_blocks <= 65535,
                "expert GEMM: {} blocks on the grid's y axis, at most 65535", max_blocks);
  if (p.num_slots == 0) return;
  MOELORA_CUDA_CHECK(launch_moe_gemm(p, int(max_blocks), cfg.rows,
                                     static_cast<cudaStream_t>(stream.handle())));
}

}  // namespace

namespace {

// gemm1 into h f32 [M*k, 2I], or with the activation fused into a bf16 [M*k, I] when `fused`;
// with the LoRA epilogue when `lora` is set.
void gemm1(const Tensor& x, int top_k, const MoeAlignment& plan, const Tensor& w13, Tensor& out,
           const Stream& stream, const MoeGemmConfig& cfg, bool fused,
           const MoeGemmLora* lora = nullptr) {
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
  if (lora) {
    MOELORA_CHECK(p.n % 2 == 0, "{}: gate_up LoRA needs an even w13 row count, found {}", op,
                  p.n);
    set_lora(p, *lora, num_slots, top_k, w13, /*gate_up=*/true, op);
  }
  run(p, blocks, cfg, stream);
}

// gemm2 (o = scale * a . w2^T), with the LoRA epilogue when `lora` is set.
void gemm2(const Tensor& a, int top_k, const MoeAlignment& plan, const Tensor& w2,
           const Tensor& slot_weights, Tensor& o, const Stream& stream, const MoeGemmConfig& cfg,
           const MoeGemmLora* lora) {
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
  if (lora) set_lora(p, *lora, num_slots, top_k, w2, /*gate_up=*/false, op);
  run(p, blocks, cfg, stream);
}

MoeGemmConfig heuristic_config(const Tensor& act, int64_t slots, const Tensor& w,
                               const MoeAlignment& plan) {
  const int64_t n = w.dim() == 3 ? w.size(1) : 0, k = w.dim() == 3 ? w.size(2) : 0;
  (void)act;
  return moe_gemm_config(n, k, plan.block_m, slots, plan.num_groups, num_sms());
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
  gemm2(a, 1, plan, w2, slot_weights, o, stream, cfg, nullptr);
}

void moe_gemm1_activation_lora(const Tensor& x, int top_k, const MoeAlignment& plan,
                               const Tensor& w13, const MoeGemmLora& lora, Tensor& a,
                               const Stream& stream) {
  const int64_t slots = x.dim() == 2 ? x.size(0) * top_k : 0;
  gemm1(x, top_k, plan, w13, a, stream, heuristic_config(x, slots, w13, plan), true, &lora);
}

void moe_gemm1_activation_lora_tiled(const Tensor& x, int top_k, const MoeAlignment& plan,
                                     const Tensor& w13, const MoeGemmLora& lora, Tensor& a,
                                     const Stream& stream, const MoeGemmConfig& cfg) {
  gemm1(x, top_k, plan, w13, a, stream, cfg, true, &lora);
}

void moe_gemm1_lora_tiled(const Tensor& x, int top_k, const MoeAlignment& plan,
                          const Tensor& w13, const MoeGemmLora& lora, Tensor& h,
                          const Stream& stream, const MoeGemmConfig& cfg) {
  gemm1(x, top_k, plan, w13, h, stream, cfg, false, &lora);
}

void moe_gemm2_lora(const Tensor& a, int top_k, const MoeAlignment& plan, const Tensor& w2,
                    const Tensor& slot_weights, const MoeGemmLora& lora, Tensor& o,
                    const Stream& stream, bool plan_ready) {
  const int64_t slots = a.dim() == 2 ? a.size(0) : 0;
  MoeGemmConfig cfg = heuristic_config(a, slots, w2, plan);
  cfg.plan_ready = plan_ready;
  gemm2(a, top_k, plan, w2, slot_weights, o, stream, cfg, &lora);
}

void moe_gemm2_lora_tiled(const Tensor& a, int top_k, const MoeAlignment& plan,
                          const Tensor& w2, const Tensor& slot_weights, const MoeGemmLora& lora,
                          Tensor& o, const Stream& stream, const MoeGemmConfig& cfg) {
  gemm2(a, top_k, plan, w2, slot_weights, o, stream, cfg, &lora);
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
