#include "model/weight_loader.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "moelora/core/random.h"
#include "moelora/quant/experts.h"

namespace moelora {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  MOELORA_CHECK(in.good(), "{}: cannot open", p.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json parse_json(const fs::path& p) {
  json j = json::parse(read_text(p), nullptr, /*allow_exceptions=*/false);
  MOELORA_CHECK(!j.is_discarded() && j.is_object(), "{}: not a valid JSON object", p.string());
  return j;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The checkpoint's quantization: config.json quantization_config first (transformers writes
// it for every format it loads), then ModelOpt's and AutoGPTQ's standalone files.
std::optional<quant::QuantScheme> read_quant_scheme(const fs::path& root) {
  const fs::path config = root / "config.json";
  if (fs::exists(config) && parse_json(config).contains("quantization_config"))
    return quant::parse_quant_config(read_text(config), config.string());
  for (const char* name : {"hf_quant_config.json", "quantize_config.json"}) {
    const fs::path p = root / name;
    if (fs::exists(p)) return quant::parse_quant_config(read_text(p), p.string());
  }
  return std::nullopt;
}

Device parse_device(const std::string& s, const std::string& source) {
  if (s == "cpu") return Device::cpu();
  if (s == "cuda") return Device::cuda(0);
  if (s.rfind("cuda:", 0) == 0) {
    const std::string idx = s.substr(5);
    MOELORA_CHECK(!idx.empty() && idx.find_first_not_of("0123456789") == std::string::npos,
                  "{}: device: expected cpu, cuda or cuda:<index>, found '{}'", source, s);
    return Device::cuda(std::stoi(idx));
  }
  MOELORA_THROW("{}: device: expected cpu, cuda or cuda:<index>, found '{}'", source, s);
}

RandomWeights read_random_weights(const fs::path& p) {
  const json j = parse_json(p);
  RandomWeights r;
  const std::string src = p.string();
  try {
    r.seed = j.value("seed", uint64_t(0));
    r.experts_format = parse_weight_format(j.value("experts_format", std::string("bf16")));
    r.group_size = j.value("group_size", int64_t(0));
    r.device = parse_device(j.value("device", std::string("cpu")), src);
  } catch (const json::exception& e) {
    MOELORA_THROW("{}: {}", src, e.what());
  }
  MOELORA_CHECK(r.device.is_cpu() || built_with_cuda(),
                "{}: device {} but this build of moelora has no CUDA backend", src,
                r.device.str());
  return r;
}

// Tensors of a quantized module: required suffixes, then optional ones.
struct QuantTensorNames {
  std::vector<const char*> required, optional;
};

QuantTensorNames quant_tensor_names(quant::QuantMethod m) {
  switch (m) {
    case quant::QuantMethod::gptq:
      return {{"qweight", "scales", "qzeros"}, {"g_idx"}};
    case quant::QuantMethod::awq:
      return {{"qweight", "qzeros", "scales"}, {}};
    case quant::QuantMethod::ct_pack:
      return {{"weight_packed", "weight_scale", "weight_shape"},
              {"weight_zero_point", "weight_g_idx"}};
    case quant::QuantMethod::fp8_block:
      return {{"weight", "weight_scale_inv"}, {}};
    case quant::QuantMethod::nvfp4:
      return {{"weight", "weight_scale", "weight_scale_2"}, {"input_scale"}};
  }
  return {};
}

Tensor dequantize(const QuantizedLinear& q, const quant::QuantScheme& s) {
  switch (q.method) {
    case quant::QuantMethod::gptq:
      return quant::dequantize_gptq(q.gptq, s.gptq, q.module);
    case quant::QuantMethod::awq:
      return quant::dequantize_awq(q.awq, s.awq, q.module);
    case quant::QuantMethod::ct_pack:
      return quant::dequantize_ct_pack(q.ct, s.ct, q.module);
    case quant::QuantMethod::fp8_block:
      return quant::dequantize_fp8_block(q.fp8, s.fp8, q.module);
    case quant::QuantMethod::nvfp4:
      return quant::dequantize_nvfp4(q.nvfp4, q.module);
  }
  MOELORA_THROW("{}: unknown quantization method", q.module);
}

}  // namespace

void write_random_weights(const std::string& dir, const RandomWeights& r) {
  json j;
  j["seed"] = r.seed;
  j["experts_format"] = format_name(r.experts_format);
  j["group_size"] = r.group_size;
  j["device"] = r.device.str();
  const fs::path p = fs::path(dir) / kRandomWeightsFile;
  std::ofstream out(p, std::ios::binary);
  MOELORA_CHECK(out.good(), "{}: cannot write", p.string());
  out << j.dump(2) << "\n";
  MOELORA_CHECK(out.good(), "{}: write failed", p.string());
}

WeightLoader::WeightLoader(const std::string& dir, Progress progress)
    : dir_(dir), progress_(std::move(progress)) {
  const fs::path root(dir);
  if (fs::exists(root / kRandomWeightsFile)) {
    random_ = read_random_weights(root / kRandomWeightsFile);
    stream_ = Stream::create(random_->device);
    return;
  }
  ck_ = Checkpoint::open(dir);
  total_ = int64_t(ck_.names().size());
  scheme_ = read_quant_scheme(root);
}

void WeightLoader::mark_used(const std::string& name) {
  if (used_.insert(name).second && progress_) progress_(int64_t(used_.size()), total_, name);
}

uint64_t WeightLoader::seed_of(const std::string& name) const {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return h ^ (random_ ? random_->seed * 0x9E3779B97F4A7C15ull : 0);
}

void WeightLoader::fill_random(Tensor& t, const std::string& name, int64_t in_features) {
  if (in_features > 0) {
    const float a = 1.0f / std::sqrt(float(in_features));
    fill_uniform(t, seed_of(name), -a, a, stream_);
  } else {
    fill_uniform(t, seed_of(name), 0.9f, 1.1f, stream_);
  }
  stream_.synchronize();
}

bool WeightLoader::is_quantized(const std::string& module) const {
  if (!scheme_) return false;
  switch (scheme_->method) {
    case quant::QuantMethod::gptq:
    case quant::QuantMethod::awq:
      return ck_.contains(module + ".qweight");
    case quant::QuantMethod::ct_pack:
      return ck_.contains(module + ".weight_packed");
    case quant::QuantMethod::fp8_block:
      return ck_.contains(module + ".weight") && ck_.entry(module + ".weight").dtype == "F8_E4M3";
    case quant::QuantMethod::nvfp4:
      return ck_.contains(module + ".weight") && ck_.entry(module + ".weight").dtype == "U8";
  }
  return false;
}

WeightFormat WeightLoader::expert_format() const {
  MOELORA_CHECK(scheme_.has_value(), "checkpoint {}: not quantized", dir_);
  switch (scheme_->method) {
    case quant::QuantMethod::gptq:
      return scheme_->gptq.bits == 8 ? WeightFormat::int8 : WeightFormat::int4;
    case quant::QuantMethod::awq:
      return WeightFormat::int4;
    case quant::QuantMethod::ct_pack:
      return scheme_->ct.bits == 8 ? WeightFormat::int8 : WeightFormat::int4;
    case quant::QuantMethod::fp8_block:
      return WeightFormat::fp8_block;
    case quant::QuantMethod::nvfp4:
      return WeightFormat::nvfp4;
  }
  return WeightFormat::bf16;
}

QuantizedLinear WeightLoader::quantized(const std::string& module, int64_t n, int64_t k) {
  MOELORA_CHECK(scheme_.has_value(), "checkpoint {}: module '{}' asked for as quantized, but the "
                "checkpoint has no quantization config", dir_, module);
  const quant::QuantScheme& s = *scheme_;
  const char* method = quant::quant_method_name(s.method);
  const QuantTensorNames names = quant_tensor_names(s.method);
  for (const char* r : names.required)
    MOELORA_CHECK(ck_.contains(module + "." + r),
                  "checkpoint {}: quantized module '{}' ({}): missing tensor '{}.{}'", dir_,
                  module, method, module, r);
  // The format's loaders read one file; real checkpoints never split a module over shards.
  const SafetensorsFile& f = ck_.file_of(module + "." + names.required[0]);
  std::vector<std::string> present;
  for (const auto* list : {&names.required, &names.optional})
    for (const char* r : *list) {
      const std::string name = module + "." + r;
      if (!ck_.contains(name)) continue;
      MOELORA_CHECK(f.contains(name),
                    "checkpoint {}: the tensors of quantized module '{}' are split over shards "
                    "('{}' is not in {}); not supported",
                    dir_, module, name, f.path());
      present.push_back(name);
    }
  QuantizedLinear q;
  q.module = module;
  q.method = s.method;
  auto opt = [&](const char* suffix) {
    const std::string name = module + "." + suffix;
    return f.contains(name) ? f.tensor(name) : Tensor();
  };
  switch (s.method) {
    case quant::QuantMethod::gptq:
      q.gptq = {f.tensor(module + ".qweight"), f.tensor(module + ".scales"),
                f.tensor(module + ".qzeros"), opt("g_idx")};
      q.dims = quant::validate_gptq(q.gptq, s.gptq, module);
      break;
    case quant::QuantMethod::awq:
      q.awq = {f.tensor(module + ".qweight"), f.tensor(module + ".qzeros"),
               f.tensor(module + ".scales")};
      q.dims = quant::validate_awq(q.awq, s.awq, module);
      break;
    case quant::QuantMethod::ct_pack:
      q.ct = {f.tensor(module + ".weight_packed"), f.tensor(module + ".weight_scale"),
              f.tensor(module + ".weight_shape"), opt("weight_zero_point"), opt("weight_g_idx")};
      q.dims = quant::validate_ct_pack(q.ct, s.ct, module);
      break;
    case quant::QuantMethod::fp8_block:
      // load_fp8_block also undoes transformers 5's 1-D squeeze of one-row scale grids.
      q.fp8 = quant::load_fp8_block(f, module, s.fp8);
      q.dims = quant::fp8_block_dims(s.fp8, q.fp8.weight.size(0), q.fp8.weight.size(1));
      break;
    case quant::QuantMethod::nvfp4:
      q.nvfp4 = {f.tensor(module + ".weight"), f.tensor(module + ".weight_scale"),
                 f.tensor(module + ".weight_scale_2"), opt("input_scale")};
      q.dims = quant::validate_nvfp4(q.nvfp4, module);
      break;
  }
  MOELORA_CHECK(q.dims.n == n && q.dims.k == k,
                "checkpoint {}: quantized module '{}' ({}) holds a [{}, {}] weight, expected "
                "[{}, {}]",
                dir_, module, method, q.dims.n, q.dims.k, n, k);
  for (const std::string& name : present) mark_used(name);
  return q;
}

Tensor WeightLoader::bf16(const std::string& name, const Shape& shape) {
  if (random_) {
    Tensor t = Tensor::empty(shape, DType::bf16, random_->device);
    fill_random(t, name, shape.size() >= 2 ? shape.back() : 0);
    return t;
  }
  if (scheme_ && shape.size() == 2 && ends_with(name, ".weight")) {
    const std::string module = name.substr(0, name.size() - 7);
    if (is_quantized(module)) {
      const Tensor w = dequantize(quantized(module, shape[0], shape[1]), *scheme_);
      Tensor out = Tensor::empty(shape, DType::bf16);
      const float* s = w.data<float>();
      bf16_t* o = out.data<bf16_t>();
      for (int64_t i = 0; i < w.numel(); ++i) o[i] = float_to_bf16(s[i]);
      return out;
    }
  }
  MOELORA_CHECK(ck_.contains(name), "checkpoint {}: missing tensor '{}' (expected {} bf16{})",
                dir_, name, shape_str(shape),
                scheme_ ? fmt::format(", or the {} tensors of a quantized module",
                                      quant::quant_method_name(scheme_->method))
                        : std::string());
  const SafetensorsEntry& e = ck_.entry(name);
  MOELORA_CHECK(e.shape == shape, "checkpoint {}: tensor '{}' has shape {}, expected {}", dir_,
                name, shape_str(e.shape), shape_str(shape));
  MOELORA_CHECK(e.dtype == "BF16" || e.dtype == "F32" || e.dtype == "F16",
                "checkpoint {}: tensor '{}' has dtype {}, expected BF16 (or F32 / F16)", dir_,
                name, e.dtype);
  mark_used(name);
  Tensor t = ck_.tensor(name);
  if (t.dtype() == DType::bf16) return t;
  Tensor out = Tensor::empty(shape, DType::bf16);
  bf16_t* o = out.data<bf16_t>();
  for (int64_t i = 0; i < t.numel(); ++i) o[i] = float_to_bf16(float_at(t, i));
  return out;
}

void WeightLoader::copy_into(const std::string& name, const Shape& shape, Tensor& dst, int64_t at) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  MOELORA_CHECK(dst.dtype() == DType::bf16 && dst.is_contiguous(),
                "copy_into: destination of '{}' must be contiguous bf16, found {}", name,
                dst.describe());
  MOELORA_CHECK(at >= 0 && at + numel <= dst.numel(),
                "copy_into: tensor '{}' ({}) does not fit at {} of {}", name, shape_str(shape), at,
                dst.describe());
  Tensor slice = dst.view({dst.numel()}).narrow(0, at, numel);
  if (random_) {
    fill_random(slice, name, shape.size() >= 2 ? shape.back() : 0);
    return;
  }
  slice.copy_from(bf16(name, shape).view({numel}));
}

ExpertMatrices WeightLoader::random_experts(const std::string& name, int64_t groups, int64_t n,
                                            int64_t k) {
  MOELORA_CHECK(random_.has_value(), "checkpoint {}: random experts asked of a real checkpoint",
                dir_);
  const WeightFormat f = random_->experts_format;
  if (f == WeightFormat::bf16) {
    Tensor w = Tensor::empty({groups, n, k}, DType::bf16, random_->device);
    fill_random(w, name, k);
    return ExpertMatrices(w);
  }
  int64_t g = random_->group_size;
  if (g == 0 && f == WeightFormat::nvfp4) g = quant::kNvfp4GroupSize;
  if (g == 0 && f == WeightFormat::fp8_block) g = 128;
  if (g == 0) {  // int4 / int8: the largest supported group that divides K
    g = -1;
    for (int64_t c : {128, 64, 32})
      if (k % c == 0) {
        g = c;
        break;
      }
  }
  ExpertMatrices m = quant::random_experts(f, groups, n, k, g, 1.0f / std::sqrt(float(k)),
                                           seed_of(name), random_->device, stream_);
  stream_.synchronize();
  return m;
}

int64_t WeightLoader::skip_prefix(const std::string& prefix, const std::string& why) {
  if (random_) return 0;
  int64_t n = 0;
  for (const std::string& name : ck_.names())
    if (name.starts_with(prefix) && used_.insert(name).second) ++n;
  if (n > 0)
    fmt::print(stderr, "moelora: checkpoint {}: skipping {} tensor(s) '{}*': {}\n", dir_, n, prefix,
               why);
  return n;
}

void WeightLoader::check_all_used() const {
  if (random_) return;
  std::vector<std::string> unused;
  for (const std::string& n : ck_.names())
    if (!used_.count(n)) unused.push_back(n);
  if (unused.empty()) return;
  std::string list;
  for (size_t i = 0; i < unused.size() && i < 8; ++i) list += (i ? ", '" : "'") + unused[i] + "'";
  if (unused.size() > 8) list += fmt::format(" and {} more", unused.size() - 8);
  MOELORA_THROW(
      "checkpoint {}: {} tensor(s) are not used by the model (unexpected keys: {}); "
      "refusing to drop weights silently",
      dir_, unused.size(), list);
}

}  // namespace moelora
