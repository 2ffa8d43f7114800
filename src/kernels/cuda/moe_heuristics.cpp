// Tile and launch choices for the CUDA MoE kernels; device code lives in sm90_*.cuh.
#include "kernels/cuda/moe_heuristics.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "kernels/cuda/moe_gemm_config.h"

namespace moelora::cuda {

bool moe_shape_supported(const MoeShape& shape, std::string* why) {
  auto fail = [&](std::string reason) {
    if (why) *why = std::move(reason);
    return false;
  };
  // The GEMMs stream each weight row and activation row in 16-byte cp.async chunks, so the
  // reduction lengths (H for gate_up, I for down) must be multiples of 8 bf16 values; output
  // widths are free (partial row tiles are masked).
  if (shape.hidden <= 0 || shape.hidden % 8 != 0)
    return fail(fmt::format("hidden size {} is not a positive multiple of 8", shape.hidden));
  if (shape.inter <= 0 || shape.inter % 8 != 0)
    return fail(fmt::format("expert intermediate size {} is not a positive multiple of 8",
                            shape.inter));
  if (shape.shared_inter < 0 || shape.shared_inter % 8 != 0)
    return fail(fmt::format("shared intermediate size {} is not a multiple of 8",
                            shape.shared_inter));
  // Grid rows: one CTA row per 32 weight rows (smallest tile), at most 65535.
  const int64_t widest = std::max<int64_t>({2LL * shape.inter, 2LL * shape.shared_inter,
                                            int64_t(shape.hidden)});
  if ((widest + 31) / 32 > 65535)
    return fail(fmt::format("output width {} exceeds the kernels' 65535 row tiles", widest));
  return true;
}

int moe_block_m(int64_t num_tokens, const MoeShape& shape) {
  // A block's weights are streamed once per block, so a block should hold all of an
  // expert's tokens: size it for the mean load plus ~3 standard deviations (binomial
  // routing). Wider blocks cost only MMA columns and shared memory, which decode has spare,
  // up to 64: at 128 tokens the mma.sync kernel turns compute-bound (measured 1.4 TB/s), and
  // two 64-token blocks reading the same weights (the second mostly from L2) are faster.
  const double slots = double(std::max<int64_t>(num_tokens, 1)) * std::max(shape.top_k, 1);
  const double mean = slots / std::max(shape.num_experts, 1);
  const double want = mean + 3.0 * std::sqrt(mean) + 1.0;
  int block_m = 8;  // one MMA column of tokens
  constexpr int kWidest = 64;
  while (block_m < want && block_m < kWidest) block_m *= 2;
  return block_m;
}

MoeGemmConfig moe_gemm_config(int64_t n, int64_t /*k*/, int block_m, int64_t num_slots,
                              int num_groups, int num_sms) {
  // Measured on H100 (bench/NOTES.md): with at least one CTA per SM the row tile barely
  // matters for narrow token tiles (64 is within ~7 % of the best everywhere); wide token
  // tiles (block_m > 32) need 128 rows, i.e. two 16-row MMA tiles per warp, to keep the
  // shared-memory reads of token fragments below the weight stream.
  // Grid order (bench/NOTES.md, "Layer latency"): dispatching the worst-case grid's empty
  // blocks last measured 1-2 us better per layer at block_m 32 (batch 128/256), no different
  // below, where the interleaved order stays.
  const bool tiles_fastest = block_m >= 32;
  if (block_m > 32) return {128, true, false, tiles_fastest};
  // Busy blocks: ~one per touched group, plus overflow blocks of heavily loaded groups.
  const double groups = std::max(num_groups, 1);
  const double touched = groups * (1.0 - std::pow(1.0 - 1.0 / groups, double(num_slots)));
  const double blocks = touched + std::max(0.0, double(num_slots) - touched) / block_m;
  if (blocks * std::ceil(double(n) / 64) < num_sms) return {32, true, false, tiles_fastest};
  return {64, true, false, tiles_fastest};
}

}  // namespace moelora::cuda
