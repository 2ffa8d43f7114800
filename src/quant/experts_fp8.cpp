// fp8 block-scale expert stacks for cuda_fp8_block.
//
// Packed layout (what src/kernels/cuda/sm90_moe_gemm_fp8.cuh reads):
//   w       f8_e4m3 [G, N, K]            the checkpoint codes, parts stacked along N (unchanged)
//   scales  f32 [G, P, NBp, ceil(K/bk)]  weight_scale_inv of each part, NBp = ceil((N/P) / bn)
// Row n of group g uses scales[g, n / (N/P), (n % (N/P)) / bn, k / bk].
// A 128-row scale block must not straddle the gate/up boundary: when every part boundary is a
// multiple of block_n the parts' scale grids simply stack (P = 1, the same grid a checkpoint of
// the fused [N, K] matrix would have); otherwise each part keeps its own grid (P = parts, which
// must then all have the same number of rows: gate and up always do). Unequal parts with a
// boundary inside a block are refused. group_n = block_n, group_k = block_k.
#include <algorithm>
#include <cstring>

#include <fmt/ranges.h>

#include "moelora/core/random.h"
#include "quant/experts_impl.h"
#include "quant/quant_util.h"

namespace moelora::quant {
ExpertMatrices pack_fp8_block_experts(const std::vector<std::vector<Fp8BlockTensors>>& parts,
                                      const Fp8BlockConfig& cfg, const std::string& name) {
  MOELORA_CHECK(!parts.empty(), "{}: no expert groups given", name);
  MOELORA_CHECK(cfg.block_n > 0 && cfg.block_k > 0,
                "{}: weight_block_size must be positive, found [{}, {}]", name, cfg.block_n,
                cfg.block_k);
  const int64_t G = int64_t(parts.size());
  const size_t num_parts = parts[0].size();
  MOELORA_CHECK(num_parts > 0, "{}: group 0 has no parts", name);
  // Part sizes from group 0; every group must match them (and so agree on N and K).
  std::vector<int64_t> part_n(num_parts);
  int64_t K = -1, N = 0;
  for (size_t p = 0; p < num_parts; ++p) {
    const std::string pre = fmt::format("{}[0].part{}", name, p);
    const QuantDims d = validate_fp8_block(parts[0][p], cfg, pre);
    if (K < 0) K = d.k;
    MOELORA_CHECK(d.k == K, "{}: parts must share K; part 0 has K = {}, part {} has {}", name, K,
                  p, d.k);
    part_n[p] = d.n;
    N += d.n;
  }
  bool aligned = true;
  for (size_t p = 0; p + 1 < num_parts; ++p) aligned = aligned && part_n[p] % cfg.block_n == 0;
  bool equal = true;
  for (size_t p = 1; p < num_parts; ++p) equal = equal && part_n[p] == part_n[0];
  MOELORA_CHECK(aligned || equal,
                "{}: parts of {} rows: a part boundary falls inside a {}-row scale block and "
                "the parts differ in size (the packed layout keeps one scale grid per part "
                "only for equal parts)",
                name, fmt::join(part_n, ", "), cfg.block_n);
  const int64_t P = aligned ? 1 : int64_t(num_parts);
  const int64_t Np = N / P, NBp = ceil_div(Np, cfg.block_n), KB = ceil_div(K, cfg.block_k);

  ExpertMatrices m;
  m.format = WeightFormat::fp8_block;
  m.groups = G, m.n = N, m.k = K;
  m.group_k = cfg.block_k, m.group_n = cfg.block_n;
  m.w = Tensor::empty({G, N, K}, DType::f8_e4m3);
  m.scales = Tensor::empty({G, P, NBp, KB}, DType::f32);
  auto* w = static_cast<uint8_t*>(m.w.data());
  float* s = m.scales.data<float>();
  for (int64_t g = 0; g < G; ++g) {
    MOELORA_CHECK(parts[g].size() == num_parts, "{}: group {} has {} parts, group 0 has {}", name,
                  g, parts[g].size(), num_parts);
    int64_t row = 0, srow = 0;  // next weight row / scale row of this group
    for (size_t p = 0; p < num_parts; ++p) {
      const std::string pre = fmt::format("{}[{}].part{}", name, g, p);
      const Fp8BlockTensors& t = parts[g][p];
      const QuantDims d = g == 0 ? fp8_block_dims(cfg, part_n[p], K) : validate_fp8_block(t, cfg, pre);
      MOELORA_CHECK(d.n == part_n[p] && d.k == K,
                    "{}: expected [{}, {}] (as in group 0), found [{}, {}]", pre, part_n[p], K,
                    d.n, d.k);
      std::memcpy(w + (g * N + row) * K, t.weight.data(), size_t(d.n * K));
      // Part scale rows go to the group's next scale rows (aligned: stacked; else one grid per
      // part, NBp rows each).
      const float* ps = t.weight_scale_inv.data<float>();
      std::memcpy(s + (g * P * NBp + srow) * KB, ps, size_t(d.num_groups_n * KB) * 4);
      row += d.n;
      srow += P == 1 ? d.num_groups_n : NBp;
    }
  }
  return m;
}

namespace detail {

ExpertMatrices quantize_fp8_experts(const Tensor& w, const QuantizeOptions& opt) {
  MOELORA_CHECK(opt.group_size > 0,
                "quantize_experts(fp8_block): group_size is the square block size and must be "
                "positive, found {}", opt.group_size);
  const int64_t G = w.size(0), N = w.size(1), K = w.size(2);
  const Fp8BlockConfig cfg{opt.group_size, opt.group_size};
  // Each group as one [N, K] matrix (one part): what a checkpoint of the fused matrix holds.
  std::vector<std::vector<Fp8BlockTensors>> parts(static_cast<size_t>(G));
  for (int64_t g = 0; g < G; ++g) {
    Tensor one = w.narrow(0, g, 1).view({N, K});
    parts[size_t(g)].push_back(quantize_fp8_block(one, cfg));
  }
  return pack_fp8_block_experts(parts, cfg, "quantize_experts(fp8_block)");
}

Tensor dequantize_fp8_experts(const ExpertMatrices& w) {
  const std::string name = "dequantize_experts(fp8_block)";
  MOELORA_CHECK(w.w.dtype() == DType::f8_e4m3 && w.w.dim() == 3,
                "{}: expected f8_e4m3 codes [G, N, K], found {}", name, w.w.describe());
  const int64_t G = w.groups, N = w.n, K = w.k, bn = w.group_n, bk = w.group_k;
  check_shape(w.w, {G, N, K}, "fp8_block codes");
  MOELORA_CHECK(w.scales.dtype() == DType::f32 && w.scales.dim() == 4 && w.scales.size(0) == G &&
                    w.scales.size(1) > 0 && N % w.scales.size(1) == 0,
                "{}: expected f32 scales [G, P, NBp, KB] with P dividing N = {}, found {}", name,
                N, w.scales.describe());
  const int64_t P = w.scales.size(1), Np = N / P, NBp = ceil_div(Np, bn),
                KB = ceil_div(K, bk);
  check_shape(w.scales, {G, P, NBp, KB}, "fp8_block scales");
  check_contiguous(w.w, "fp8_block codes");
  check_contiguous(w.scales, "fp8_block scales");
  const Tensor& codes = w.w;
  const Tensor& sc = w.scales;
  const f8e4m3_t* q = codes.data<f8e4m3_t>();
  const float* s = sc.data<float>();
  Tensor out = Tensor::empty({G, N, K}, DType::f32);
  float* o = out.data<float>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t n = 0; n < N; ++n) {
      const float* srow = s + ((g * P + n / Np) * NBp + (n % Np) / bn) * KB;
      const int64_t base = (g * N + n) * K;
      for (int64_t k = 0; k < K; ++k) o[base + k] = f8e4m3_to_float(q[base + k]) * srow[k / bk];
    }
  return out;
}

ExpertMatrices random_fp8_experts(int64_t groups, int64_t n, int64_t k, int64_t group_size,
                                  float amax, uint64_t seed, Device device, const Stream& stream) {
  MOELORA_CHECK(groups > 0 && n > 0 && k > 0 && group_size > 0 && amax > 0,
                "random_experts(fp8_block): expected positive sizes, block and amax, found "
                "[{}, {}, {}] block {} amax {}", groups, n, k, group_size, amax);
  ExpertMatrices m;
  m.format = WeightFormat::fp8_block;
  m.groups = groups, m.n = n, m.k = k;
  m.group_k = group_size, m.group_n = group_size;
  m.w = Tensor::empty({groups, n, k}, DType::f8_e4m3, device);
  m.scales = Tensor::empty(
      {groups, 1, ceil_div(n, group_size), ceil_div(k, group_size)}, DType::f32, device);
  // Codes uniform over the e4m3 range, scales near amax / 448 (as the quantizer's).
  fill_uniform(m.w, seed, -kFp8E4m3Max, kFp8E4m3Max, stream);
  fill_uniform(m.scales, seed + 1, 0.5f * amax / kFp8E4m3Max, amax / kFp8E4m3Max, stream);
  return m;
}

}  // namespace detail
}  // namespace moelora::quant
