// The seam between the MoE runner and the code that runs each stage on one device for one
// weight format. Backends know nothing of LoRA: the runner calls LoRA hooks between stages.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "moelora/core/stream.h"
#include "moelora/moe/lora_inline.h"
#include "moelora/moe/types.h"

namespace moelora {

// What a caller wants run; backends say whether they can.
struct MoeProblem {
  MoeShape shape;
  WeightFormat format = WeightFormat::bf16;
  DType act_dtype = DType::bf16;
  Device device;
  int64_t max_tokens = 0;
};

class MoeBackend {
 public:
  virtual ~MoeBackend() = default;
  virtual std::string_view name() const = 0;
  virtual Device device() const = 0;
  // False with the reason in `why` when this backend cannot run `p`.
  virtual bool supports(const MoeProblem& p, std::string* why) const = 0;
  // Called once on the backend the registry hands out for `p` (after supports(p)): the place to
  // allocate persistent workspaces sized for p.max_tokens, so that the stages never allocate
  // (graph capture). Default: nothing.
  virtual void prepare(const MoeProblem& p) { (void)p; }
  // True when the backend applies LoRA itself (fused epilogue / side stream); later issues.
  virtual bool fuses_lora() const { return false; }
  // Alignment tile (tokens per block) for a batch of `num_tokens`.
  virtual int block_m(int64_t num_tokens, const MoeShape& shape) const = 0;

  // --- stages; `m` = tokens in this call; all outputs pre-allocated by the caller ---
  // topk.ids / topk.weights [M, k] from logits f32 [M, E].
  virtual void route(const Tensor& logits, const Tensor& correction_bias, const RouterConfig& cfg,
                     TopK& topk, const Stream& stream) = 0;
  // Groups the slots of `group_ids` (i32 [M, k], -1 skipped) by id into `plan`.
  virtual void align(const Tensor& group_ids, MoeAlignment& plan, const Stream& stream) = 0;
  // Optional fused capability: route, then align topk.ids into `plan` (plan.block_m set by the
  // caller), with exactly the results of the two stages. The runner uses it when no hook needs
  // the routing before the alignment. Default: the two stages.
  virtual void route_align(const Tensor& logits, const Tensor& correction_bias,
                           const RouterConfig& cfg, TopK& topk, MoeAlignment& plan,
                           const Stream& stream) {
    route(logits, correction_bias, cfg, topk, stream);
    align(topk.ids, plan, stream);
  }
  // h f32 [M*k, 2I] = x[slot / k] . w13[group]^T for every aligned slot (other rows untouched).
  // Weight stacks are in the backend's format (see MoeProblem::format).
  virtual void gemm1(const Tensor& x, int top_k, const MoeAlignment& plan,
                     const ExpertMatrices& w13, Tensor& h, const Stream& stream) = 0;
  // Optional capability (the fast decode path's inline LoRA, moelora/moe/lora_inline.h):
  // gemm1 / gemm2 whose grid also computes `lora`'s delta into lora.delta, with h / o exactly
  // as gemm1 / gemm2 write them. The runner calls them only when runs_inline_lora() is true.
  virtual bool runs_inline_lora() const { return false; }
  virtual void gemm1_lora(const Tensor& x, int top_k, const MoeAlignment& plan,
                          const ExpertMatrices& w13, const MoeLoraInline& lora, Tensor& h,
                          const Stream& stream);
  virtual void gemm2_lora(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                          const Tensor& slot_weights, const MoeLoraInline& lora, Tensor& o,
                          const Stream& stream);
  // a bf16 [M*k, I] = silu(h[:, :I]) * h[:, I:] for slots with ids >= 0.
  virtual void activation(const Tensor& h, const Tensor& ids, Tensor& a, const Stream& stream) = 0;
  // o f32 [M*k, H] = slot_weight[slot] * (a[slot] . w2[group]^T) for every aligned slot.
  // An undefined `slot_weights` means weight 1.
  virtual void gemm2(const Tensor& a, const MoeAlignment& plan, const ExpertMatrices& w2,
                     const Tensor& slot_weights, Tensor& o, const Stream& stream) = 0;
  // Optional fused capability: the expert MLP with no LoRA seam, o = gemm2(activation(gemm1(x)))
  // with `ids` (i32 [M, k]) for the activation. The runner uses it when there are no hooks.
  // h and a are scratch (a backend may leave h unwritten). Must give exactly the o of the three
  // stages, bit for bit: a LoRA batch's base tokens take the staged path and must match a
  // LoRA-off run. Default: the three stages.
  virtual void expert_mlp(const Tensor& x, int top_k, const Tensor& ids, const MoeAlignment& plan,
                          const ExpertMatrices& w13, const ExpertMatrices& w2,
                          const Tensor& slot_weights, Tensor& h, Tensor& a, Tensor& o,
                          const Stream& stream) {
    gemm1(x, top_k, plan, w13, h, stream);
    activation(h, ids, a, stream);
    gemm2(a, plan, w2, slot_weights, o, stream);
  }
  // Optional fused capability for decode-sized batches with no hooks: the whole layer, routing
  // and shared expert included, y = reduce(expert_mlp(route_align(...)) + shared), in as few
  // launches as the backend can. Writes topk as route would (nothing else of the staged path:
  // no plan, h, a or o). Must give exactly the y and topk of the stages, bit for bit (a LoRA
  // batch's base tokens take the staged path and must match a LoRA-off run). Returns false,
  // having enqueued nothing, when it does not handle this call; the runner then runs the stages.
  virtual bool small_batch_layer(const MoeInputs& in, const MoeWeights& w, const MoeShape& shape,
                                 const RouterConfig& router, TopK& topk, Tensor& y,
                                 const Stream& stream) {
    (void)in, (void)w, (void)shape, (void)router, (void)topk, (void)y, (void)stream;
    return false;
  }
  // y bf16 [M, H] = sum_j o[t*k+j] over ids[t, j] >= 0, plus gate(t) * shared_o[t] when
  // shared_o is defined (gate = sigmoid(shared_gate_logits[t]) when those are defined, else 1).
  virtual void reduce(const Tensor& o, const Tensor& ids, const Tensor& shared_o,
                      const Tensor& shared_gate_logits, Tensor& y, const Stream& stream) = 0;
};

using MoeBackendFactory = std::function<std::unique_ptr<MoeBackend>(Device)>;

struct MoeBackendInfo {
  std::string name;
  Device::Kind device_kind;
  int priority;  // higher wins when picking by capability
};

// Registers a backend under a unique name. Built-in backends register themselves on first
// use of the registry.
void register_moe_backend(MoeBackendInfo info, MoeBackendFactory factory);
std::vector<MoeBackendInfo> moe_backends();
// By name; throws listing the known names when `name` is unknown or cannot run `p`.
std::unique_ptr<MoeBackend> make_moe_backend(std::string_view name, const MoeProblem& p);
// The highest-priority backend for p.device that supports `p`; throws with every candidate's
// reason when none does.
std::unique_ptr<MoeBackend> pick_moe_backend(const MoeProblem& p);

}  // namespace moelora
