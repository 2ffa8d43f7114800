// The CUDA hook path for LoRA on experts. Same math as the CPU hooks (shrink/expand grouped by
// virtual expert slot * E + expert), arranged so that only the adds of the LoRA deltas sit on
// the critical path:
//  - one side stream, forked at after_route, runs the (adapter, expert) alignment (one kernel,
//    virtual ids never materialized) and, from before_gate_up, the gate_up shrink, overlapping
//    the base alignment and gate_up GEMM; forked again at before_down for the down shrink,
//    overlapping the down GEMM. after_gate_up / after_down join it.
//  - the expands run on the main stream straight into h / o. (A "delta" variant, where the
//    side stream also expands into a buffer and the main stream only adds its rows, measured
//    slower at every batch on the H100 (bench/NOTES.md); it stays selectable for up to
//    MoeLoraHooksOptions::delta_max_slots token-slots, default 0 = off, to re-measure.)
//  - MoeLoraHooksOptions::overlap_max_tokens (the fast decode path's candidate): the side
//    stream also expands both deltas into buffers, beside the expert GEMMs, and the main stream
//    adds them inside the activation and the top-k reduction (no LoRA kernel on the critical
//    path, unlike the delta variant's separate adds).
//  - MoeLoraHooksOptions::direct_max_tokens: as overlap, but each seam's delta is one kernel
//    reading the routing directly (cuda::moe_lora_direct: no LoRA alignment, no u buffer), so
//    the side chain is one launch per seam instead of align + shrink + expand.
//  - MoeLoraHooksOptions::inline_max_tokens (on backends that run inline LoRA): no side stream
//    and no LoRA alignment at all; the backend's expert GEMM grids carry extra CTAs that
//    compute both deltas from the base plan (moelora/moe/lora_inline.h), added inside the
//    activation and the reduction as in the overlap variant.
//  - the shrink splits K over several CTAs when few (adapter, expert) blocks exist; the expand
//    adds the partial sums while staging them.
//  - every kernel uses programmatic dependent launch (kernels/cuda/pdl_launch.cuh).
// If a runner does not call before_gate_up / before_down, the after_* seams issue that work
// themselves (same results). All buffers, the side stream and its events are created once
// here: allocation-free per call and graph-capturable.
#include <algorithm>
#include <string>

#include "kernels/cuda/moe_fused_ops.h"
#include "kernels/cuda/moe_lora_inline_ops.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/lora/moe_lora.h"

