// NVFP4 expert stacks for cuda_nvfp4 (kernel: src/kernels/cuda/sm90_moe_gemm_nvfp4.cuh).
//
// Packed layout (logical [G, N, K]; Np = N rounded up to 16, Kp = K rounded up to 64; padding
// codes and scales are 0):
//   w      u8      [G, Np, Kp/2]: 512-byte fragments ordered (group, 16-row tile mt, 64-wide
//                  K chunk kc). In a fragment, lane l (of the kernel's warp; q = l/4, c = l%4)
//                  owns bytes [16 l, 16 l + 16): one 32-bit word per 16-wide K step j, holding
//                  exactly the 8 codes of its mma.m16n8k16 A fragment, rows r0 = 16 mt + q and
//                  r1 = r0 + 8, columns kb + 2c, kb + 2c + 1 and kb + 2c + 8, kb + 2c + 9
//                  (kb = 64 kc + 16 j). So one 16-byte load feeds four MMAs (the Marlin idea).
//   scales f8_e4m3 [G, Np, Kp/16]: 64 bytes per (group, mt, kc): byte 8q + 2j + h is the scale
//                  of row r0 (h = 0) or r1 (h = 1) for K step j.
//   global_scale f32 [G] (weight_scale_2), or f32 [G, N] (one per row) when some group's
//                  parts (gate, up) have different weight_scale_2 -- see pack below.
// Code bits in a word (kNibbleBits): register a_s of the A fragment (s = 0: r0 lo k, 1: r1 lo k,
// 2: r0 hi k, 3: r1 hi k) is rebuilt with shifts and masks as the bf16 bit pattern
// sign << 15 | exp2 << 7 | mantissa << 6, i.e. the e2m1 value times 2^-126 (exactly, the e = 0
// codes landing on bf16 subnormals); the kernel multiplies by the e4m3 scale times 2^119 in bf16
// (exact: at most 2 x 4 significant bits) and by the global scale times 2^7 after the MMA.
#include <algorithm>
#include <array>
#include <cstring>

#include "moelora/core/random.h"
#include "quant/experts_impl.h"

