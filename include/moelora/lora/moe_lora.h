// LoRA on MoE experts: host-side adapter weights, the device slot pool with stable addresses,
// the per-batch token->slot map, and the hooks the MoE runner calls at its two seams.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"
#include "moelora/moe/lora_inline.h"
#include "moelora/moe/types.h"

namespace moelora {

// One adapter's LoRA for one MoE layer, as PEFT defines it (scale not folded yet):
// delta W = scale * B . A. Host tensors, f32 or bf16. Any subset of gate/up/down may be set.
// The gate_up projection comes in one of two shapes seen in the wild:
//  - separate: gate_a [E, r_g, H], gate_b [E, I, r_g], up_a [E, r_u, H], up_b [E, I, r_u]
//    (per-expert PEFT keys `experts.E.gate_proj` / `up_proj`; Mixtral w1 / w3);
//  - fused: gate_up_a [E, r, H] shared by all 2I rows, gate_up_b [E, 2I, r] (peft 0.21 on the
//    3D `gate_up_proj` parameter of transformers 5).
// down: down_a [E, r_d, I], down_b [E, H, r_d].
struct MoeLoraWeights {
  Tensor gate_a, gate_b, up_a, up_b;
  Tensor gate_up_a, gate_up_b;
  Tensor down_a, down_b;
  float gate_scale = 1.0f, up_scale = 1.0f, gate_up_scale = 1.0f, down_scale = 1.0f;

  bool has_gate_up_fused() const { return gate_up_a.defined(); }
};

// PEFT scaling: alpha / r, or alpha / sqrt(r) with rsLoRA.
float lora_scaling(float alpha, int rank, bool use_rslora);

// Splits peft's LoRA on a 3D expert parameter (`target_parameters` on experts.gate_up_proj /
// experts.down_proj, as peft 0.21 saves for transformers 5 MoE models) into per-expert
// matrices. lora_A [E*r, in] is expert-major: rows e*r .. e*r+r-1 are expert e's A.
// lora_B [out, E*r] is rank-major: column j*E + e is column j of expert e's B.
// (Verified against peft 0.21's own forward by scripts/golden/make_moe_block_goldens.py.)
// Returns f32 host tensors A [E, r, in] and B [E, out, r]; errors name `what`.
std::pair<Tensor, Tensor> split_peft_expert_lora(const Tensor& lora_a, const Tensor& lora_b,
                                                 int num_experts, const std::string& what);

// Where a slot's gate_up LoRA lives in the pool's shrink output u = A13 . x (per slot):
// gate rows read u[gate_col, gate_col + gate_rank), up rows u[up_col, up_col + up_rank).
// Fused adapters have gate_col == up_col == 0 and shrink_rank == r; separate ones stack
// A_gate over A_up, so shrink_rank = r_g + r_u. Ranks of 0 mean "not targeted".
struct MoeLoraSlotMeta {
  int32_t shrink_rank = 0;
  int32_t gate_rank = 0, gate_col = 0;
  int32_t up_rank = 0, up_col = 0;
  int32_t down_rank = 0;
};
static_assert(sizeof(MoeLoraSlotMeta) == 6 * sizeof(int32_t));

// Device slots for one MoE layer. Addresses never move: a captured graph stays valid when a
// different adapter is loaded into a slot. Scale is folded into B on load.
class MoeLoraPool {
 public:
  MoeLoraPool(const MoeShape& shape, int num_slots, int r_max, Device device);

  // Validates shapes against the pool (naming the tensor, expected vs found), converts to bf16,
  // folds scales into B, zero-pads to r_max and copies into `slot`.
  void load(int slot, const MoeLoraWeights& w, const Stream* stream = nullptr);
  void unload(int slot);

  const MoeShape& shape() const { return shape_; }
  int num_slots() const { return num_slots_; }
  int r_max() const { return r_max_; }
  Device device() const { return device_; }
  const MoeLoraSlotMeta& meta(int slot) const;
  bool loaded(int slot) const;

  // Device tensors (bf16 unless noted):
  const Tensor& a13() const { return a13_; }  // [S, E, 2*r_max, H] shrink rows
  const Tensor& b13() const { return b13_; }  // [S, E, 2I, r_max] row i uses its half's rank
  const Tensor& a2() const { return a2_; }    // [S, E, r_max, I]
  const Tensor& b2() const { return b2_; }    // [S, E, H, r_max]
  const Tensor& slot_meta() const { return meta_dev_; }  // i32 [S, 6], MoeLoraSlotMeta