namespace moelora {
namespace {

class CudaLoraHooks final : public MoeLoraHooks {
 public:
  CudaLoraHooks(const MoeLoraPool& pool, int64_t max_tokens, const MoeLoraHooksOptions& options)
      : MoeLoraHooks(pool, max_tokens),
        fused_max_tokens_(std::max<int64_t>(0, options.fused_max_tokens)),
        overlap_max_tokens_(std::max<int64_t>(0, options.overlap_max_tokens)),
        inline_max_tokens_(std::max<int64_t>(0, options.inline_max_tokens)),
        direct_max_tokens_(std::max<int64_t>(0, options.direct_max_tokens)),
        direct_gap_min_(options.direct_gap_min),
        direct_gap_max_(options.direct_gap_max),
        direct_cluster_size_(options.direct_cluster_size),
        inline_k_splits_(options.inline_k_splits),
        inline_column_splits_(options.inline_column_splits) {
    MOELORA_CHECK(fused_max_tokens_ == 0 || (pool.r_max() % 8 == 0 && pool.r_max() <= 256),
                  "MoE LoRA hooks: the fused path needs r_max a multiple of 8 and <= 256, the "
                  "pool has r_max {}",
                  pool.r_max());
    const MoeShape& s = pool.shape();
    const Device d = pool.device();
    const int64_t slots = max_tokens * s.top_k, rows = cuda::moe_lora_split_rows(slots);
    vplan_ = MoeAlignment::allocate(slots, pool.num_slots() * s.num_experts, kMaxBlockM, d);
    u13_ = Tensor::empty({rows, 2 * int64_t(pool.r_max())}, DType::f32, d);
    u2_ = Tensor::empty({rows, int64_t(pool.r_max())}, DType::f32, d);
    const bool delta_ok = cuda::moe_lora_delta_supported(s.hidden, s.inter, pool.r_max());
    MOELORA_CHECK((overlap_max_tokens_ == 0 && inline_max_tokens_ == 0) || delta_ok,
                  "MoE LoRA hooks: the overlap and inline paths need hidden and intermediate "
                  "sizes that are multiples of 4 and r_max a multiple of 8, found H {}, I {}, "
                  "r_max {}",
                  s.hidden, s.inter, pool.r_max());
    MOELORA_CHECK(options.inline_column_splits >= 1 && options.inline_column_splits <= 64,
                  "MoE LoRA hooks: inline_column_splits must be in [1, 64], found {}",
                  options.inline_column_splits);
    MOELORA_CHECK(options.inline_k_splits >= 0 && options.inline_k_splits <= 16,
                  "MoE LoRA hooks: inline_k_splits must be in [0, 16] (0 = by batch size), "
                  "found {}",
                  options.inline_k_splits);
    if (direct_max_tokens_ > 0) {
      const std::string why = cuda::moe_lora_direct_unsupported(
          s.hidden, s.inter, s.num_experts, pool.num_slots(), pool.r_max(),
          std::min(max_tokens, direct_max_tokens_) * s.top_k);
      MOELORA_CHECK(why.empty() || !options.direct_strict,
                    "MoE LoRA hooks: the direct path cannot run this pool: {}", why);
      if (!why.empty()) direct_max_tokens_ = 0;
      MOELORA_CHECK(direct_cluster_size_ == 0 || direct_cluster_size_ == 1 ||
                        direct_cluster_size_ == 2 || direct_cluster_size_ == 4 ||
                        direct_cluster_size_ == 8,
                    "MoE LoRA hooks: direct_cluster_size must be 0 (by batch size), 1, 2, 4 or "
                    "8, found {}",
                    direct_cluster_size_);
    }
    if ((inline_max_tokens_ > 0 || direct_max_tokens_ > 0) && d.is_cuda())
      sms_ = cuda::current_sm_count();
    if (delta_ok) {
      delta_rows_ = std::min(slots, std::max<int64_t>(0, options.delta_max_slots));
      int64_t rows13 = std::max(
          delta_rows_,
          std::min(max_tokens, std::max(overlap_max_tokens_, direct_max_tokens_)) * s.top_k);
      int64_t rows2 = rows13;
      // The inline variant's K-split partial deltas: the most rows any batch size needs.
      for (int64_t m = 1; m <= std::min(max_tokens, inline_max_tokens_); ++m) {
        rows13 = std::max(rows13, k_splits(m, true) * m * s.top_k);
        rows2 = std::max(rows2, k_splits(m, false) * m * s.top_k);
      }
      if (rows13 > 0) {
        d13_ = Tensor::empty({rows13, 2 * s.inter}, DType::f32, d);
        d2_ = Tensor::empty({rows2, s.hidden}, DType::f32, d);
      }
    }
    side_ = Stream::create(d, options.side_stream_priority);
    fork_ = Event::create(d, /*timing=*/false);
    gu_done_ = Event::create(d, /*timing=*/false);
    down_fork_ = Event::create(d, /*timing=*/false);
    down_done_ = Event::create(d, /*timing=*/false);
    for (MoeLoraInline* l : {&inline_.gate_up, &inline_.down}) {
      l->meta = pool.slot_meta();
      l->top_k = s.top_k;
      l->column_splits = options.inline_column_splits;
    }
    inline_.gate_up.a = pool.a13();
    inline_.gate_up.b = pool.b13();
    inline_.down.a = pool.a2();
    inline_.down.b = pool.b2();
  }

