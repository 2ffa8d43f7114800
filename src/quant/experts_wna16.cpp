// int4 / int8 expert stacks for cuda_wna16: GPTQ, AWQ and compressed-tensors checkpoints
// repacked into the kernel's layout, its dequantizer, quantizer and random stacks.
//
// Packed layout (ExpertMatrices of format int4 / int8; n, k are the LOGICAL sizes):
//   w       i32 [G, Np/16, Kp/TK, 128]  Np = padded_n(n) (a multiple of 16), TK = 64 for int4
//           and 32 for int8, Kp = padded_k(k) (a multiple of TK). Tile (g, rt, kt) covers rows
//           16 rt .. +16 and packed columns TK kt .. +TK; its 128 words are 32 lanes x 4 words,
//           lane l's four words being the A fragments of mma.m16n8k16 (rows on M) of lane l for
//           that tile, codes ordered as wna16_layout.h says. Codes are UNSIGNED (0 .. 2^bits-1);
//           padding rows / columns hold code 0 (the kernel zero-fills the activation columns
//           past k and never stores rows past n).
//   scales  f32 [G, K/group_k, Np]     the checkpoint's scale of (group, row), widened exactly
//           (f16/bf16 -> f32) so that dequantization is bit-identical to the format's
//           dequantizer; padding rows hold 0.
//   zeros   f32 [G, K/group_k, Np]     asymmetric only: the zero point z of the unsigned code,
//           an integer (GPTQ v1's stored zero + 1 may reach 2^bits; compressed-tensors' signed
//           zero + 2^(bits-1)). Symmetric stacks have none: z = 2^(bits-1).
//   perm    i32 [G, k]                 act-order only: packed column i holds input channel
//           perm[g, i]; channels are sorted by group so that group j is the packed columns
//           j * group_k .. +group_k. Without perm, packed column i is channel i.
//   group_k the group size (k for per-channel).
// w[g, n, perm[i]] = scales[g, i / group_k, n] * (code(g, n, i) - z(g, i / group_k, n)).
// Parts of a group (gate, up) stack along N; act-order parts must share g_idx.
#include <algorithm>
#include <numeric>
#include <random>

#include "moelora/core/random.h"
#include "quant/experts_impl.h"
#include "quant/quant_util.h"
#include "quant/wna16_layout.h"

