#include "model/expert_loader.h"

#include "moelora/quant/experts.h"

namespace moelora {
namespace {

// Module names of one stack: parts[g] are stacked along N in group g.
using StackParts = std::vector<std::vector<std::string>>;

template <typename T, typename Get>
std::vector<std::vector<T>> select(const std::vector<std::vector<QuantizedLinear>>& q, Get get) {
  std::vector<std::vector<T>> out(q.size());
  for (size_t g = 0; g < q.size(); ++g)
    for (const QuantizedLinear& m : q[g]) out[g].push_back(get(m));
  return out;
}

ExpertMatrices pack_quantized(const std::vector<std::vector<QuantizedLinear>>& q,
                              const quant::QuantScheme& s, const std::string& name) {
  switch (s.method) {
    case quant::QuantMethod::gptq:
      return quant::pack_gptq_experts(
          select<quant::GptqTensors>(q, [](const QuantizedLinear& m) { return m.gptq; }), s.gptq,
          name);
    case quant::QuantMethod::awq:
      return quant::pack_awq_experts(
          select<quant::AwqTensors>(q, [](const QuantizedLinear& m) { return m.awq; }), s.awq,
          name);
    case quant::QuantMethod::ct_pack:
      return quant::pack_ct_experts(
          select<quant::CtPackTensors>(q, [](const QuantizedLinear& m) { return m.ct; }), s.ct,
          name);
    case quant::QuantMethod::fp8_block:
      return quant::pack_fp8_block_experts(
          select<quant::Fp8BlockTensors>(q, [](const QuantizedLinear& m) { return m.fp8; }),
          s.fp8, name);
    case quant::QuantMethod::nvfp4:
      return quant::pack_nvfp4_experts(
          select<quant::Nvfp4Tensors>(q, [](const QuantizedLinear& m) { return m.nvfp4; }),
          name);
  }
  MOELORA_THROW("{}: unknown quantization method", name);
}

// One stack [groups, sum(part_n), k] from per-module Linear weights (module `parts[g][i]` is
// logically [part_n[i], k]), float or quantized as the first module is; every module must be
// stored the same way.
ExpertMatrices load_stack(WeightLoader& wl, const StackParts& parts,
                          const std::vector<int64_t>& part_n, int64_t k,
                          const std::string& name) {
  const bool quantized = wl.is_quantized(parts[0][0]);
  for (const auto& group : parts)
    for (const std::string& m : group)
      MOELORA_CHECK(wl.is_quantized(m) == quantized,
                    "checkpoint {}: {} mixes quantized and float experts: '{}' is {}, '{}' is "
                    "{} (one layer's experts must share one format)",
                    wl.dir(), name, parts[0][0], quantized ? "quantized" : "float", m,
                    quantized ? "float" : "quantized");
  const int64_t G = int64_t(parts.size());
  int64_t N = 0;
  for (int64_t n : part_n) N += n;
  if (!quantized) {
    Tensor w = Tensor::empty({G, N, k}, DType::bf16);
    for (int64_t g = 0; g < G; ++g) {
      int64_t row = 0;
      for (size_t i = 0; i < part_n.size(); ++i) {
        wl.copy_into(parts[size_t(g)][i] + ".weight", {part_n[i], k}, w, (g * N + row) * k);
        row += part_n[i];
      }
    }
    return ExpertMatrices(w);
  }
  std::vector<std::vector<QuantizedLinear>> q(parts.size());
  for (size_t g = 0; g < parts.size(); ++g)
    for (size_t i = 0; i < part_n.size(); ++i)
      q[g].push_back(wl.quantized(parts[g][i], part_n[i], k));
  return pack_quantized(q, *wl.quant_scheme(), name);
}

ExpertMatrices on_device(ExpertMatrices m, Device device) {
  return m.device() == device ? m : m.to(device);
}

// The routed stacks only (MoeWeights::validate also wants the shared expert of a shape that
// has one, which load_shared_experts adds).
void validate_routed(const MoeWeights& w, const MoeShape& s, const std::string& name) {
  w.w13.validate(s.num_experts, 2 * int64_t(s.inter), s.hidden, name + " gate/up");
  w.w2.validate(s.num_experts, s.hidden, s.inter, name + " down");
}

}  // namespace

MoeWeights load_routed_experts(WeightLoader& wl, const std::string& experts_prefix,
                               const ExpertNames& names, const MoeShape& shape, Device device) {
  const int64_t E = shape.num_experts, H = shape.hidden, I = shape.inter;
  MoeWeights w;
  if (wl.random()) {
    w.w13 = on_device(wl.random_experts(experts_prefix + ".gate_up", E, 2 * I, H), device);
    w.w2 = on_device(wl.random_experts(experts_prefix + ".down", E, H, I), device);
    w.format = w.w13.format;
    validate_routed(w, shape, experts_prefix);
    return w;
  }
  std::vector<std::string> fused = {experts_prefix};
  fused.insert(fused.end(), names.fused_prefixes.begin(), names.fused_prefixes.end());
  bool found_fused = false;
  for (const std::string& p : fused) {
    if (!wl.has(p + ".gate_up_proj")) continue;
    w.w13 = ExpertMatrices(wl.bf16(p + ".gate_up_proj", {E, 2 * I, H}));
    w.w2 = ExpertMatrices(wl.bf16(p + ".down_proj", {E, H, I}));
    found_fused = true;
    break;
  }
  if (!found_fused) {
    StackParts p13(static_cast<size_t>(E)), p2(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      const std::string ep = fmt::format("{}.{}.", experts_prefix, e);
      p13[size_t(e)] = {ep + names.proj[0], ep + names.proj[1]};
      p2[size_t(e)] = {ep + names.proj[2]};
    }
    w.w13 = load_stack(wl, p13, {I, I}, H, experts_prefix + " gate/up");
    w.w2 = load_stack(wl, p2, {H}, I, experts_prefix + " down");
  }
  MOELORA_CHECK(w.w13.format == w.w2.format,
                "checkpoint {}: {}: gate/up experts are {} but down experts are {} (one layer's "
                "experts must share one format)",
                wl.dir(), experts_prefix, format_name(w.w13.format), format_name(w.w2.format));
  w.format = w.w13.format;
  w.w13 = on_device(std::move(w.w13), device);
  w.w2 = on_device(std::move(w.w2), device);
  validate_routed(w, shape, experts_prefix);
  return w;
}

void load_shared_experts(WeightLoader& wl, const std::string& module_prefix,
                         const ExpertNames& names, const MoeShape& shape, Device device,
                         MoeWeights& w) {
  const int64_t H = shape.hidden, Is = shape.shared_inter;
  MOELORA_CHECK(Is > 0, "{}: shape '{}' has no shared expert", module_prefix, shape.name);
  ExpertMatrices s13, s2;
  if (wl.random()) {
    s13 = wl.random_experts(module_prefix + ".gate_up", 1, 2 * Is, H);
    s2 = wl.random_experts(module_prefix + ".down", 1, H, Is);
  } else {
    const std::string p = module_prefix + ".";
    s13 = load_stack(wl, {{p + names.proj[0], p + names.proj[1]}}, {Is, Is}, H,
                     module_prefix + " gate/up");
    s2 = load_stack(wl, {{p + names.proj[2]}}, {H}, Is, module_prefix + " down");
  }
  MOELORA_CHECK(s13.format == w.format && s2.format == w.format,
                "checkpoint {}: shared expert '{}' is stored as {} / {} but the routed experts "
                "are {}; the MoE layer runs one weight format",
                wl.dir(), module_prefix, format_name(s13.format), format_name(s2.format),
                format_name(w.format));
  w.shared_w13 = on_device(std::move(s13), device);
  w.shared_w2 = on_device(std::move(s2), device);
  w.validate(shape);
}

}  // namespace moelora
