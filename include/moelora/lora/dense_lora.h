// LoRA on dense linear layers (attention q/k/v/o, MLA projections, dense MLPs, shared experts)
// for many adapters in one batch: a slot pool with stable device addresses per linear module,
// and the op that applies it (shrink then expand; CPU reference and CUDA, same results).
//
// One pool serves one linear layer whose outputs may be several slices fused in one GEMM
// (q/k/v: 3 slices, gate/up: 2, o_proj: 1); each slice has its own LoRA (its own A and B) per
// slot, of any rank up to r_max, or none. PEFT's per-module q_proj/k_proj/v_proj LoRAs map
// one-to-one onto the slices.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"

namespace moelora {

inline constexpr int kMaxDenseLoraSlices = 4;

// Column offsets of the output slices: slice s is [offset[s], offset[s + 1]).
struct DenseLoraSlices {
  int count = 1;
  std::array<int64_t, kMaxDenseLoraSlices + 1> offset{};
  int64_t total() const { return offset[size_t(count)]; }
  int slice_of(int64_t n) const {
    int s = 0;
    while (s + 1 < count && n >= offset[size_t(s) + 1]) ++s;
    return s;
  }
  // From the slice widths, e.g. {q_out, k_out, v_out}.
  static DenseLoraSlices from_sizes(const std::vector<int64_t>& sizes);
};

// The LoRA of one slice of one adapter (host tensors, any float dtype): delta = scale * B . A.
struct DenseLoraSlice {
  Tensor a;  // [r, K]
  Tensor b;  // [slice width, r]
  float scale = 1.0f;
  bool defined() const { return a.defined(); }
};

class DenseLoraPool {
 public:
  // `name` names the module in errors (e.g. "model.layers.3.self_attn.qkv").
  DenseLoraPool(std::string name, int64_t in_features, DenseLoraSlices slices, int num_slots,
                int r_max, Device device);

  // Validates each slice's A [r, K] and B [width, r] (naming the slice, expected vs found;
  // r <= r_max), folds the scale into B, zero-pads to r_max and copies into `slot`. A slice
  // left undefined gets rank 0 (no LoRA on it). `slices.size()` must equal the slice count.
  void load(int slot, const std::vector<DenseLoraSlice>& slices, const Stream* stream = nullptr);
  void unload(int slot);

  const std::string& name() const { return name_; }
  int64_t in_features() const { return k_; }
  const DenseLoraSlices& slices() const { return slices_; }
  int num_slots() const { return num_slots_; }
  int r_max() const { return r_max_; }
  Device device() const { return device_; }
  int rank(int slot, int slice) const;

  const Tensor& a() const { return a_; }          // bf16 [S, slices, r_max, K]
  const Tensor& b() const { return b_; }          // bf16 [S, N, r_max]
  const Tensor& ranks() const { return ranks_; }  // i32 [S, slices]

 private:
  std::string name_;
  int64_t k_;
  DenseLoraSlices slices_;
  int num_slots_, r_max_;
  Device device_;
  Tensor a_, b_, ranks_;
  std::vector<int32_t> ranks_host_;
};

// y [M, N] (f32, or bf16 rounded once) += the LoRA delta of each token's slot (token_slot i32
// [M] on the pool's device, -1 = base). `u` is a workspace f32 [>= M, slices * r_max] on the
// same device. Allocation-free; graph-capturable on CUDA.
void apply_dense_lora(const DenseLoraPool& pool, const Tensor& x, const Tensor& token_slot,
                      Tensor& u, Tensor& y, const Stream& stream);

// apply_dense_lora's two halves, for running the shrink on a side stream beside the base
// projection (the fast decode path): u[:M] = x . A_slot^T, then y += u[:M] . B_slot^T.
void dense_lora_shrink(const DenseLoraPool& pool, const Tensor& x, const Tensor& token_slot,
                       Tensor& u, const Stream& stream);
void dense_lora_expand(const DenseLoraPool& pool, const Tensor& u, const Tensor& token_slot,
                       Tensor& y, const Stream& stream);

// The fast decode path (CUDA only): dense_lora_expand folded into the pass that consumes y, so
// the expand costs no kernel of its own. y' = y + the delta (as dense_lora_expand would leave
// y; y is not changed); `pool` may be null (no LoRA: y' = y). Split: outs[s] f32 [M, width_s]
// = slice s of y' (slices: the pool's, or the given ones without a pool). Residual: x f32
// [M, N] += y'.
void dense_lora_expand_split(const DenseLoraPool* pool, const Tensor& u, const Tensor& token_slot,
                             const Tensor& y, const DenseLoraSlices& slices,
                             const std::vector<Tensor*>& outs, const Stream& stream);
void dense_lora_expand_residual(const DenseLoraPool* pool, const Tensor& u,
                                const Tensor& token_slot, const Tensor& y, Tensor& x,
                                const Stream& stream);

}  // namespace moelora
