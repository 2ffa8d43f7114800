// DenseLoraPool (slots of one dense linear module) and apply_dense_lora (backend dispatch).
#include <vector>

#include "kernels/cpu/dense_lora_ops.h"
#include "moelora/lora/dense_lora.h"
#ifdef MOELORA_WITH_CUDA
#include "kernels/cuda/dense_lora_ops.h"
#endif

namespace moelora {

DenseLoraSlices DenseLoraSlices::from_sizes(const std::vector<int64_t>& sizes) {
  MOELORA_CHECK(!sizes.empty() && sizes.size() <= size_t(kMaxDenseLoraSlices),
                "dense LoRA: expected 1..{} output slices, found {}", kMaxDenseLoraSlices,
                sizes.size());
  DenseLoraSlices s;
  s.count = int(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    MOELORA_CHECK(sizes[i] > 0, "dense LoRA: slice {} has width {}", i, sizes[i]);
    s.offset[i + 1] = s.offset[i] + sizes[i];
  }
  return s;
}

DenseLoraPool::DenseLoraPool(std::string name, int64_t in_features, DenseLoraSlices slices,
                             int num_slots, int r_max, Device device)
    : name_(std::move(name)),
      k_(in_features),
      slices_(slices),
      num_slots_(num_slots),
      r_max_(r_max),
      device_(device) {
  MOELORA_CHECK(in_features > 0 && slices.count >= 1 && slices.count <= kMaxDenseLoraSlices &&
                    slices.total() > 0,
                "dense LoRA pool {}: bad sizes (in {}, {} slices, out {})", name_, in_features,
                slices.count, slices.total());
  MOELORA_CHECK(num_slots >= 1, "dense LoRA pool {}: num_slots must be >= 1, found {}", name_,
                num_slots);
  MOELORA_CHECK(r_max >= 1 && r_max <= 256, "dense LoRA pool {}: r_max must be in 1..256, found {}",
                name_, r_max);
  const int64_t S = num_slots;
  a_ = Tensor::zeros({S, slices.count, r_max, in_features}, DType::bf16, device);
  b_ = Tensor::zeros({S, slices.total(), r_max}, DType::bf16, device);
  ranks_ = Tensor::zeros({S, slices.count}, DType::i32, device);
  ranks_host_.assign(size_t(S * slices.count), 0);
}

int DenseLoraPool::rank(int slot, int slice) const {
  MOELORA_CHECK(slot >= 0 && slot < num_slots_ && slice >= 0 && slice < slices_.count,
                "dense LoRA pool {}: (slot {}, slice {}) out of range ({} slots, {} slices)", name_,
                slot, slice, num_slots_, slices_.count);
  return ranks_host_[size_t(slot * slices_.count + slice)];
}

void DenseLoraPool::load(int slot, const std::vector<DenseLoraSlice>& in, const Stream* stream) {
  rank(slot, 0);  // range check
  MOELORA_CHECK(int(in.size()) == slices_.count,
                "dense LoRA pool {}: {} slices given for a module with {}", name_, in.size(),
                slices_.count);
  const int64_t N = slices_.total(), R = r_max_;
  std::vector<bf16_t> a(size_t(slices_.count * R * k_), bf16_t{0});
  std::vector<bf16_t> b(size_t(N * R), bf16_t{0});
  std::vector<int32_t> ranks(size_t(slices_.count), 0);
  for (int s = 0; s < slices_.count; ++s) {
    const DenseLoraSlice& l = in[size_t(s)];
    if (!l.defined()) continue;
    const int64_t width = slices_.offset[size_t(s) + 1] - slices_.offset[size_t(s)];
    for (const Tensor* t : {&l.a, &l.b}) {
      MOELORA_CHECK(
          t->defined() && t->device().is_cpu() && t->dim() == 2 && t->is_contiguous() &&
              (t->dtype() == DType::f32 || t->dtype() == DType::bf16 || t->dtype() == DType::f16),
          "dense LoRA {} slice {}: expected contiguous host f32/bf16/f16 2-d A and B, "
          "found {}",
          name_, s, t->defined() ? t->describe() : std::string("undefined"));
    }
    const int64_t r = l.a.size(0);
    MOELORA_CHECK(r >= 1 && r <= R, "dense LoRA {} slice {}: rank {} is outside the pool's 1..{}",
                  name_, s, r, R);
    MOELORA_CHECK(l.a.size(1) == k_,
                  "dense LoRA {} slice {}: A expected [{}, {}] (rank, in), "
                  "found {}",
                  name_, s, r, k_, l.a.describe());
    MOELORA_CHECK(l.b.size(0) == width && l.b.size(1) == r,
                  "dense LoRA {} slice {}: B expected [{}, {}] (out, rank), found {}", name_, s,
                  width, r, l.b.describe());
    ranks[size_t(s)] = int32_t(r);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t c = 0; c < k_; ++c)
        a[size_t((s * R + i) * k_ + c)] = float_to_bf16(float_at(l.a, i * k_ + c));
    for (int64_t n = 0; n < width; ++n)
      for (int64_t i = 0; i < r; ++i)
        b[size_t((slices_.offset[size_t(s)] + n) * R + i)] =
            float_to_bf16(l.scale * float_at(l.b, n * r + i));
  }
  auto put = [&](const Tensor& pool, void* host, DType dt) {
    Tensor dst = pool.narrow(0, slot, 1);
    dst.copy_from(Tensor::wrap(host, dst.shape(), dt), stream);
  };
  put(a_, a.data(), DType::bf16);
  put(b_, b.data(), DType::bf16);
  put(ranks_, ranks.data(), DType::i32);
  if (stream) stream->synchronize();  // the host vectors die with this frame
  for (int s = 0; s < slices_.count; ++s)
    ranks_host_[size_t(slot * slices_.count + s)] = ranks[size_t(s)];
}

