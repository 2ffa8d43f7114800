// Shared vocabulary of the quantized weight formats (moelora::quant): the logical vs stored
// sizes of one quantized weight, and the act-order permutation of GPTQ-style g_idx.
//
// Every format describes one linear weight in the nn.Linear layout: logical [N, K] = [out
// features, in features]. Dequantizers return f32 [N, K], row-major. Stored (packed) tensors
// keep the exact layout real checkpoints use; QuantDims states both views so that a packed
// size is never mistaken for a logical one (a packed N used as a logical N was a real bug in
// sglang's Marlin LoRA backend).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moelora/core/tensor.h"

namespace moelora::quant {

// Logical and stored sizes of one quantized weight.
struct QuantDims {
  int64_t n = 0;  // logical out_features (rows of the dequantized weight)
  int64_t k = 0;  // logical in_features (columns of the dequantized weight)
  int bits = 0;   // bits per stored weight element (4, 8)
  int pack = 1;   // weight elements per stored word along the packed dimension
  // Shape of the stored weight tensor (qweight / weight_packed / weight).
  int64_t packed_rows = 0, packed_cols = 0;
  // Scales: `group_size` consecutive K elements (after any act-order permutation) share one
  // scale along K; `group_n` consecutive N rows share one along N (1 except block formats).
  int64_t group_size = 0;
  int64_t num_groups = 0;  // scale entries along K
  int64_t group_n = 1;
  int64_t num_groups_n = 0;  // scale entries along N

  bool operator==(const QuantDims&) const = default;
};

// "n=64 k=128 bits=4 packed=[16, 64] groups=1x128 (4 along K)" — for error messages.
std::string describe(const QuantDims& d);

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The act-order view of a g_idx (group of each input channel k). GPTQ with desc_act stores a
// non-monotonic g_idx; a kernel that wants each group's channels contiguous multiplies by the
// weight rows permuted with `perm` and reads the activation columns x[:, perm].
struct ActOrder {
  std::vector<int32_t> perm;         // stable sort of k by group: sorted position -> k
  std::vector<int32_t> group_start;  // [num_groups + 1]: sorted positions of each group
  bool monotonic = true;             // g_idx never decreases (no permutation needed)
  bool uniform = true;               // every group has exactly group_size channels
};

// Validates `g_idx` (i32 [K], every value in [0, num_groups)) and builds its permutation.
// `name` is the tensor's name in the checkpoint, used in errors.
ActOrder act_order_from_g_idx(const Tensor& g_idx, int64_t k, int64_t num_groups,
                              int64_t group_size, const std::string& name);

// The g_idx of an act-order quantization: channels perm[i] form group i / group_size.
// `perm` must be a permutation of [0, K).
std::vector<int32_t> g_idx_from_perm(const std::vector<int32_t>& perm, int64_t group_size);

}  // namespace moelora::quant