  const MoeLoraInlineSeams* inline_lora(const TopK& topk, int64_t m) override {
    inline_on_ = false;
    if (m > inline_max_tokens_) return nullptr;
    const int64_t n = m * pool_.shape().top_k;
    const Tensor token_slot = bound_slots(m);
    inline_.gate_up.token_slot = inline_.down.token_slot = token_slot;
    auto partials = [&](const Tensor& d, int64_t splits) {
      Tensor rows = d.first_rows(splits * n);
      return splits == 1 ? rows : rows.view({splits, n, d.size(1)});
    };
    inline_.gate_up.delta = partials(d13_, k_splits(m, true));
    inline_.down.delta = partials(d2_, k_splits(m, false));
    inline_.down.slot_weights = topk.weights.view({n});
    m_ = m;
    routed_ = true;
    inline_on_ = true;
    gu_queued_ = down_queued_ = false;
    return &inline_;
  }

  void after_route(const TopK& topk, int64_t m, const Stream& stream) override {
    inline_on_ = false;
    const Tensor token_slot = bound_slots(m);
    const MoeShape& s = pool_.shape();
    m_ = m;
    fork_.record(stream);
    side_.wait(fork_);
    if (!directs(m)) {
      vplan_.block_m = cuda::moe_lora_block_m(m, s.top_k);
      cuda::moe_lora_align(topk.ids, token_slot, s.num_experts, vplan_, side_);
    }
    routed_ = true;
    gu_queued_ = down_queued_ = false;
  }

  // x is final (it is the layer's input), and the side stream already follows after_route's
  // fork, so no new fork is needed.
  void before_gate_up(const Tensor& x, const TopK& topk, const Stream& stream) override {
    (void)stream;
    if (!routed_) return;
    const int k = pool_.shape().top_k;
    const int64_t n = topk.ids.size(0) * k;
    if (directs(m_)) {
      Tensor d = d13_.first_rows(n);
      cuda::moe_lora_direct(x, k, topk.ids, bound_slots(m_), pool_.a13(), pool_.b13(),
                            pool_.slot_meta(), LoraSeam::gate_up, Tensor(), d, cluster_size(m_),
                            direct_clusters(m_), side_);
      gu_done_.record(side_);
      gu_queued_ = true;
      return;
    }
    const int splits = cuda::moe_lora_shrink_splits(n);
    Tensor u = u13_.first_rows(splits * n);
    cuda::moe_lora_shrink_split(x, k, vplan_, pool_.a13(), pool_.slot_meta(), LoraSeam::gate_up,
                                splits, u, side_);
    if (use_delta(n) || overlaps(m_)) {
      Tensor d = d13_.first_rows(n);
      cuda::moe_lora_expand_delta_split(u, splits, vplan_, pool_.b13(), pool_.slot_meta(),
                                        LoraSeam::gate_up, Tensor(), d, side_);
    }
    gu_done_.record(side_);
    gu_queued_ = true;
  }

  void after_gate_up(const Tensor& x, const TopK& topk, Tensor& h, const Stream& stream) override {
    MOELORA_CHECK(routed_, "MoE LoRA hooks: after_gate_up before after_route");
    if (!gu_queued_) before_gate_up(x, topk, stream);
    stream.wait(gu_done_);
    gu_queued_ = false;
    const int64_t n = topk.ids.size(0) * pool_.shape().top_k;
    if (use_delta(n) || directs(m_)) {
      cuda::moe_lora_add_delta(d13_.first_rows(n), topk.ids, bound_slots(m_), pool_.num_slots(),
                               pool_.shape().num_experts, h, stream);
    } else {
      const int splits = cuda::moe_lora_shrink_splits(n);
      cuda::moe_lora_expand_split(u13_.first_rows(splits * n), splits, vplan_, pool_.b13(),
                                  pool_.slot_meta(), LoraSeam::gate_up, Tensor(), h, stream);
    }
  }