void DenseLoraPool::unload(int slot) {
  rank(slot, 0);
  std::vector<int32_t> zeros(size_t(slices_.count), 0);
  Tensor dst = ranks_.narrow(0, slot, 1);
  dst.copy_from(Tensor::wrap(zeros.data(), dst.shape(), DType::i32));
  for (int s = 0; s < slices_.count; ++s) ranks_host_[size_t(slot * slices_.count + s)] = 0;
}

namespace {

Tensor checked_u(const DenseLoraPool& pool, const Tensor& x, Tensor& u) {
  MOELORA_CHECK(x.defined() && x.dim() == 2 && u.defined() && u.dim() == 2,
                "dense LoRA {}: expected x [M, K] and u [>= M, slices x r_max]", pool.name());
  const int64_t m = x.size(0);
  MOELORA_CHECK(u.size(0) >= m, "dense LoRA {}: workspace u has {} rows for {} tokens", pool.name(),
                u.size(0), m);
  return u.first_rows(m);
}

}  // namespace

void dense_lora_shrink(const DenseLoraPool& pool, const Tensor& x, const Tensor& token_slot,
                       Tensor& u, const Stream& stream) {
  Tensor um = checked_u(pool, x, u);
  if (pool.device().is_cpu())
    return cpu::dense_lora_shrink(x, token_slot, pool.a(), pool.ranks(), um, stream);
#ifdef MOELORA_WITH_CUDA
  cuda::dense_lora_shrink(x, token_slot, pool.a(), pool.ranks(), um, stream);
#else
  MOELORA_THROW("dense LoRA {}: pool on {} needs CUDA, but moelora was built without it",
                pool.name(), pool.device().str());
#endif
}

void dense_lora_expand(const DenseLoraPool& pool, const Tensor& u, const Tensor& token_slot,
                       Tensor& y, const Stream& stream) {
  MOELORA_CHECK(
      y.defined() && y.dim() == 2 && u.defined() && u.dim() == 2 && u.size(0) >= y.size(0),
      "dense LoRA {}: expected y [M, N] and u [>= M, slices x r_max], found {} and {}", pool.name(),
      y.describe(), u.describe());
  const Tensor um = u.first_rows(y.size(0));
  if (pool.device().is_cpu())
    return cpu::dense_lora_expand(um, token_slot, pool.b(), pool.ranks(), pool.slices(), y, stream);
#ifdef MOELORA_WITH_CUDA
  cuda::dense_lora_expand(um, token_slot, pool.b(), pool.ranks(), pool.slices(), y, stream);
#else
  MOELORA_THROW("dense LoRA {}: pool on {} needs CUDA, but moelora was built without it",
                pool.name(), pool.device().str());
#endif
}

void apply_dense_lora(const DenseLoraPool& pool, const Tensor& x, const Tensor& token_slot,
                      Tensor& u, Tensor& y, const Stream& stream) {
  dense_lora_shrink(pool, x, token_slot, u, stream);
  dense_lora_expand(pool, u, token_slot, y, stream);
}

void dense_lora_expand_split(const DenseLoraPool* pool, const Tensor& u, const Tensor& token_slot,
                             const Tensor& y, const DenseLoraSlices& slices,
                             const std::vector<Tensor*>& outs, const Stream& stream) {
  MOELORA_CHECK(y.defined() && y.device().is_cuda(),
                "dense_lora_expand_split: the fast decode path's fold runs on CUDA, y is {}",
                y.defined() ? y.describe() : std::string("undefined"));
  MOELORA_CHECK(
      !pool || (pool->slices().count == slices.count && pool->slices().total() == slices.total()),
      "dense LoRA {}: the split's {} slices of {} columns do not match the pool's",
      pool ? pool->name() : "", slices.count, slices.total());
#ifdef MOELORA_WITH_CUDA
  if (pool) {
    cuda::dense_lora_expand_split(y, u.first_rows(y.size(0)), token_slot, pool->b(), pool->ranks(),
                                  pool->slices(), outs, stream);
  } else {
    cuda::dense_lora_expand_split(y, Tensor(), Tensor(), Tensor(), Tensor(), slices, outs, stream);
  }
#else
  (void)u, (void)token_slot, (void)outs, (void)stream;
  MOELORA_THROW("dense_lora_expand_split: moelora was built without CUDA");
#endif
}

void dense_lora_expand_residual(const DenseLoraPool* pool, const Tensor& u,
                                const Tensor& token_slot, const Tensor& y, Tensor& x,
                                const Stream& stream) {
  MOELORA_CHECK(y.defined() && y.device().is_cuda() && y.dim() == 2,
                "dense_lora_expand_residual: the fast decode path's fold runs on CUDA with y "
                "[M, N], found {}",
                y.defined() ? y.describe() : std::string("undefined"));
#ifdef MOELORA_WITH_CUDA
  if (pool) {
    cuda::dense_lora_expand_residual(y, u.first_rows(y.size(0)), token_slot, pool->b(),
                                     pool->ranks(), pool->slices(), x, stream);
  } else {
    cuda::dense_lora_expand_residual(y, Tensor(), Tensor(), Tensor(), Tensor(),
                                     DenseLoraSlices::from_sizes({y.size(1)}), x, stream);
  }
#else
  (void)pool, (void)u, (void)token_slot, (void)x, (void)stream;
  MOELORA_THROW("dense_lora_expand_residual: moelora was built without CUDA");
#endif
}

}  // namespace moelora
