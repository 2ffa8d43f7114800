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
  MOELORA_CUDA_CHECK(
      launch_dense_lora_shrink(a, static_cast<cudaStream_t>(stream.handle())));
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
  MOELORA_CUDA_CHECK(
      launch_dense_lora_expand(a, static_cast<cudaStream_t>(stream.handle())));
}

}  // namespace moelora::cuda