 private:
  MoeShape shape_;
  int num_slots_, r_max_;
  Device device_;
  Tensor a13_, b13_, a2_, b2_, meta_dev_;
  std::vector<MoeLoraSlotMeta> meta_;
  std::vector<bool> loaded_;
};

// The batch's adapter choice per token: token_slot i32 [M] on the pool's device, -1 = base.
struct LoraBatch {
  Tensor token_slot;
};

// Called by MoeRunner at its two seams. One object per (layer, device), built once with its
// workspace; bind() per batch; the rest per layer call, allocation-free.
class MoeHooks {
 public:
  virtual ~MoeHooks() = default;
  // After routing: lets the hooks group token-slots (e.g. by (adapter, expert)).
  virtual void after_route(const TopK& topk, int64_t num_tokens, const Stream& stream) = 0;
  // Before the gate_up GEMM: x bf16 [M, H] is final, so work that reads only x (the LoRA
  // shrink) may start here, e.g. on a side stream overlapping the GEMM. Optional.
  virtual void before_gate_up(const Tensor& x, const TopK& topk, const Stream& stream) {
    (void)x, (void)topk, (void)stream;
  }
  // h f32 [M*k, 2I] += LoRA delta of gate_up, computed from x bf16 [M, H].
  virtual void after_gate_up(const Tensor& x, const TopK& topk, Tensor& h,
                             const Stream& stream) = 0;
  // Before the down GEMM: a bf16 [M*k, I] (the activation) is final. Optional, as above.
  virtual void before_down(const Tensor& a, const TopK& topk, const Stream& stream) {
    (void)a, (void)topk, (void)stream;
  }
  // o f32 [M*k, H] += routed_weight * LoRA delta of down, computed from a bf16 [M*k, I].
  virtual void after_down(const Tensor& a, const TopK& topk, Tensor& o, const Stream& stream) = 0;