  void before_down(const Tensor& a, const TopK& topk, const Stream& stream) override {
    if (!routed_) return;
    const int64_t n = topk.ids.size(0) * pool_.shape().top_k;
    down_fork_.record(stream);  // a is final on `stream` here
    side_.wait(down_fork_);
    if (directs(m_)) {
      Tensor d = d2_.first_rows(n);
      cuda::moe_lora_direct(a, 1, topk.ids, bound_slots(m_), pool_.a2(), pool_.b2(),
                            pool_.slot_meta(), LoraSeam::down, topk.weights.view({n}), d,
                            cluster_size(m_), direct_clusters(m_), side_);
      down_done_.record(side_);
      down_queued_ = true;
      return;
    }
    const int splits = cuda::moe_lora_shrink_splits(n);
    Tensor u = u2_.first_rows(splits * n);
    cuda::moe_lora_shrink_split(a, 1, vplan_, pool_.a2(), pool_.slot_meta(), LoraSeam::down, splits,
                                u, side_);
    if (use_delta(n) || overlaps(m_)) {
      Tensor d = d2_.first_rows(n);
      cuda::moe_lora_expand_delta_split(u, splits, vplan_, pool_.b2(), pool_.slot_meta(),
                                        LoraSeam::down, topk.weights.view({n}), d, side_);
    }
    down_done_.record(side_);
    down_queued_ = true;
  }

  // The fast path: the expands folded into the activation / reduction (moe_lora_fused.cu).
  // The overlap path (deltas beside the GEMMs, added in the activation / reduction) or the
  // fused path (expands folded into them).
  bool fuses_activation(int64_t m) const override {
    return inlined(m) || directs(m) || overlaps(m) || m <= fused_max_tokens_;
  }
  bool fuses_reduce(int64_t m) const override {
    return inlined(m) || directs(m) || overlaps(m) || m <= fused_max_tokens_;
  }

  void gate_up_activation(const Tensor& x, const TopK& topk, const Tensor& h, Tensor& a,
                          const Stream& stream) override {
    MOELORA_CHECK(routed_, "MoE LoRA hooks: gate_up_activation before after_route");
    if (inline_on_) {  // the delta came from the gate_up GEMM's own grid, just before
      cuda::moe_activation_lora_delta(h, topk.ids, bound_slots(m_), pool_.num_slots(),
                                      pool_.shape().num_experts, inline_.gate_up.delta, a, stream);
      return;
    }
    if (!gu_queued_) before_gate_up(x, topk, stream);
    stream.wait(gu_done_);
    gu_queued_ = false;
    const int64_t n = topk.ids.size(0) * pool_.shape().top_k;
    if (directs(m_) || overlaps(m_)) {
      cuda::moe_activation_lora_delta(h, topk.ids, bound_slots(m_), pool_.num_slots(),
                                      pool_.shape().num_experts, d13_.first_rows(n), a, stream);
      return;
    }
    const int splits = cuda::moe_lora_shrink_splits(n);
    cuda::moe_lora_activation(h, topk.ids, bound_slots(m_), u13_.first_rows(splits * n), splits,
                              pool_.b13(), pool_.slot_meta(), a, stream);
  }

  void down_reduce(const Tensor& a, const TopK& topk, const Tensor& o, const Tensor& shared_o,
                   const Tensor& shared_gate_logits, Tensor& y, const Stream& stream) override {
    MOELORA_CHECK(routed_, "MoE LoRA hooks: down_reduce before after_route");
    if (inline_on_) {
      cuda::moe_reduce_lora_delta(o, topk.ids, bound_slots(m_), pool_.num_slots(),
                                  pool_.shape().num_experts, inline_.down.delta, shared_o,
                                  shared_gate_logits, y, stream);
      return;
    }
    if (!down_queued_) before_down(a, topk, stream);
    stream.wait(down_done_);
    down_queued_ = false;
    const int64_t n = topk.ids.size(0) * pool_.shape().top_k;
    if (directs(m_) || overlaps(m_)) {
      cuda::moe_reduce_lora_delta(o, topk.ids, bound_slots(m_), pool_.num_slots(),
                                  pool_.shape().num_experts, d2_.first_rows(n), shared_o,
                                  shared_gate_logits, y, stream);
      return;
    }
    const int splits = cuda::moe_lora_shrink_splits(n);
    cuda::moe_lora_reduce(o, topk.ids, bound_slots(m_), topk.weights.view({n}),
                          u2_.first_rows(splits * n), splits, pool_.b2(), pool_.slot_meta(),
                          shared_o, shared_gate_logits, y, stream);
  }

