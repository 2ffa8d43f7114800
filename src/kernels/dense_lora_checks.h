// Argument checks of the dense LoRA ops, shared by the CPU and CUDA implementations
// (internal). Each throws moelora::Error naming the tensor, expected vs found.
#pragma once

#include <cstdint>

#include "moelora/core/tensor.h"
#include "moelora/lora/dense_lora.h"

namespace moelora::detail {

struct DenseLoraDims {
  int64_t m = 0, k = 0, n = 0;
  int slots = 0, slices = 0, r = 0;
};

inline void check_on(const Tensor& t, DType dt, Device d, const char* what) {
  check_dtype(t, dt, what);
  check_device(t, d, what);
  check_contiguous(t, what);
}

// A [S, slices, R, K], ranks [S, slices], token_slot [M] and u [>= M, slices*R] on one device.
inline DenseLoraDims check_dense_lora_common(const Tensor& token_slot, const Tensor& ranks,
                                             const Tensor& u, const char* op) {
  (void)op;
  const Device d = token_slot.device();
  check_on(token_slot, DType::i32, d, "dense LoRA token_slot");
  MOELORA_CHECK(token_slot.dim() == 1, "dense LoRA token_slot: expected i32 [M], found {}",
                token_slot.describe());
  check_on(ranks, DType::i32, d, "dense LoRA ranks");
  MOELORA_CHECK(ranks.dim() == 2 && ranks.size(1) >= 1 && ranks.size(1) <= kMaxDenseLoraSlices,
                "dense LoRA ranks: expected i32 [slots, 1..{}], found {}", kMaxDenseLoraSlices,
                ranks.describe());
  DenseLoraDims dims;
  dims.m = token_slot.size(0);
  dims.slots = int(ranks.size(0));
  dims.slices = int(ranks.size(1));
  check_on(u, DType::f32, d, "dense LoRA u (workspace)");
  MOELORA_CHECK(u.dim() == 2 && u.size(0) == dims.m && u.size(1) % dims.slices == 0,
                "dense LoRA u: expected f32 [{} (M), {} x R], found {}", dims.m, dims.slices,
                u.describe());
  dims.r = int(u.size(1) / dims.slices);
  return dims;
}

inline DenseLoraDims check_dense_lora_shrink(const Tensor& x, const Tensor& token_slot,
                                             const Tensor& A, const Tensor& ranks,
                                             const Tensor& u) {
  DenseLoraDims d = check_dense_lora_common(token_slot, ranks, u, "dense_lora_shrink");
  const Device dev = token_slot.device();
  check_on(x, DType::bf16, dev, "dense_lora_shrink x");
  MOELORA_CHECK(x.dim() == 2 && x.size(0) == d.m,
                "dense_lora_shrink x: expected bf16 [{} (M), K], found {}", d.m, x.describe());
  d.k = x.size(1);
  check_on(A, DType::bf16, dev, "dense_lora_shrink A");
  check_shape(A, {d.slots, d.slices, d.r, d.k}, "dense_lora_shrink A");
  return d;
}

inline DenseLoraDims check_dense_lora_expand(const Tensor& u, const Tensor& token_slot,
                                             const Tensor& B, const Tensor& ranks,
                                             const DenseLoraSlices& slices, const Tensor& y) {
  DenseLoraDims d = check_dense_lora_common(token_slot, ranks, u, "dense_lora_expand");
  const Device dev = token_slot.device();
  MOELORA_CHECK(slices.count == d.slices,
                "dense_lora_expand: {} output slices given but ranks has {} columns",
                slices.count, d.slices);
  d.n = slices.total();
  check_on(B, DType::bf16, dev, "dense_lora_expand B");
  check_shape(B, {d.slots, d.n, d.r}, "dense_lora_expand B");
  MOELORA_CHECK(y.defined() && (y.dtype() == DType::f32 || y.dtype() == DType::bf16),
                "dense_lora_expand y: expected f32 or bf16 [M, N], found {}",
                y.defined() ? y.describe() : std::string("undefined"));
  check_device(y, dev, "dense_lora_expand y");
  check_contiguous(y, "dense_lora_expand y");
  check_shape(y, {d.m, d.n}, "dense_lora_expand y");
  return d;
}

}  // namespace moelora::detail
