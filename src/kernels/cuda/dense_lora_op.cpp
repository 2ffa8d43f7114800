// CUDA dense LoRA ops: argument checks (shared with the CPU ops), then the launchers.
#include "core/cuda_check.h"
#include "kernels/cuda/dense_lora_launch.h"
#include "kernels/cuda/dense_lora_ops.h"
#include "kernels/dense_lora_checks.h"

namespace moelora::cuda {
namespace {

DenseLoraArgs base_args(const detail::DenseLoraDims& d, const Tensor& token_slot,
                        const Tensor& ranks, Tensor& u) {
  DenseLoraArgs a{};
  a.token_slot = token_slot.data<int32_t>();
  a.ranks = ranks.data<int32_t>();
  a.u = u.data<float>();
  a.m = d.m, a.k = d.k, a.n = d.n;
  a.slots = d.slots, a.slices = d.slices, a.r = d.r;
  return a;
}

}  // namespace

void dense_lora_shrink(const Tensor& x, const Tensor& token_slot, const Tensor& A,
                       const Tensor& ranks, Tensor& u, const Stream& stream) {
  MOELORA_CHECK(x.device().is_cuda(), "cuda::dense_lora_shrink: x on {}", x.device().str());
  const auto d = detail::check_dense_lora_shrink(x, token_slot, A, ranks, u);
  MOELORA_CHECK(d.k % 8 == 0,
                "cuda::dense_lora_shrink: in_features {} is not a multiple of 8 (16-byte loads); "
                "the CPU backend runs any size",
                d.k);
  DenseLoraArgs a = base_args(d, token_slot, ranks, u);
  a.x = x.data();
  a.a = A.data();
  MOELORA_CUDA_CHECK(launch_dense_lora_shrink(a, static_cast<cudaStream_t>(stream.handle())));
}

void dense_lora_expand(const Tensor& u, const Tensor& token_slot, const Tensor& B,
                       const Tensor& ranks, const DenseLoraSlices& slices, Tensor& y,
                       const Stream& stream) {
  MOELORA_CHECK(u.device().is_cuda(), "cuda::dense_lora_expand: u on {}", u.device().str());
  const auto d = detail::check_dense_lora_expand(u, token_slot, B, ranks, slices, y);
  Tensor uu = u;
  DenseLoraArgs a = base_args(d, token_slot, ranks, uu);
  a.b = B.data();
  a.y = y.data();
  a.y_bf16 = y.dtype() == DType::bf16;
  for (int s = 0; s <= slices.count; ++s) a.offset[s] = slices.offset[size_t(s)];
  MOELORA_CUDA_CHECK(launch_dense_lora_expand(a, static_cast<cudaStream_t>(stream.handle())));
}

namespace {

// The folded expand's arguments: y f32 [M, N = slices.total()], the LoRA ones when u is defined.
DenseLoraArgs expand_out_args(const Tensor& y, const Tensor& u, const Tensor& token_slot,
                              const Tensor& B, const Tensor& ranks, const DenseLoraSlices& slices,
                              const char* op) {
  MOELORA_CHECK(y.defined() && y.device().is_cuda() && y.dtype() == DType::f32 && y.dim() == 2 &&
                    y.is_contiguous() && y.size(1) == slices.total(),
                "{} y: expected a contiguous CUDA f32 [M, {}], found {}", op, slices.total(),
                y.defined() ? y.describe() : std::string("undefined"));
  DenseLoraArgs a{};
  if (u.defined()) {
    Tensor yy = y, uu = u;
    const auto d = detail::check_dense_lora_expand(u, token_slot, B, ranks, slices, yy);
    a = base_args(d, token_slot, ranks, uu);
    a.b = B.data();
  } else {
    a.m = y.size(0), a.n = y.size(1), a.slices = slices.count;
  }
  for (int s = 0; s <= slices.count; ++s) a.offset[s] = slices.offset[size_t(s)];
  a.y_src = y.data<float>();
  return a;
}

void check_out(const Tensor& t, int64_t m, int64_t n, const char* what) {
  MOELORA_CHECK(t.defined() && t.device().is_cuda() && t.dtype() == DType::f32 && t.dim() == 2 &&
                    t.is_contiguous() && t.size(0) == m && t.size(1) == n,
                "{}: expected a contiguous CUDA f32 [{}, {}], found {}", what, m, n,
                t.defined() ? t.describe() : std::string("undefined"));
}

}  // namespace

void dense_lora_expand_split(const Tensor& y, const Tensor& u, const Tensor& token_slot,
                             const Tensor& B, const Tensor& ranks, const DenseLoraSlices& slices,
                             const std::vector<Tensor*>& outs, const Stream& stream) {
  DenseLoraArgs a = expand_out_args(y, u, token_slot, B, ranks, slices, "dense_lora_expand_split");
  MOELORA_CHECK(int(outs.size()) == slices.count,
                "dense_lora_expand_split: {} outputs for {} slices", outs.size(), slices.count);
  for (int s = 0; s < slices.count; ++s) {
    MOELORA_CHECK(outs[size_t(s)] != nullptr, "dense_lora_expand_split: output {} is null", s);
    check_out(*outs[size_t(s)], y.size(0), slices.offset[size_t(s) + 1] - slices.offset[size_t(s)],
              "dense_lora_expand_split output");
    a.split[s] = outs[size_t(s)]->data<float>();
  }
  MOELORA_CUDA_CHECK(launch_dense_lora_expand_out(a, static_cast<cudaStream_t>(stream.handle())));
}

void dense_lora_expand_residual(const Tensor& y, const Tensor& u, const Tensor& token_slot,
                                const Tensor& B, const Tensor& ranks, const DenseLoraSlices& slices,
                                Tensor& x, const Stream& stream) {
  DenseLoraArgs a =
      expand_out_args(y, u, token_slot, B, ranks, slices, "dense_lora_expand_residual");
  check_out(x, y.size(0), y.size(1), "dense_lora_expand_residual x");
  a.residual = x.data<float>();
  MOELORA_CUDA_CHECK(launch_dense_lora_expand_out(a, static_cast<cudaStream_t>(stream.handle())));
}

}  // namespace moelora::cuda