namespace moelora::quant {
namespace {

using namespace wna16;

// One expert of the common intermediate: unsigned codes [N, K] in CHANNEL order, scales and
// zeros [num_groups, N], and the group of each channel.
struct IntExpert {
  std::vector<uint8_t> code;
  std::vector<float> scale;
  std::vector<float> zero;      // asymmetric only
  std::vector<int32_t> g_idx;   // [K]
};

// What every part of every group must agree on.
struct IntSpec {
  int bits = 0;
  int64_t k = 0, group_k = 0, num_groups = 0;
  bool asym = false;
};

ExpertMatrices allocate_stack(const IntSpec& s, int64_t groups, int64_t n, bool act_order) {
  ExpertMatrices m;
  m.format = s.bits == 4 ? WeightFormat::int4 : WeightFormat::int8;
  m.groups = groups;
  m.n = n;
  m.k = s.k;
  m.group_k = s.group_k;
  m.group_n = 1;
  const int64_t np = padded_n(n), kp = padded_k(s.k, s.bits);
  m.w = Tensor::zeros({groups, np / kTileRows, kp / tile_k(s.bits), kTileWords}, DType::i32);
  m.scales = Tensor::zeros({groups, s.num_groups, np}, DType::f32);
  if (s.asym) m.zeros = Tensor::zeros({groups, s.num_groups, np}, DType::f32);
  if (act_order) m.perm = Tensor::empty({groups, s.k}, DType::i32);
  return m;
}

// Writes expert g (n rows) into the packed stack. `perm` (packed column -> channel) is empty
// unless the stack is act-order.
void put_expert(ExpertMatrices& m, int64_t g, const IntExpert& e, const std::vector<int32_t>& perm,
                const std::string& name) {
  const int bits = m.format == WeightFormat::int4 ? 4 : 8;
  const int64_t n = m.n, k = m.k, gk = m.group_k, np = padded_n(n), kp = padded_k(k, bits);
  const int64_t ng = k / gk, tk = tile_k(bits), k_tiles = kp / tk;
  auto channel = [&](int64_t i) { return perm.empty() ? i : int64_t(perm[size_t(i)]); };
  if (!perm.empty()) {
    // The kernel takes group i / group_k for packed column i: the groups must be uniform.
    for (int64_t i = 0; i < k; ++i)
      MOELORA_CHECK(e.g_idx[size_t(channel(i))] == i / gk,
                    "{}: group {}: g_idx assigns group {} to channel {}, but a layout with "
                    "uniform groups of {} needs group {} there (uneven act-order groups are not "
                    "supported by cuda_wna16)",
                    name, g, e.g_idx[size_t(channel(i))], channel(i), gk, i / gk);
    std::copy(perm.begin(), perm.end(), m.perm.data<int32_t>() + g * k);
  }
  auto code_at = [&](int64_t row, int64_t col) -> uint32_t {
    if (row >= n || col >= k) return 0;
    return e.code[size_t(row * k + channel(col))];
  };
  uint32_t* w = reinterpret_cast<uint32_t*>(m.w.data<int32_t>()) + g * (np / kTileRows) * k_tiles *
                                                                      kTileWords;
  for (int64_t rt = 0; rt < np / kTileRows; ++rt)
    for (int64_t kt = 0; kt < k_tiles; ++kt, w += kTileWords)
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t r = rt * kTileRows + lane / 4, c = kt * tk + 2 * (lane % 4);
        for (int j = 0; j < 4; ++j) {
          uint32_t word = 0;
          if (bits == 4) {
            for (int i = 0; i < 8; ++i)
              word |= code_at(r + kInt4Row[i], c + 16 * j + kInt4Col[i]) << (4 * i);
          } else {
            const int64_t c0 = c + 16 * (j / 2) + 8 * (j % 2);
            for (int i = 0; i < 4; ++i)
              word |= code_at(r + kInt8Row[i], c0 + kInt8Col[i]) << (8 * i);
          }
          w[lane * 4 + j] = word;
        }
      }
  float* s = m.scales.data<float>() + g * ng * np;
  float* z = m.zeros.defined() ? m.zeros.data<float>() + g * ng * np : nullptr;
  for (int64_t j = 0; j < ng; ++j)
    for (int64_t r = 0; r < n; ++r) {
      s[j * np + r] = e.scale[size_t(j * n + r)];
      if (z) z[j * np + r] = e.zero[size_t(j * n + r)];
    }
}

// The common part of the three pack functions: `read(g, p, spec_out, expert, row0)` validates
// part p of group g, checks/sets the spec and appends its rows to the expert (rows row0 ..).
template <class Part, class Read>
ExpertMatrices pack_parts(const std::vector<std::vector<Part>>& parts, const std::string& name,
                          Read read) {
  MOELORA_CHECK(!parts.empty(), "{}: no expert groups given", name);
  const int64_t groups = int64_t(parts.size());
  ExpertMatrices m;
  IntSpec spec;
  int64_t n_total = -1;
  bool act_order = false;
  std::vector<IntExpert> experts(static_cast<size_t>(groups));
  std::vector<std::vector<int32_t>> perms(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g) {
    MOELORA_CHECK(!parts[size_t(g)].empty(), "{}: group {} has no parts", name, g);
    int64_t rows = 0;
    const Tensor* g_idx_first = nullptr;
    for (size_t p = 0; p < parts[size_t(g)].size(); ++p) {
      const std::string prefix = fmt::format("{}[{}][{}]", name, g, p);
      const Tensor* g_idx = nullptr;
      const int64_t part_rows = read(parts[size_t(g)][p], prefix, spec, experts[size_t(g)], rows,
                                     g_idx);
      // Act-order: every part of the group must use the same channel order.
      if (g_idx != nullptr) {
        const ActOrder a =
            act_order_from_g_idx(*g_idx, spec.k, spec.num_groups, spec.group_k, prefix + " g_idx");
        if (!a.monotonic) act_order = true;
        if (g_idx_first == nullptr) {
          g_idx_first = g_idx;
          perms[size_t(g)] = a.perm;
        } else {
          const int32_t* x = g_idx_first->data<int32_t>();
          const int32_t* y = g_idx->data<int32_t>();
          for (int64_t c = 0; c < spec.k; ++c)
            MOELORA_CHECK(x[c] == y[c],
                          "{}: g_idx differs from part 0 of group {} at channel {} ({} vs {}): "
                          "parts stacked into one matrix must share their act-order",
                          prefix, g, c, y[c], x[c]);
        }
      } else if (g_idx_first != nullptr) {
        MOELORA_THROW("{}: has no g_idx but part 0 of group {} has one: parts stacked into one "
                      "matrix must share their act-order", prefix, g);
      }
      rows += part_rows;
    }
    if (n_total < 0) n_total = rows;
    MOELORA_CHECK(rows == n_total, "{}: group {} stacks N = {} rows, group 0 stacks {}", name, g,
                  rows, n_total);
  }
  m = allocate_stack(spec, groups, n_total, act_order);
  for (int64_t g = 0; g < groups; ++g) {
    std::vector<int32_t> perm;
    if (act_order) {
      perm = perms[size_t(g)];
      if (perm.empty()) {
        perm.resize(size_t(spec.k));
        std::iota(perm.begin(), perm.end(), 0);
      }
    }
    put_expert(m, g, experts[size_t(g)], perm, name);
  }
  return m;
}

// Checks one part's dims against the stack's spec (set by the first part) and grows the
// expert's arrays for its rows.
void add_part_dims(const QuantDims& d, bool asym, const std::string& prefix, IntSpec& spec,
                   IntExpert& e, int64_t row0) {
  if (spec.bits == 0) {
    spec = IntSpec{d.bits, d.k, d.group_size, d.num_groups, asym};
  } else {
    MOELORA_CHECK(d.bits == spec.bits && d.k == spec.k && d.group_size == spec.group_k &&
                      asym == spec.asym,
                  "{}: expected {}-bit K = {} group {} {} like the first part, found {}-bit K = "
                  "{} group {} {}",
                  prefix, spec.bits, spec.k, spec.group_k, spec.asym ? "asymmetric" : "symmetric",
                  d.bits, d.k, d.group_size, asym ? "asymmetric" : "symmetric");
  }
  const int64_t rows = row0 + d.n;
  // Grow [num_groups, N] arrays row-block-wise: rebuild with the new N.
  auto grow = [&](std::vector<float>& v) {
    std::vector<float> out(size_t(spec.num_groups * rows), 0.0f);
    for (int64_t j = 0; j < spec.num_groups; ++j)
      for (int64_t r = 0; r < row0; ++r) out[size_t(j * rows + r)] = v[size_t(j * row0 + r)];
    v.swap(out);
  };
  grow(e.scale);
  if (asym) grow(e.zero);
  e.code.resize(size_t(rows * spec.k));
  if (e.g_idx.empty()) {
    e.g_idx.resize(size_t(spec.k));
    for (int64_t c = 0; c < spec.k; ++c) e.g_idx[size_t(c)] = int32_t(c / spec.group_k);
  }
}

}  // namespace