  void after_down(const Tensor& a, const TopK& topk, Tensor& o, const Stream& stream) override {
    MOELORA_CHECK(routed_, "MoE LoRA hooks: after_down before after_route");
    if (!down_queued_) before_down(a, topk, stream);
    stream.wait(down_done_);
    down_queued_ = false;
    const int64_t n = topk.ids.size(0) * pool_.shape().top_k;
    if (use_delta(n) || directs(m_)) {
      cuda::moe_lora_add_delta(d2_.first_rows(n), topk.ids, bound_slots(m_), pool_.num_slots(),
                               pool_.shape().num_experts, o, stream);
    } else {
      const int splits = cuda::moe_lora_shrink_splits(n);
      cuda::moe_lora_expand_split(u2_.first_rows(splits * n), splits, vplan_, pool_.b2(),
                                  pool_.slot_meta(), LoraSeam::down, topk.weights.view({n}), o,
                                  stream);
    }
  }

 private:
  bool use_delta(int64_t n) const {
    return n <= delta_rows_ && n / pool_.shape().top_k > fused_max_tokens_;
  }
  bool overlaps(int64_t m) const { return m <= overlap_max_tokens_; }
  bool directs(int64_t m) const {
    return m <= direct_max_tokens_ && (m < direct_gap_min_ || m > direct_gap_max_);
  }
  // The direct kernel's CTAs per (adapter, expert) pair for a batch of m tokens: the option,
  // or by batch size (0): one token has at most top_k pairs, too few CTAs for the GPU unless
  // each pair's K is split over a cluster of 4 (41.3 vs 44.7 us per fp8 layer at r16x1, 56.8
  // vs 77.9 at r64x1); from 2 tokens a plain CTA per pair (measured from batch 4: 82.9 vs 99.0
  // at r16x1, batch 4; 181.2 vs 192.7 at batch 16; H100, session 8; batches 2-3 not measured).
  int cluster_size(int64_t m) const {
    if (direct_cluster_size_ > 0) return direct_cluster_size_;
    return m <= 1 ? 4 : 1;
  }
  // The direct kernel's grid bound: two clusters' worth of CTAs per SM (pairs beyond loop).
  int direct_clusters(int64_t m) const { return std::max(1, 2 * sms_ * 4 / cluster_size(m)); }
  // K slices of an inline seam for a batch of m tokens (MoeLoraHooksOptions::inline_k_splits).
  int64_t k_splits(int64_t m, bool gate_up) const {
    if (inline_k_splits_ > 0) return inline_k_splits_;
    const MoeShape& s = pool_.shape();
    return cuda::inline_lora_k_splits(m * s.top_k, s.num_experts, gate_up ? s.hidden : s.inter,
                                      (gate_up ? 2 : 1) * inline_column_splits_, sms_);
  }
  // This layer call took the inline seams (inline_lora(), asked only of backends that run them).
  bool inlined(int64_t m) const { return inline_on_ && m == m_; }

  int64_t m_ = 0;
  int64_t fused_max_tokens_ = 0;
  int64_t overlap_max_tokens_ = 0;
  int64_t inline_max_tokens_ = 0;
  int64_t direct_max_tokens_ = 0;
  int64_t direct_gap_min_ = 1, direct_gap_max_ = 0;
  int direct_cluster_size_ = 0;
  int inline_k_splits_ = 0, inline_column_splits_ = 1, sms_ = 132;
  MoeLoraInlineSeams inline_;
  bool inline_on_ = false;  // this layer call runs the inline seams
  int64_t delta_rows_ = 0;  // slots the delta buffers hold (0: delta path off)
  Tensor u13_, u2_, d13_, d2_;
  MoeAlignment vplan_;
  Stream side_;
  Event fork_, gu_done_, down_fork_, down_done_;
  bool routed_ = false, gu_queued_ = false, down_queued_ = false;
};

}  // namespace

std::unique_ptr<MoeLoraHooks> make_cuda_moe_lora_hooks(const MoeLoraPool& pool, int64_t max_tokens,
                                                       const MoeLoraHooksOptions& options) {
  return std::make_unique<CudaLoraHooks>(pool, max_tokens, options);
}

}  // namespace moelora