namespace moelora::quant {
namespace {

constexpr int64_t kRowTile = 16;
constexpr int64_t kKChunk = 64;
constexpr int64_t kFragBytes = 512;   // codes of one (mt, kc)
constexpr int64_t kScaleBytes = 64;   // scales of one (mt, kc)

// Bit positions (within a 16-bit half: sign, e1, e0, m) of the code feeding A register s; the
// high half (k + 1) uses the same positions + 16. Must match the kernel's dequant.
constexpr std::array<std::array<int, 4>, 4> kNibbleBits = {{
    {15, 8, 7, 6}, {12, 5, 4, 3}, {9, 2, 1, 0}, {14, 13, 11, 10}}};

struct Geometry {
  int64_t n, k, np, kp, mt, kc;
};
Geometry geometry(int64_t n, int64_t k) {
  Geometry g{n, k, 0, 0, 0, 0};
  g.np = (n + kRowTile - 1) / kRowTile * kRowTile;
  g.kp = (k + kKChunk - 1) / kKChunk * kKChunk;
  g.mt = g.np / kRowTile;
  g.kc = g.kp / kKChunk;
  return g;
}

// (row, col) of register s, half h, of lane l, K step j in fragment (mt, kc).
inline void fragment_pos(int64_t mt, int64_t kc, int lane, int j, int s, int h, int64_t& row,
                         int64_t& col) {
  row = mt * kRowTile + lane / 4 + ((s & 1) ? 8 : 0);
  col = kc * kKChunk + 16 * j + 2 * (lane % 4) + ((s & 2) ? 8 : 0) + h;
}

inline uint32_t place_code(uint8_t code, int s, int h) {
  const auto& b = kNibbleBits[size_t(s)];
  const int off = 16 * h;
  return (uint32_t((code >> 3) & 1u) << (b[0] + off)) | (uint32_t((code >> 2) & 1u) << (b[1] + off)) |
         (uint32_t((code >> 1) & 1u) << (b[2] + off)) | (uint32_t(code & 1u) << (b[3] + off));
}
inline uint8_t take_code(uint32_t word, int s, int h) {
  const auto& b = kNibbleBits[size_t(s)];
  const int off = 16 * h;
  auto bit = [&](int p) { return uint8_t((word >> (p + off)) & 1u); };
  return uint8_t(bit(b[0]) << 3 | bit(b[1]) << 2 | bit(b[2]) << 1 | bit(b[3]));
}

}  // namespace

// Folding of per-part weight_scale_2 (exact): when the parts of each group share their
// weight_scale_2, global_scale is f32 [G] (one per group); otherwise f32 [G, N] holds each row's own part's
// weight_scale_2 and the kernel scales each output row by it. e4m3 block scales are never
// rescaled (that would round), so dequantize_experts() equals dequantize_nvfp4() bit for bit.
ExpertMatrices pack_nvfp4_experts(const std::vector<std::vector<Nvfp4Tensors>>& parts,
                                  const std::string& name) {
  MOELORA_CHECK(!parts.empty(), "{}: expected at least one group of nvfp4 parts, found none",
                name);
  const int64_t groups = int64_t(parts.size());
  int64_t n = -1, k = -1;
  bool per_row = false;
  std::vector<std::vector<float>> gs(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g) {
    MOELORA_CHECK(!parts[size_t(g)].empty(), "{}: group {} has no parts", name, g);
    int64_t rows = 0;
    for (size_t p = 0; p < parts[size_t(g)].size(); ++p) {
      const std::string prefix = fmt::format("{}[{}].part{}", name, g, p);
      const QuantDims d = validate_nvfp4(parts[size_t(g)][p], prefix);
      if (k < 0) k = d.k;
      MOELORA_CHECK(d.k == k, "{}: every part must share K; {} has K = {}, expected {}", name,
                    prefix, d.k, k);
      const float s2 = parts[size_t(g)][p].weight_scale_2.data<float>()[0];
      rows += d.n;
      gs[size_t(g)].push_back(s2);
    }
    if (n < 0) n = rows;
    MOELORA_CHECK(rows == n, "{}: group {} stacks {} rows, group 0 stacks {}", name, g, rows, n);
  }
  for (const auto& v : gs)
    for (float s : v) per_row |= s != v[0];  // parts of one group differ
  const Geometry geo = geometry(n, k);

  ExpertMatrices m;
  m.format = WeightFormat::nvfp4;
  m.groups = groups;
  m.n = n;
  m.k = k;
  m.group_k = kNvfp4GroupSize;
  m.group_n = 1;
  m.w = Tensor::zeros({groups, geo.np, geo.kp / 2}, DType::u8);
  m.scales = Tensor::zeros({groups, geo.np, geo.kp / kNvfp4GroupSize}, DType::f8_e4m3);
  m.global_scale = per_row ? Tensor::empty({groups, n}, DType::f32)
                           : Tensor::empty({groups}, DType::f32);
  uint8_t* w = m.w.data<uint8_t>();
  auto* sc = reinterpret_cast<uint8_t*>(m.scales.data());
  float* gsp = m.global_scale.data<float>();

  // Source (part, row within it) of each stacked row.
  for (int64_t g = 0; g < groups; ++g) {
    const auto& gp = parts[size_t(g)];
    std::vector<std::pair<size_t, int64_t>> src(static_cast<size_t>(n));
    {
      int64_t r = 0;
      for (size_t p = 0; p < gp.size(); ++p)
        for (int64_t i = 0; i < gp[p].weight.size(0); ++i) src[size_t(r++)] = {p, i};
    }
    if (per_row)
      for (int64_t r = 0; r < n; ++r) gsp[g * n + r] = gs[size_t(g)][src[size_t(r)].first];
    else
      gsp[g] = gs[size_t(g)][0];
    for (int64_t mt = 0; mt < geo.mt; ++mt)
      for (int64_t kc = 0; kc < geo.kc; ++kc) {
        const int64_t frag = (g * geo.mt + mt) * geo.kc + kc;
        for (int lane = 0; lane < 32; ++lane)
          for (int j = 0; j < 4; ++j) {
            uint32_t word = 0;
            for (int s = 0; s < 4; ++s)
              for (int h = 0; h < 2; ++h) {
                int64_t row = 0, col = 0;
                fragment_pos(mt, kc, lane, j, s, h, row, col);
                if (row >= n || col >= k) continue;
                const auto [p, r] = src[size_t(row)];
                word |= place_code(nvfp4_code(gp[p], r, col), s, h);
              }
            std::memcpy(w + frag * kFragBytes + lane * 16 + j * 4, &word, 4);
          }
        for (int q = 0; q < 8; ++q)
          for (int j = 0; j < 4; ++j)
            for (int h = 0; h < 2; ++h) {
              const int64_t row = mt * kRowTile + q + 8 * h;
              const int64_t blk = kc * 4 + j;
              if (row >= n || blk * kNvfp4GroupSize >= k) continue;
              const auto [p, r] = src[size_t(row)];
              const Tensor& s = gp[p].weight_scale;
              sc[frag * kScaleBytes + q * 8 + j * 2 + h] =
                  reinterpret_cast<const uint8_t*>(s.data())[r * s.size(1) + blk];
            }
      }
  }
  return m;
}

namespace detail {

ExpertMatrices quantize_nvfp4_experts(const Tensor& w, const QuantizeOptions& opt) {
  MOELORA_CHECK(opt.group_size == kNvfp4GroupSize,
                "quantize_experts: nvfp4 has group size 16, found group_size {}",
                opt.group_size);
  std::vector<std::vector<Nvfp4Tensors>> parts;
  for (int64_t g = 0; g < w.size(0); ++g) {
    const Tensor wg = w.narrow(0, g, 1).view({w.size(1), w.size(2)});
    parts.push_back({quantize_nvfp4(wg)});
  }
  return pack_nvfp4_experts(parts, "quantize_experts(nvfp4)");
}

Tensor dequantize_nvfp4_experts(const ExpertMatrices& m) {
  const Geometry geo = geometry(m.n, m.k);
  MOELORA_CHECK(m.w.dtype() == DType::u8 && m.w.numel() == m.groups * geo.np * geo.kp / 2,
                "dequantize_experts(nvfp4): expected u8 codes [{}, {}, {}], found {}", m.groups,
                geo.np, geo.kp / 2, m.w.describe());
  MOELORA_CHECK(m.scales.dtype() == DType::f8_e4m3 &&
                    m.scales.numel() == m.groups * geo.np * geo.kp / kNvfp4GroupSize,
                "dequantize_experts(nvfp4): expected e4m3 scales [{}, {}, {}], found {}",
                m.groups, geo.np, geo.kp / kNvfp4GroupSize, m.scales.describe());
  const bool per_row = m.global_scale.numel() == m.groups * m.n && m.global_scale.dim() == 2;
  MOELORA_CHECK(m.global_scale.dtype() == DType::f32 &&
                    (per_row || m.global_scale.numel() == m.groups),
                "dequantize_experts(nvfp4): expected f32 global_scale [{}] or [{}, {}], found {}",
                m.groups, m.groups, m.n, m.global_scale.describe());
  const uint8_t* w = m.w.data<uint8_t>();
  const auto* sc = reinterpret_cast<const uint8_t*>(m.scales.data());
  const float* gsp = m.global_scale.data<float>();
  Tensor out = Tensor::empty({m.groups, m.n, m.k}, DType::f32);
  float* o = out.data<float>();
  for (int64_t g = 0; g < m.groups; ++g)
    for (int64_t mt = 0; mt < geo.mt; ++mt)
      for (int64_t kc = 0; kc < geo.kc; ++kc) {
        const int64_t frag = (g * geo.mt + mt) * geo.kc + kc;
        for (int lane = 0; lane < 32; ++lane)
          for (int j = 0; j < 4; ++j) {
            uint32_t word = 0;
            std::memcpy(&word, w + frag * kFragBytes + lane * 16 + j * 4, 4);
            for (int s = 0; s < 4; ++s)
              for (int h = 0; h < 2; ++h) {
                int64_t row = 0, col = 0;
                fragment_pos(mt, kc, lane, j, s, h, row, col);
                if (row >= m.n || col >= m.k) continue;
                const uint8_t sbits =
                    sc[frag * kScaleBytes + (lane / 4) * 8 + j * 2 + ((s & 1) ? 1 : 0)];
                const float s2 = per_row ? gsp[g * m.n + row] : gsp[g];
                // The expression of dequantize_nvfp4, so the values agree bit for bit.
                o[(g * m.n + row) * m.k + col] =
                    e2m1_to_float(take_code(word, s, h)) * (f8e4m3_to_float(f8e4m3_t{sbits}) * s2);
              }
          }
      }
  return out;
}

ExpertMatrices random_nvfp4_experts(int64_t groups, int64_t n, int64_t k, float amax,
                                    uint64_t seed, Device device, const Stream& stream) {
  MOELORA_CHECK(groups > 0 && n > 0 && k > 0 && k % kNvfp4GroupSize == 0,
                "random_experts(nvfp4): expected groups, N > 0 and K a positive multiple of 16, "
                "found [{}, {}, {}]", groups, n, k);
  MOELORA_CHECK(amax > 0.0f, "random_experts(nvfp4): amax must be > 0, found {}", amax);
  const Geometry geo = geometry(n, k);
  ExpertMatrices m;
  m.format = WeightFormat::nvfp4;
  m.groups = groups;
  m.n = n;
  m.k = k;
  m.group_k = kNvfp4GroupSize;
  m.w = Tensor::empty({groups, geo.np, geo.kp / 2}, DType::u8, device);
  m.scales = Tensor::empty({groups, geo.np, geo.kp / kNvfp4GroupSize}, DType::f8_e4m3, device);
  m.global_scale = Tensor::empty({groups}, DType::f32, device);
  fill_random_bits(m.w, seed, stream);
  // Block scales spread over e4m3's upper range, the global scale as ModelOpt sets it
  // (amax / (6 * 448)): weights of magnitude up to ~amax. Padding holds finite junk, which
  // the kernels multiply by zero-filled activations (K) or never store (N).
  fill_uniform(m.scales, seed + 1, 16.0f, 448.0f, stream);
  const float s2 = amax / (kE2m1Max * 448.0f);
  fill_uniform(m.global_scale, seed + 2, s2, s2, stream);
  return m;
}

}  // namespace detail
}  // namespace moelora::quant