  // Optional fused seams (the fast path for decode-sized batches). When fuses_activation(m)
  // is true for a batch of m tokens, the runner calls gate_up_activation instead of
  // after_gate_up + the backend's activation: the hooks write a bf16 [M*k, I] =
  // silu(gate + delta) * (up + delta) themselves from the base h. Likewise fuses_reduce(m):
  // down_reduce replaces after_down + the backend's reduce (y = sum over top-k of
  // o + w * delta, plus the shared expert). Base tokens must come out bit-identical to the
  // staged seams. Defaults: not fused.
  virtual bool fuses_activation(int64_t m) const {
    (void)m;
    return false;
  }
  // Optional inline seams (the fast decode path on backends that run LoRA CTAs inside their
  // expert GEMM grids, MoeBackend::runs_inline_lora). Asked once per layer call, before
  // routing; a non-null result means the runner, for this call, skips after_route and the
  // before_* / after_* seams, runs gemm1_lora / gemm2_lora with these seams (the hooks fill
  // the deltas' inputs, token map and routed weights from `topk`, the call's routing views),
  // then gate_up_activation and down_reduce, which must add the deltas (so fuses_activation(m)
  // and fuses_reduce(m) must be true). Default: never.
  virtual const MoeLoraInlineSeams* inline_lora(const TopK& topk, int64_t m) {
    (void)topk, (void)m;
    return nullptr;
  }
  virtual bool fuses_reduce(int64_t m) const {
    (void)m;
    return false;
  }
  virtual void gate_up_activation(const Tensor& x, const TopK& topk, const Tensor& h, Tensor& a,
                                  const Stream& stream);
  virtual void down_reduce(const Tensor& a, const TopK& topk, const Tensor& o,
                           const Tensor& shared_o, const Tensor& shared_gate_logits, Tensor& y,
                           const Stream& stream);
};

// Settings of the hook path (explicit, never from the environment).
struct MoeLoraHooksOptions {
  // CUDA: batches of up to this many token-slots (M*k) expand on the side stream into a delta
  // buffer that the main stream adds, instead of expanding on the main stream. 0 = off (it
  // measured slower on H100 in session 1; kept selectable for re-measurement).
  int64_t delta_max_slots = 0;
  // CUDA: batches of up to this many tokens fold the LoRA expands into the activation and the
  // top-k reduction (MoeHooks::fuses_activation / fuses_reduce) instead of running the expand
  // kernels. 0 = off: the staged hook path, byte for byte as before. Needs r_max % 8 == 0 and
  // r_max <= 256.
  int64_t fused_max_tokens = 0;
  // CUDA: batches of up to this many tokens compute both LoRA deltas on the side stream beside
  // the expert GEMMs (shrink + expand into delta buffers) and add them inside the activation
  // and the top-k reduction, so no LoRA kernel runs on the critical path. Takes precedence
  // over fused_max_tokens. 0 = off. Needs the delta expand's shapes
  // (cuda::moe_lora_delta_supported: H and I multiples of 4, r_max % 8 == 0).
  int64_t overlap_max_tokens = 0;
  // CUDA: batches of up to this many tokens compute each seam's LoRA delta with one kernel on
  // the side stream, straight from the routing (no (adapter, expert) alignment, no shrink /
  // expand pair: cuda::moe_lora_direct), and add it inside the activation and the top-k
  // reduction as the overlap variant does. Takes precedence over overlap_max_tokens and
  // fused_max_tokens. 0 = off. Needs H and I multiples of 8, r_max % 8 == 0, and the batch's
  // routing in one CTA's shared memory (cuda::moe_lora_direct_unsupported says why not).
  int64_t direct_max_tokens = 0;
  // Batches of m tokens with direct_gap_min <= m <= direct_gap_max do not take the direct
  // variant (the next one that applies runs them): the measured best can alternate with the
  // batch size (decode_hook_options). Empty by default (min > max).
  int64_t direct_gap_min = 1;
  int64_t direct_gap_max = 0;
  // CTAs per (adapter, expert) pair in the direct variant's clusters: 1 (a plain CTA, no
  // cluster), 2, 4 or 8; 0 = by batch size (4 for one token, where a
  // pair's K needs splitting to fill the GPU, else 1; measured on the H100, session 8).
  int direct_cluster_size = 0;
  // When the pool cannot run the direct kernel: true = error at creation (an explicit
  // request), false = those batches take the next variant that applies (the default
  // variant choice, decode_hook_options, asks this way).
  bool direct_strict = true;
  // CUDA, on backends that run inline LoRA (MoeBackend::runs_inline_lora): batches of up to
  // this many tokens compute both deltas in extra CTAs of the expert GEMM grids themselves
  // (no side stream, no LoRA alignment) and add them inside the activation and the reduction
  // as the overlap variant does. Takes precedence over the two above. 0 = off. Same shape
  // needs as overlap_max_tokens.
  int64_t inline_max_tokens = 0;
  // Column slices per (plan block, half) the inline LoRA CTAs split a seam's outputs into
  // (each slice recomputes the block's shrink; more CTAs in flight at tiny batches).
  int inline_column_splits = 1;
  // K slices of the inline shrink (each CTA's partial delta in its own buffer, summed in order
  // by the activation / reduction). 0 = by batch size: enough CTAs for ~2 per SM while the
  // batch touches few experts, 1 once it touches many (moe_lora_hooks_cuda.cpp).
  int inline_k_splits = 0;
  // CUDA: the priority of the side stream the staged / overlap variants fork their LoRA work
  // onto (StreamPriority::high: its CTAs take SM room before the expert GEMM's pending ones).
  StreamPriority side_stream_priority = StreamPriority::normal;
};

// LoRA hooks over `pool` for batches of up to `max_tokens`, on the pool's device.
class MoeLoraHooks : public MoeHooks {
 public:
  // `pool` must outlive the hooks.
  static std::unique_ptr<MoeLoraHooks> create(const MoeLoraPool& pool, int64_t max_tokens,
                                              const MoeLoraHooksOptions& options = {});
  // Binds the batch's token->slot map (kept by reference-counted handle; contents may change
  // between calls, which is how graph replays see a new mix). Checks dtype, device and size.
  void bind(const LoraBatch& batch);

 protected:
  MoeLoraHooks(const MoeLoraPool& pool, int64_t max_tokens);
  // The bound token->slot map's first m entries; throws when none is bound or it is shorter.
  Tensor bound_slots(int64_t m) const;

  const MoeLoraPool& pool_;
  const int64_t max_tokens_;

 private:
  Tensor token_slot_;
};

}  // namespace moelora