ExpertMatrices pack_gptq_experts(const std::vector<std::vector<GptqTensors>>& parts,
                                 const GptqConfig& cfg, const std::string& name) {
  return pack_parts(parts, name, [&](const GptqTensors& t, const std::string& prefix,
                                     IntSpec& spec, IntExpert& e, int64_t row0,
                                     const Tensor*& g_idx) {
    const QuantDims d = validate_gptq(t, cfg, prefix);
    add_part_dims(d, !cfg.sym, prefix, spec, e, row0);
    const int64_t rows = row0 + d.n;
    if (t.g_idx.defined()) {
      g_idx = &t.g_idx;
      std::copy_n(t.g_idx.data<int32_t>(), d.k, e.g_idx.begin());
    }
    for (int64_t r = 0; r < d.n; ++r)
      for (int64_t c = 0; c < d.k; ++c)
        e.code[size_t((row0 + r) * d.k + c)] = uint8_t(gptq_q(t, d.bits, r, c));
    for (int64_t j = 0; j < d.num_groups; ++j)
      for (int64_t r = 0; r < d.n; ++r) {
        e.scale[size_t(j * rows + row0 + r)] = float_at(t.scales, j * d.n + r);
        if (!cfg.sym) e.zero[size_t(j * rows + row0 + r)] = float(gptq_zero(t, cfg, j, r));
      }
    return d.n;
  });
}

ExpertMatrices pack_awq_experts(const std::vector<std::vector<AwqTensors>>& parts,
                                const AwqConfig& cfg, const std::string& name) {
  return pack_parts(parts, name, [&](const AwqTensors& t, const std::string& prefix,
                                     IntSpec& spec, IntExpert& e, int64_t row0,
                                     const Tensor*& /*g_idx*/) {
    const QuantDims d = validate_awq(t, cfg, prefix);
    add_part_dims(d, true, prefix, spec, e, row0);
    const int64_t rows = row0 + d.n;
    for (int64_t r = 0; r < d.n; ++r)
      for (int64_t c = 0; c < d.k; ++c)
        e.code[size_t((row0 + r) * d.k + c)] = uint8_t(awq_q(t, r, c));
    for (int64_t j = 0; j < d.num_groups; ++j)
      for (int64_t r = 0; r < d.n; ++r) {
        e.scale[size_t(j * rows + row0 + r)] = float_at(t.scales, j * d.n + r);
        e.zero[size_t(j * rows + row0 + r)] = float(awq_zero(t, j, r));
      }
    return d.n;
  });
}

