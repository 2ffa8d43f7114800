#include "moelora/quant/convert.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "moelora/io/safetensors.h"
#include "moelora/quant/awq.h"
#include "moelora/quant/compressed_tensors.h"
#include "moelora/quant/fp8_block.h"
#include "moelora/quant/gptq.h"
#include "moelora/quant/nvfp4.h"

namespace moelora::quant {
namespace fs = std::filesystem;
using ordered_json = nlohmann::ordered_json;

const std::vector<std::string> kConvertProjectionNames = {
    "q_proj",    "k_proj",  "v_proj",    "o_proj",       "qkv_proj",
    "gate_proj", "up_proj", "down_proj", "gate_up_proj", "w1",
    "w2",        "w3",      "q_a_proj",  "q_b_proj",     "kv_a_proj_with_mqa",
    "kv_b_proj"};

namespace {

constexpr const char* kFormatNames[] = {"gptq-int4", "gptq-int8", "awq-int4", "ct-int4",
                                        "ct-int8",   "fp8-block", "nvfp4"};
constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_embedding(const std::string& module) {
  const std::string leaf = module.substr(module.rfind('.') + 1);
  return module.find("embed") != std::string::npos || leaf == "wte" || leaf == "wpe";
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  MOELORA_CHECK(in.good(), "cannot read {}", p.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  MOELORA_CHECK(out.good(), "cannot write {}", p.string());
  out << text;
  MOELORA_CHECK(out.good(), "write to {} failed", p.string());
}

ordered_json parse_json_file(const fs::path& p) {
  try {
    return ordered_json::parse(read_text(p));
  } catch (const nlohmann::json::exception& e) {
    MOELORA_THROW("{}: not valid JSON: {}", p.string(), e.what());
  }
}

// The settings of one conversion, with the format's defaults resolved.
struct Plan {
  ConvertFormat format;
  GptqConfig gptq;
  AwqConfig awq;
  CtPackConfig ct;
  Fp8BlockConfig fp8;
  float input_amax = 0.0f;
};

Plan make_plan(const ConvertOptions& o) {
  Plan p;
  p.format = o.format;
  const int64_t g =
      o.group_size == 0 ? (o.format == ConvertFormat::nvfp4 ? 16 : 128) : o.group_size;
  const char* name = convert_format_name(o.format);
  switch (o.format) {
    case ConvertFormat::gptq_int4:
    case ConvertFormat::gptq_int8:
      p.gptq.bits = o.format == ConvertFormat::gptq_int4 ? 4 : 8;
      p.gptq.group_size = g;
      p.gptq.sym = o.sym;
      p.gptq.desc_act = false;  // round-to-nearest has no activation order to follow
      p.gptq.zero_format = GptqZeroFormat::v1_minus_one;
      gptq_dims(p.gptq, 256, 1024);  // refuses unsupported group sizes up front
      break;
    case ConvertFormat::awq_int4:
      MOELORA_CHECK(!o.sym,
                    "--sym: awq-int4 (GEMM) always stores zero points; use gptq-int4 "
                    "--sym or ct-int4 --sym for symmetric int4");
      p.awq.group_size = g;
      awq_dims(p.awq, 256, 1024);
      break;
    case ConvertFormat::ct_int4:
    case ConvertFormat::ct_int8:
      p.ct.bits = o.format == ConvertFormat::ct_int4 ? 4 : 8;
      p.ct.strategy = g == -1 ? CtStrategy::channel : CtStrategy::group;
      p.ct.group_size = g == -1 ? 0 : g;
      p.ct.symmetric = o.sym;
      ct_pack_dims(p.ct, 256, 1024);
      break;
    case ConvertFormat::fp8_block:
      MOELORA_CHECK(g > 0,
                    "--group-size: {} uses square blocks of a positive size (default 128), "
                    "found {}",
                    name, g);
      p.fp8.block_n = p.fp8.block_k = g;
      break;
    case ConvertFormat::nvfp4:
      MOELORA_CHECK(g == kNvfp4GroupSize, "--group-size: nvfp4 groups are 16 elements, found {}",
                    g);
      MOELORA_CHECK(o.nvfp4_input_amax > 0.0f && std::isfinite(o.nvfp4_input_amax),
                    "nvfp4 input amax: expected a finite positive value, found {}",
                    o.nvfp4_input_amax);
      p.input_amax = o.nvfp4_input_amax;
      break;
  }
  return p;
}

// The format's size check for one weight (throws with the reason).
void check_fits(const Plan& p, int64_t n, int64_t k) {
  switch (p.format) {
    case ConvertFormat::gptq_int4:
    case ConvertFormat::gptq_int8:
      gptq_dims(p.gptq, n, k);
      break;
    case ConvertFormat::awq_int4:
      awq_dims(p.awq, n, k);
      break;
    case ConvertFormat::ct_int4:
    case ConvertFormat::ct_int8:
      ct_pack_dims(p.ct, n, k);
      break;
    case ConvertFormat::fp8_block:
      fp8_block_dims(p.fp8, n, k);
      break;
    case ConvertFormat::nvfp4:
      nvfp4_dims(n, k);
      break;
  }
}

// Quantizes `w` and adds the format's tensors for `module` to `out`.
void quantize_into(const Plan& p, const std::string& module, const Tensor& w,
                   std::map<std::string, Tensor>& out) {
  switch (p.format) {
    case ConvertFormat::gptq_int4:
    case ConvertFormat::gptq_int8:
      add_gptq_tensors(out, module, quantize_gptq(w, p.gptq));
      break;
    case ConvertFormat::awq_int4:
      add_awq_tensors(out, module, quantize_awq(w, p.awq));
      break;
    case ConvertFormat::ct_int4:
    case ConvertFormat::ct_int8:
      // compressed-tensors stores scales in the weight's dtype.
      add_ct_pack_tensors(out, module, quantize_ct_pack(w, p.ct, w.dtype()));
      break;
    case ConvertFormat::fp8_block:
      add_fp8_block_tensors(out, module, quantize_fp8_block(w, p.fp8));
      break;
    case ConvertFormat::nvfp4:
      add_nvfp4_tensors(out, module, quantize_nvfp4(w, p.input_amax));
      break;
  }
}

ordered_json ignore_list(const std::vector<std::string>& modules) {
  return modules.empty() ? ordered_json(nullptr) : ordered_json(modules);
}

// The config objects as the producing libraries write them.
ordered_json quantization_config(const Plan& p, const std::vector<std::string>& ignored) {
  switch (p.format) {
    case ConvertFormat::gptq_int4:
    case ConvertFormat::gptq_int8:
      // GPTQModel / optimum (no ignore list: GPTQ loaders quantize only the block projections).
      return {{"quant_method", "gptq"},
              {"bits", p.gptq.bits},
              {"group_size", p.gptq.group_size},
              {"desc_act", false},
              {"sym", p.gptq.sym},
              {"lm_head", false},
              {"static_groups", false},
              {"true_sequential", true},
              {"checkpoint_format", "gptq"},
              {"pack_dtype", "int32"},
              {"meta", {{"quantizer", {"moelora:convert"}}}}};
    case ConvertFormat::awq_int4:  // AutoAWQ's to_transformers_dict
      return {{"quant_method", "awq"},
              {"zero_point", true},
              {"group_size", p.awq.group_size},
              {"bits", 4},
              {"version", "gemm"},
              {"modules_to_not_convert", ignore_list(ignored)}};
    case ConvertFormat::ct_int4:
    case ConvertFormat::ct_int8: {  // llm-compressor W4A16 / W8A16 presets
      const bool group = p.ct.strategy == CtStrategy::group;
      ordered_json weights = {
          {"num_bits", p.ct.bits},
          {"type", "int"},
          {"symmetric", p.ct.symmetric},
          {"group_size", group ? ordered_json(p.ct.group_size) : ordered_json(nullptr)},
          {"strategy", group ? "group" : "channel"},
          {"block_structure", nullptr},
          {"dynamic", false},
          {"actorder", nullptr},
          {"observer", "minmax"},
          {"observer_kwargs", ordered_json::object()}};
      ordered_json group0 = {{"targets", {"Linear"}},
                             {"weights", weights},
                             {"input_activations", nullptr},
                             {"output_activations", nullptr},
                             {"format", "pack-quantized"}};
      return {{"quant_method", "compressed-tensors"},
              {"format", "pack-quantized"},
              {"quantization_status", "compressed"},
              {"config_groups", {{"group_0", group0}}},
              {"ignore", ignored},
              {"kv_cache_scheme", nullptr},
              {"global_compression_ratio", nullptr},
              {"sparsity_config", ordered_json::object()}};
    }
    case ConvertFormat::fp8_block:  // DeepSeek-V3's config (+ transformers' ignore key)
      return {{"quant_method", "fp8"},
              {"fmt", "e4m3"},
              {"activation_scheme", "dynamic"},
              {"weight_block_size", {p.fp8.block_n, p.fp8.block_k}},
              {"modules_to_not_convert", ignore_list(ignored)}};
    case ConvertFormat::nvfp4:  // ModelOpt's hf_quant_config.json
      return {{"producer", {{"name", "moelora"}, {"version", "convert"}}},
              {"quantization",
               {{"quant_algo", "NVFP4"},
                {"kv_cache_quant_algo", nullptr},
                {"group_size", kNvfp4GroupSize},
                {"exclude_modules", ignored}}}};
  }
  return {};
}

// One tensor of an output file: a view of bytes owned by a mapped input or by `keep`.
struct RawEntry {
  std::string dtype;
  Shape shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// Writes a safetensors file from raw entries (any dtype, so copied tensors of dtypes moelora
// has no DType for stay byte-identical). Returns the data size.
uint64_t write_safetensors_raw(const fs::path& path, const std::map<std::string, RawEntry>& entries,
                               const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, e] : entries) {
    header[name] = {
        {"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.nbytes}}};
    offset += e.nbytes;
  }
  std::string text = header.dump();
  while (text.size() % 8) text += ' ';  // aligns the data section
  std::ofstream out(path, std::ios::binary);
  MOELORA_CHECK(out.good(), "cannot write {}", path.string());
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(text.size()) >> (8 * i));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(text.data(), std::streamsize(text.size()));
  for (const auto& [name, e] : entries)
    out.write(static_cast<const char*>(e.data), std::streamsize(e.nbytes));
  MOELORA_CHECK(out.good(), "write to {} failed", path.string());
  return offset;
}

const char* safetensors_dtype_string(DType d) {
  switch (d) {
    case DType::f32:
      return "F32";
    case DType::f16:
      return "F16";
    case DType::bf16:
      return "BF16";
    case DType::f8_e4m3:
      return "F8_E4M3";
    case DType::u8:
      return "U8";
    case DType::i32:
      return "I32";
    case DType::i64:
      return "I64";
  }
  return "?";
}

// The input shards in order: the index's files, or the single model.safetensors.
std::vector<std::string> input_shards(const fs::path& in) {
  if (fs::exists(in / kIndexName)) {
    const ordered_json idx = parse_json_file(in / kIndexName);
    const auto it = idx.find("weight_map");
    MOELORA_CHECK(it != idx.end() && it->is_object() && !it->empty(),
                  "{}: expected a non-empty \"weight_map\" object", (in / kIndexName).string());
    std::vector<std::string> files;
    for (const auto& [name, file] : it->items()) {
      MOELORA_CHECK(file.is_string(), "{}: weight_map[\"{}\"]: expected a file name, found {}",
                    (in / kIndexName).string(), name, file.dump());
      const std::string f = file.get<std::string>();
      if (std::find(files.begin(), files.end(), f) == files.end()) files.push_back(f);
    }
    return files;
  }
  MOELORA_CHECK(fs::exists(in / kSingleName),
                "{}: no {} and no {} (expected a Hugging Face model "
                "directory with safetensors weights)",
                in.string(), kSingleName, kIndexName);
  return {kSingleName};
}

}  // namespace

const char* convert_format_name(ConvertFormat f) {
  return kFormatNames[size_t(f)];
}

std::vector<std::string> convert_format_names() {
  return {std::begin(kFormatNames), std::end(kFormatNames)};
}

ConvertFormat parse_convert_format(const std::string& name) {
  for (size_t i = 0; i < std::size(kFormatNames); ++i)
    if (name == kFormatNames[i]) return ConvertFormat(i);
  MOELORA_THROW("--format: unknown format \"{}\"; supported: {}", name,
                fmt::join(convert_format_names(), ", "));
}

std::optional<std::string> quantizable_weight(const std::string& name, const std::string& dtype,
                                              const Shape& shape) {
  if (!ends_with(name, ".weight")) return "not a .weight (bias or other buffer)";
  const std::string module = name.substr(0, name.size() - 7);
  const std::string leaf = module.substr(module.rfind('.') + 1);
  const bool projection = std::find(kConvertProjectionNames.begin(), kConvertProjectionNames.end(),
                                    leaf) != kConvertProjectionNames.end();
  if (!projection) {
    if (is_embedding(module)) return "embedding";
    if (leaf.find("norm") != std::string::npos) return "norm";
    if (leaf == "lm_head") return "lm_head (output head kept in full precision)";
    if (leaf == "gate" || ends_with(leaf, "_gate")) return "router / gate (kept in full precision)";
    return "not a projection name";
  }
  if (shape.size() != 2)
    return fmt::format("projection with {} dims {} (only 2-D [N, K] weights are quantized)",
                       shape.size(), shape_str(shape));
  if (dtype != "BF16" && dtype != "F16" && dtype != "F32")
    return fmt::format("projection of dtype {} (only BF16/F16/F32 weights are quantized)", dtype);
  return std::nullopt;
}

ConvertReport convert_checkpoint(const ConvertOptions& o,
                                 const std::function<void(const ConvertProgress&)>& progress) {
  const Plan plan = make_plan(o);
  const fs::path in(o.in_dir), out(o.out_dir);
  MOELORA_CHECK(fs::is_directory(in), "--in {}: not a directory", o.in_dir);
  MOELORA_CHECK(fs::exists(in / "config.json"),
                "--in {}: missing config.json (expected a Hugging "
                "Face model directory)",
                o.in_dir);
  ordered_json config = parse_json_file(in / "config.json");
  MOELORA_CHECK(config.is_object(), "{}: expected a JSON object", (in / "config.json").string());
  if (auto it = config.find("quantization_config"); it != config.end() && !it->is_null())
    MOELORA_THROW(
        "{}: the model is already quantized (quantization_config {}); convert from "
        "the bf16/f16 checkpoint",
        (in / "config.json").string(), it->dump());
  MOELORA_CHECK(!fs::exists(in / "hf_quant_config.json"),
                "{}: the model is already quantized (hf_quant_config.json present)", o.in_dir);

  // Open every shard and decide each tensor's fate before writing anything.
  const std::vector<std::string> shards = input_shards(in);
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::set<std::string> seen;
  ConvertReport report;
  std::vector<std::string> misfits;
  int64_t total = 0;
  for (const std::string& shard : shards) {
    files.push_back(std::make_unique<SafetensorsFile>((in / shard).string()));
    for (const std::string& name : files.back()->names()) {
      MOELORA_CHECK(seen.insert(name).second, "{}: tensor '{}' also appears in an earlier shard",
                    (in / shard).string(), name);
      ++total;
      const SafetensorsEntry& e = files.back()->entry(name);
      report.bytes_in += e.end - e.begin;
      if (auto why = quantizable_weight(name, e.dtype, e.shape)) {
        report.skipped.emplace_back(name, *why);
        const std::string module = name.substr(0, name.size() - 7);
        if (ends_with(name, ".weight") && e.shape.size() == 2 && !is_embedding(module))
          report.ignored_modules.push_back(module);
        continue;
      }
      try {
        check_fits(plan, e.shape[0], e.shape[1]);
      } catch (const Error& err) {
        misfits.push_back(fmt::format("{} {}: {}", name, shape_str(e.shape), err.message()));
      }
      report.quantized.push_back(name);
    }
  }
  if (!misfits.empty())
    MOELORA_THROW(
        "cannot convert to {}: {} weight(s) do not fit the format (nothing was "
        "written; try another --group-size, or -1 for per-channel):\n  {}",
        convert_format_name(o.format), misfits.size(), fmt::join(misfits, "\n  "));
  std::sort(report.ignored_modules.begin(), report.ignored_modules.end());

  // The output directory: new or empty, and not the input.
  if (fs::exists(out)) {
    MOELORA_CHECK(fs::is_directory(out), "--out {}: exists and is not a directory", o.out_dir);
    MOELORA_CHECK(!fs::equivalent(in, out), "--out {}: is the input directory", o.out_dir);
    MOELORA_CHECK(fs::is_empty(out),
                  "--out {}: exists and is not empty (refusing to mix "
                  "checkpoints)",
                  o.out_dir);
  }
  fs::create_directories(out);

  const std::set<std::string> quantized(report.quantized.begin(), report.quantized.end());
  ordered_json weight_map = ordered_json::object();
  int64_t index = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    const SafetensorsFile& file = *files[s];
    std::map<std::string, Tensor> made;  // quantized tensors (owned until written)
    std::map<std::string, RawEntry> entries;
    for (const std::string& name : file.names()) {
      const bool q = quantized.count(name) != 0;
      if (q) {
        const std::string module = name.substr(0, name.size() - 7);
        std::map<std::string, Tensor> part;
        try {
          quantize_into(plan, module, file.tensor(name), part);
        } catch (const Error& err) {
          MOELORA_THROW("{}: {}", name, err.message());
        }
        for (auto& [k, t] : part) made[k] = t;
      } else {
        const SafetensorsEntry& e = file.entry(name);
        entries[name] = {e.dtype, e.shape, file.raw(name), e.end - e.begin};
      }
      if (progress) progress({++index, total, &name, q});
    }
    for (const auto& [k, t] : made)
      entries[k] = {safetensors_dtype_string(t.dtype()), t.shape(), t.data(), t.nbytes()};
    std::map<std::string, std::string> metadata = file.metadata();
    metadata.emplace("format", "pt");
    report.bytes_out += write_safetensors_raw(out / shards[s], entries, metadata);
    report.files.push_back(shards[s]);
    for (const auto& [k, e] : entries) weight_map[k] = shards[s];
  }
  if (fs::exists(in / kIndexName)) {
    ordered_json idx = {{"metadata", {{"total_size", report.bytes_out}}},
                        {"weight_map", weight_map}};
    write_text(out / kIndexName, idx.dump(2) + "\n");
    report.files.push_back(kIndexName);
  }

  const ordered_json qc = quantization_config(plan, report.ignored_modules);
  report.quantization_config = qc.dump(2);
  if (o.format == ConvertFormat::nvfp4) {
    write_text(out / "hf_quant_config.json", report.quantization_config + "\n");
    report.files.push_back("hf_quant_config.json");
  } else {
    config["quantization_config"] = qc;
    if (o.format == ConvertFormat::gptq_int4 || o.format == ConvertFormat::gptq_int8) {
      write_text(out / "quantize_config.json", report.quantization_config + "\n");
      report.files.push_back("quantize_config.json");
    }
  }
  write_text(out / "config.json", config.dump(2) + "\n");
  report.files.push_back("config.json");

  // Tokenizer, generation config, licence...: every other top-level file, unchanged.
  const std::set<std::string> produced(report.files.begin(), report.files.end());
  for (const auto& entry : fs::directory_iterator(in)) {
    const std::string fname = entry.path().filename().string();
    if (!entry.is_regular_file() || produced.count(fname) || ends_with(fname, ".safetensors") ||
        fname == kIndexName || fname == "quantize_config.json")
      continue;
    fs::copy_file(entry.path(), out / fname);
    report.files.push_back(fname);
  }
  return report;
}

}  // namespace moelora::quant
