// The hook path: LoRA on experts as shrink/expand passes at the runner's seams, grouped by
// virtual expert (slot * E + expert) so each (adapter, expert) pair's A and B are read once per
// batch and base tokens cost nothing. This file holds the CPU hooks and the factory; the CUDA
// hooks (same math, arranged for latency) are in moe_lora_hooks_cuda.cpp.
#include "kernels/cpu/moe_ops.h"
#include "moelora/lora/moe_lora.h"

namespace moelora {
namespace {

class CpuLoraHooks final : public MoeLoraHooks {
 public:
  CpuLoraHooks(const MoeLoraPool& pool, int64_t max_tokens) : MoeLoraHooks(pool, max_tokens) {
    const MoeShape& s = pool.shape();
    const Device d = pool.device();
    const int64_t slots = max_tokens * s.top_k;
    vids_ = Tensor::empty({max_tokens, s.top_k}, DType::i32, d);
    vplan_ = MoeAlignment::allocate(slots, pool.num_slots() * s.num_experts, kMaxBlockM, d);
    u13_ = Tensor::empty({slots, 2 * int64_t(pool.r_max())}, DType::f32, d);
    u2_ = Tensor::empty({slots, int64_t(pool.r_max())}, DType::f32, d);
  }

  void after_route(const TopK& topk, int64_t m, const Stream& stream) override {
    Tensor vids = vids_.first_rows(m);
    cpu::moe_lora_group_ids(topk.ids, bound_slots(m), pool_.shape().num_experts, vids, stream);
    vplan_.block_m = cpu::moe_lora_block_m(m, pool_.shape().top_k);
    cpu::moe_align(vids, vplan_, stream);
  }

  void after_gate_up(const Tensor& x, const TopK& topk, Tensor& h, const Stream& stream) override {
    const int k = pool_.shape().top_k;
    Tensor u = u13_.first_rows(topk.ids.size(0) * k);
    cpu::moe_lora_shrink(x, k, vplan_, pool_.a13(), pool_.slot_meta(), LoraSeam::gate_up, u,
                         stream);
    cpu::moe_lora_expand(u, vplan_, pool_.b13(), pool_.slot_meta(), LoraSeam::gate_up, Tensor(),
                         h, stream);
  }

  void after_down(const Tensor& a, const TopK& topk, Tensor& o, const Stream& stream) override {
    const int64_t slots = topk.ids.size(0) * pool_.shape().top_k;
    Tensor u = u2_.first_rows(slots);
    cpu::moe_lora_shrink(a, 1, vplan_, pool_.a2(), pool_.slot_meta(), LoraSeam::down, u, stream);
    cpu::moe_lora_expand(u, vplan_, pool_.b2(), pool_.slot_meta(), LoraSeam::down,
                         topk.weights.view({slots}), o, stream);
  }

 private:
  Tensor vids_, u13_, u2_;
  MoeAlignment vplan_;
};

}  // namespace

MoeLoraHooks::MoeLoraHooks(const MoeLoraPool& pool, int64_t max_tokens)
    : pool_(pool), max_tokens_(max_tokens) {
  MOELORA_CHECK(max_tokens > 0, "MoE LoRA hooks: max_tokens must be > 0, found {}", max_tokens);
}

void MoeLoraHooks::bind(const LoraBatch& batch) {
  check_dtype(batch.token_slot, DType::i32, "LoraBatch token_slot");
  check_device(batch.token_slot, pool_.device(), "LoraBatch token_slot");
  MOELORA_CHECK(batch.token_slot.dim() == 1 && batch.token_slot.size(0) <= max_tokens_,
                "LoraBatch token_slot: expected [M] with M <= {}, found {}", max_tokens_,
                batch.token_slot.describe());
  token_slot_ = batch.token_slot;
}

Tensor MoeLoraHooks::bound_slots(int64_t m) const {
  MOELORA_CHECK(token_slot_.defined(), "MoE LoRA hooks: bind() a LoraBatch before running");
  MOELORA_CHECK(m <= token_slot_.size(0),
                "MoE LoRA hooks: {} tokens in the layer call, the bound batch has {}", m,
                token_slot_.size(0));
  return token_slot_.first_rows(m);
}

#ifdef MOELORA_WITH_CUDA
// The CUDA hook path (moe_lora_hooks_cuda.cpp).
std::unique_ptr<MoeLoraHooks> make_cuda_moe_lora_hooks(const MoeLoraPool& pool, int64_t max_tokens,
                                                       const MoeLoraHooksOptions& options);
#endif

std::unique_ptr<MoeLoraHooks> MoeLoraHooks::create(const MoeLoraPool& pool, int64_t max_tokens,
                                                   const MoeLoraHooksOptions& options) {
  if (pool.device().is_cpu()) return std::make_unique<CpuLoraHooks>(pool, max_tokens);
#ifdef MOELORA_WITH_CUDA
  return make_cuda_moe_lora_hooks(pool, max_tokens, options);
#else
  (void)options;
  MOELORA_THROW("MoE LoRA hooks on {} need CUDA, but moelora was built without it",
                pool.device().str());
#endif
}

void MoeHooks::gate_up_activation(const Tensor&, const TopK&, const Tensor&, Tensor&,
                                  const Stream&) {
  MOELORA_THROW("MoeHooks::gate_up_activation called on hooks that do not fuse the activation");
}

void MoeHooks::down_reduce(const Tensor&, const TopK&, const Tensor&, const Tensor&,
                           const Tensor&, Tensor&, const Stream&) {
  MOELORA_THROW("MoeHooks::down_reduce called on hooks that do not fuse the reduction");
}

}  // namespace moelora