ExpertMatrices pack_ct_experts(const std::vector<std::vector<CtPackTensors>>& parts,
                               const CtPackConfig& cfg, const std::string& name) {
  return pack_parts(parts, name, [&](const CtPackTensors& t, const std::string& prefix,
                                     IntSpec& spec, IntExpert& e, int64_t row0,
                                     const Tensor*& g_idx) {
    const QuantDims d = validate_ct_pack(t, cfg, prefix);
    add_part_dims(d, !cfg.symmetric, prefix, spec, e, row0);
    const int64_t rows = row0 + d.n;
    const int offset = 1 << (d.bits - 1);  // signed q -> unsigned code
    if (t.weight_g_idx.defined()) {
      g_idx = &t.weight_g_idx;
      std::copy_n(t.weight_g_idx.data<int32_t>(), d.k, e.g_idx.begin());
    }
    for (int64_t r = 0; r < d.n; ++r)
      for (int64_t c = 0; c < d.k; ++c)
        e.code[size_t((row0 + r) * d.k + c)] = uint8_t(ct_q(t, d.bits, r, c) + offset);
    for (int64_t j = 0; j < d.num_groups; ++j)
      for (int64_t r = 0; r < d.n; ++r) {
        e.scale[size_t(j * rows + row0 + r)] = float_at(t.weight_scale, r * d.num_groups + j);
        if (!cfg.symmetric)
          e.zero[size_t(j * rows + row0 + r)] = float(ct_zero(t, cfg, r, j) + offset);
      }
    return d.n;
  });
}

