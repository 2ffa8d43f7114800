// The CUDA hook path for LoRA on experts. Same math as the CPU hooks (shrink/expand grouped by
// virtual expert slot * E + expert), arranged for small-batch latency:
//  - the (adapter, expert) alignment runs in one kernel (virtual ids never materialized) on a
//    side stream, forked at after_route and joined at after_gate_up, so it overlaps the base
//    alignment and gate_up GEMM;
//  - the shrink splits K over several CTAs when few (adapter, expert) blocks exist, writing
//    partial sums that the expand adds up while staging them;
//  - every kernel uses programmatic dependent launch (kernels/cuda/pdl_launch.cuh).
// All buffers, the side stream and its events are created once here: graph-capturable.
#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/lora/moe_lora.h"

namespace moelora {
namespace {

class CudaLoraHooks final : public MoeLoraHooks {
 public:
  CudaLoraHooks(const MoeLoraPool& pool, int64_t max_tokens)
      : pool_(pool), max_tokens_(max_tokens) {
    MOELORA_CHECK(max_tokens > 0, "MoE LoRA hooks: max_tokens must be > 0, found {}", max_tokens);
    const MoeShape& s = pool.shape();
    const Device d = pool.device();
    const int64_t slots = max_tokens * s.top_k, rows = cuda::moe_lora_split_rows(slots);
    vplan_ = MoeAlignment::allocate(slots, pool.num_slots() * s.num_experts, kMaxBlockM, d);
    u13_ = Tensor::empty({rows, 2 * int64_t(pool.r_max())}, DType::f32, d);
    u2_ = Tensor::empty({rows, int64_t(pool.r_max())}, DType::f32, d);
    side_ = Stream::create(d);
    fork_ = Event::create(d, /*timing=*/false);
    join_ = Event::create(d, /*timing=*/false);
  }

  void bind(const LoraBatch& batch) override {
    check_dtype(batch.token_slot, DType::i32, "LoraBatch token_slot");
    check_device(batch.token_slot, pool_.device(), "LoraBatch token_slot");
    MOELORA_CHECK(batch.token_slot.dim() == 1 && batch.token_slot.size(0) <= max_tokens_,
                  "LoraBatch token_slot: expected [M] with M <= {}, found {}", max_tokens_,
                  batch.token_slot.describe());
    token_slot_ = batch.token_slot;
  }

  void after_route(const TopK& topk, int64_t m, const Stream& stream) override {
    MOELORA_CHECK(token_slot_.defined(), "MoE LoRA hooks: bind() a LoraBatch before running");
    MOELORA_CHECK(m <= token_slot_.size(0),
                  "MoE LoRA hooks: {} tokens in the layer call, the bound batch has {}", m,
                  token_slot_.size(0));
    const MoeShape& s = pool_.shape();
    vplan_.block_m = cuda::moe_lora_block_m(m, s.top_k);
    fork_.record(stream);
    side_.wait(fork_);
    cuda::moe_lora_align(topk.ids, token_slot_.first_rows(m), s.num_experts, vplan_, side_);
    join_.record(side_);
    joined_ = false;
  }

  void after_gate_up(const Tensor& x, const TopK& topk, Tensor& h, const Stream& stream) override {
    join(stream);
    const int k = pool_.shape().top_k;
    const int64_t n = topk.ids.size(0) * k;
    const int splits = cuda::moe_lora_shrink_splits(n);
    Tensor u = u13_.first_rows(splits * n);
    cuda::moe_lora_shrink_split(x, k, vplan_, pool_.a13(), pool_.slot_meta(), LoraSeam::gate_up,
                                splits, u, stream);
    cuda::moe_lora_expand_split(u, splits, vplan_, pool_.b13(), pool_.slot_meta(),
                                LoraSeam::gate_up, Tensor(), h, stream);
  }

  void after_down(const Tensor& a, const TopK& topk, Tensor& o, const Stream& stream) override {
    join(stream);
    const int64_t n = topk.ids.size(0) * pool_.shape().top_k;
    const int splits = cuda::moe_lora_shrink_splits(n);
    Tensor u = u2_.first_rows(splits * n);
    cuda::moe_lora_shrink_split(a, 1, vplan_, pool_.a2(), pool_.slot_meta(), LoraSeam::down,
                                splits, u, stream);
    cuda::moe_lora_expand_split(u, splits, vplan_, pool_.b2(), pool_.slot_meta(), LoraSeam::down,
                                topk.weights.view({n}), o, stream);
  }

 private:
  // The main stream waits once for the side-stream alignment (also ends the fork in a capture).
  void join(const Stream& stream) {
    if (joined_) return;
    stream.wait(join_);
    joined_ = true;
  }

  const MoeLoraPool& pool_;
  int64_t max_tokens_;
  Tensor token_slot_;
  Tensor u13_, u2_;
  MoeAlignment vplan_;
  Stream side_;
  Event fork_, join_;
  bool joined_ = true;
};

}  // namespace

std::unique_ptr<MoeLoraHooks> make_cuda_moe_lora_hooks(const MoeLoraPool& pool,
                                                       int64_t max_tokens) {
  return std::make_unique<CudaLoraHooks>(pool, max_tokens);
}

}  // namespace moelora