namespace detail {

ExpertMatrices quantize_int_experts(const Tensor& w, const QuantizeOptions& opt) {
  const int bits = opt.format == WeightFormat::int4 ? 4 : 8;
  const int64_t groups = w.size(0), n = w.size(1), k = w.size(2);
  std::mt19937_64 rng(opt.seed);
  auto act_perm = [&]() {
    std::vector<int32_t> perm(static_cast<size_t>(k));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    return perm;
  };
  switch (opt.source) {
    case IntSource::gptq: {
      GptqConfig cfg;
      cfg.bits = bits;
      cfg.group_size = opt.group_size;
      cfg.sym = opt.sym;
      cfg.desc_act = opt.act_order;
      std::vector<std::vector<GptqTensors>> parts(static_cast<size_t>(groups));
      for (int64_t g = 0; g < groups; ++g)
        parts[size_t(g)] = {quantize_gptq(w.narrow(0, g, 1).view({n, k}), cfg,
                                          opt.act_order ? act_perm() : std::vector<int32_t>{})};
      return pack_gptq_experts(parts, cfg, "quantize_experts");
    }
    case IntSource::awq: {
      MOELORA_CHECK(bits == 4, "quantize_experts: AWQ stores int4 only, asked for int8");
      MOELORA_CHECK(!opt.sym && !opt.act_order,
                    "quantize_experts: AWQ is asymmetric without act-order (set sym = false, "
                    "act_order = false)");
      AwqConfig cfg;
      cfg.group_size = opt.group_size;
      std::vector<std::vector<AwqTensors>> parts(static_cast<size_t>(groups));
      for (int64_t g = 0; g < groups; ++g)
        parts[size_t(g)] = {quantize_awq(w.narrow(0, g, 1).view({n, k}), cfg)};
      return pack_awq_experts(parts, cfg, "quantize_experts");
    }
    case IntSource::ct: {
      MOELORA_CHECK(!opt.act_order,
                    "quantize_experts: act-order is quantized through GPTQ (source gptq); the "
                    "compressed-tensors quantizer has no act-order");
      CtPackConfig cfg;
      cfg.bits = bits;
      cfg.strategy = opt.group_size == -1 ? CtStrategy::channel : CtStrategy::group;
      cfg.group_size = opt.group_size;
      cfg.symmetric = opt.sym;
      std::vector<std::vector<CtPackTensors>> parts(static_cast<size_t>(groups));
      for (int64_t g = 0; g < groups; ++g)
        parts[size_t(g)] = {quantize_ct_pack(w.narrow(0, g, 1).view({n, k}), cfg)};
      return pack_ct_experts(parts, cfg, "quantize_experts");
    }
  }
  MOELORA_THROW("quantize_experts: unknown int source");
}

Tensor dequantize_int_experts(const ExpertMatrices& m) {
  const int bits = m.format == WeightFormat::int4 ? 4 : 8;
  const int64_t G = m.groups, n = m.n, k = m.k, gk = m.group_k;
  MOELORA_CHECK(gk > 0 && k % gk == 0, "dequantize_experts: group_k {} must divide K = {}", gk,
                k);
  const int64_t np = padded_n(n), kp = padded_k(k, bits), tk = tile_k(bits);
  const int64_t ng = k / gk, k_tiles = kp / tk;
  check_shape(m.w, {G, np / kTileRows, k_tiles, kTileWords}, "int expert stack w (packed)");
  check_shape(m.scales, {G, ng, np}, "int expert stack scales");
  if (m.zeros.defined()) check_shape(m.zeros, {G, ng, np}, "int expert stack zeros");
  if (m.perm.defined()) check_shape(m.perm, {G, k}, "int expert stack perm");
  Tensor out = Tensor::zeros({G, n, k}, DType::f32);
  float* o = out.data<float>();
  const float* s = m.scales.data<float>();
  const float* z = m.zeros.defined() ? m.zeros.data<float>() : nullptr;
  const int32_t* perm = m.perm.defined() ? m.perm.data<int32_t>() : nullptr;
  const auto* w = reinterpret_cast<const uint32_t*>(m.w.data<int32_t>());
  const int32_t sym_zero = 1 << (bits - 1);
  for (int64_t g = 0; g < G; ++g) {
    auto put = [&](int64_t row, int64_t col, uint32_t code) {
      if (row >= n || col >= k) return;
      const int64_t si = (g * ng + col / gk) * np + row;
      const int32_t zero = z ? int32_t(z[si]) : sym_zero;
      const int64_t ch = perm ? perm[g * k + col] : col;
      o[(g * n + row) * k + ch] = s[si] * float(int32_t(code) - zero);
    };
    for (int64_t rt = 0; rt < np / kTileRows; ++rt)
      for (int64_t kt = 0; kt < k_tiles; ++kt, w += kTileWords)
        for (int lane = 0; lane < 32; ++lane) {
          const int64_t r = rt * kTileRows + lane / 4, c = kt * tk + 2 * (lane % 4);
          for (int j = 0; j < 4; ++j) {
            const uint32_t word = w[lane * 4 + j];
            if (bits == 4) {
              for (int i = 0; i < 8; ++i)
                put(r + kInt4Row[i], c + 16 * j + kInt4Col[i], (word >> (4 * i)) & 15u);
            } else {
              const int64_t c0 = c + 16 * (j / 2) + 8 * (j % 2);
              for (int i = 0; i < 4; ++i)
                put(r + kInt8Row[i], c0 + kInt8Col[i], (word >> (8 * i)) & 255u);
            }
          }
        }
  }
  return out;
}

ExpertMatrices random_int_experts(WeightFormat format, int64_t groups, int64_t n, int64_t k,
                                  int64_t group_size, float amax, uint64_t seed, Device device,
                                  const Stream& stream) {
  const int bits = format == WeightFormat::int4 ? 4 : 8;
  MOELORA_CHECK(groups > 0 && n > 0 && k > 0,
                "random_experts: expected positive sizes, found groups {}, N {}, K {}", groups,
                n, k);
  const int64_t gk = group_size == -1 ? k : group_size;
  MOELORA_CHECK(gk == k || gk == 32 || gk == 64 || gk == 128,
                "random_experts: {} group size: supported 32, 64, 128 and -1 (per-channel), "
                "found {}", format_name(format), group_size);
  MOELORA_CHECK(k % gk == 0, "random_experts: group size {} must divide K = {}", gk, k);
  IntSpec spec{bits, k, gk, k / gk, false};
  ExpertMatrices m;
  m.format = format;
  m.groups = groups;
  m.n = n;
  m.k = k;
  m.group_k = gk;
  const int64_t np = padded_n(n), kp = padded_k(k, bits);
  m.w = Tensor::empty({groups, np / kTileRows, kp / tile_k(bits), kTileWords}, DType::i32, device);
  m.scales = Tensor::empty({groups, spec.num_groups, np}, DType::f32, device);
  fill_random_bits(m.w, seed, stream);
  // Symmetric codes span +-2^(bits-1) steps: scales of amax / 2^(bits-1) give weights ~amax.
  const float step = amax / float(1 << (bits - 1));
  fill_uniform(m.scales, seed + 1, 0.5f * step, step, stream);
  return m;
}

}  // namespace detail
}  // namespace moelora::quant
