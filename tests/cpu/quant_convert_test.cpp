// `moelora convert` (quant::convert_checkpoint): a tiny sharded HF-like model converted to every
// format, read back through the formats' loaders and quant_config detection.
#include "moelora/quant/convert.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "moelora/quant/nvfp4.h"
#include "moelora/quant/quant_config.h"
#include "quant_test_util.h"

namespace moelora {
namespace {

namespace fs = std::filesystem;
using namespace quant;
using quant_test::temp_path;

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream(p) << s;
}

// A two-shard model: attention + embedding + norms in shard 1; two experts, the router,
// lm_head and a bias in shard 2.
struct TinyModel {
  fs::path dir;
  std::map<std::string, Tensor> tensors;  // every tensor of the model
  std::vector<std::string> projections;   // the ones convert must quantize

  explicit TinyModel(const std::string& name, int64_t k_odd = 0) : dir(temp_path(name)) {
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::mt19937_64 rng(test::fresh_seed());
    std::map<std::string, Tensor> s1, s2;
    const int64_t h = 128, inter = 128, vocab = 32;
    auto rnd = [&](const Shape& s, float scale = 1.0f) {
      return test::random_tensor(s, DType::bf16, rng, -scale, scale);
    };
    s1["model.embed_tokens.weight"] = rnd({vocab, h});
    s1["model.norm.weight"] = rnd({h});
    s1["model.layers.0.input_layernorm.weight"] = rnd({h});
    s1["model.layers.0.self_attn.q_proj.weight"] = rnd({64, h}, 0.5f);
    s1["model.layers.0.self_attn.q_proj.bias"] = rnd({64});
    s1["model.layers.0.self_attn.o_proj.weight"] = rnd({h, 128 + k_odd}, 2.0f);
    for (int e = 0; e < 2; ++e) {
      const std::string p = "model.layers.0.mlp.experts." + std::to_string(e) + ".";
      s2[p + "gate_proj.weight"] = rnd({inter, h});
      s2[p + "up_proj.weight"] = rnd({inter, h}, 0.25f);
      s2[p + "down_proj.weight"] = rnd({h, inter});
    }
    s2["model.layers.0.mlp.gate.weight"] = rnd({8, h});
    s2["lm_head.weight"] = rnd({vocab, h});
    s2["model.layers.0.mlp.expert_ids"] = quant_test::i32_tensor({3, 1}, {2});  // non-float buffer
    quant_test::write_file((dir / "model-00001-of-00002.safetensors").string(), s1);
    quant_test::write_file((dir / "model-00002-of-00002.safetensors").string(), s2);
    nlohmann::json map = nlohmann::json::object();
    for (auto& [n, t] : s1) map[n] = "model-00001-of-00002.safetensors", tensors[n] = t;
    for (auto& [n, t] : s2) map[n] = "model-00002-of-00002.safetensors", tensors[n] = t;
    write_text(dir / "model.safetensors.index.json",
               nlohmann::json{{"metadata", {{"total_size", 0}}}, {"weight_map", map}}.dump());
    write_text(dir / "config.json",
               R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 128,
                   "num_experts": 2, "torch_dtype": "bfloat16"})");
    write_text(dir / "tokenizer.json", R"({"version": "1.0"})");
    for (const auto& [n, t] : tensors)
      if (n.find("_proj.weight") != std::string::npos) projections.push_back(n);
  }
  ~TinyModel() { fs::remove_all(dir); }
};

// The output checkpoint: tensor name -> its shard, opened lazily.
struct Output {
  fs::path dir;
  std::map<std::string, std::string> shard_of;
  std::map<std::string, std::unique_ptr<SafetensorsFile>> files;

  explicit Output(const fs::path& d) : dir(d) {
    const auto idx = nlohmann::json::parse(read_text(d / "model.safetensors.index.json"));
    for (const auto& [n, f] : idx["weight_map"].items()) shard_of[n] = f.get<std::string>();
  }
  bool has(const std::string& name) const { return shard_of.count(name) != 0; }
  const SafetensorsFile& file(const std::string& name) {
    EXPECT_TRUE(has(name)) << name;
    auto& f = files[shard_of.at(name)];
    if (!f) f = std::make_unique<SafetensorsFile>((dir / shard_of.at(name)).string());
    return *f;
  }
};

QuantScheme read_scheme(const fs::path& out, ConvertFormat f) {
  const std::string name = f == ConvertFormat::nvfp4 ? "hf_quant_config.json" : "config.json";
  return parse_quant_config(read_text(out / name), name);
}

// Loads and dequantizes `module` from the output; also returns what the same quantizer gives
// in memory (the file must reproduce it exactly).
std::pair<Tensor, Tensor> dequantized(Output& o, const QuantScheme& s, ConvertFormat f,
                                      const std::string& module, const Tensor& w) {
  switch (s.method) {
    case QuantMethod::gptq: {
      const SafetensorsFile& file = o.file(module + ".qweight");
      return {dequantize_gptq(load_gptq(file, module, s.gptq), s.gptq),
              dequantize_gptq(quantize_gptq(w, s.gptq), s.gptq)};
    }
    case QuantMethod::awq:
      return {dequantize_awq(load_awq(o.file(module + ".qweight"), module, s.awq), s.awq),
              dequantize_awq(quantize_awq(w, s.awq), s.awq)};
    case QuantMethod::ct_pack:
      return {
          dequantize_ct_pack(load_ct_pack(o.file(module + ".weight_packed"), module, s.ct), s.ct),
          dequantize_ct_pack(quantize_ct_pack(w, s.ct, w.dtype()), s.ct)};
    case QuantMethod::fp8_block:
      return {
          dequantize_fp8_block(load_fp8_block(o.file(module + ".weight"), module, s.fp8), s.fp8),
          dequantize_fp8_block(quantize_fp8_block(w, s.fp8), s.fp8)};
    case QuantMethod::nvfp4:
      return {dequantize_nvfp4(load_nvfp4(o.file(module + ".weight"), module)),
              dequantize_nvfp4(quantize_nvfp4(w, 2688.0f))};
  }
  (void)f;
  return {};
}

// The largest error the format's rounding allows for a weight whose |values| <= amax: one
// integer step of the widest group (half a step of rounding, plus the shift of a rounded zero
// point and the rounding of the scale to f16 / bf16).
double step_bound(ConvertFormat f, double amax, double w) {
  switch (f) {
    case ConvertFormat::gptq_int4:
    case ConvertFormat::awq_int4:
    case ConvertFormat::ct_int4:
      return 1.05 * (2 * amax / 15) + 1e-6;
    case ConvertFormat::gptq_int8:
    case ConvertFormat::ct_int8:
      return 1.05 * (2 * amax / 255) + 1e-6;
    case ConvertFormat::fp8_block:  // 3 mantissa bits, plus the subnormal step
      return std::abs(w) / 16 + amax / 448 * std::ldexp(1.0, -10);
    case ConvertFormat::nvfp4:  // half the e2m1 step between 4 and 6, scale rounded to e4m3
      return 1.07 * amax / 6 + 1e-6;
  }
  return 0;
}

struct FormatCase {
  ConvertFormat format;
  int64_t group_size;
  bool sym;
};

class ConvertEachFormat : public ::testing::TestWithParam<FormatCase> {};

TEST_P(ConvertEachFormat, RoundTripsThroughLoaderAndConfig) {
  const FormatCase c = GetParam();
  TinyModel model(std::string("conv_in_") + convert_format_name(c.format));
  const fs::path out = temp_path(std::string("conv_out_") + convert_format_name(c.format));
  fs::remove_all(out);
  ConvertOptions o;
  o.in_dir = model.dir.string();
  o.out_dir = out.string();
  o.format = c.format;
  o.group_size = c.group_size;
  o.sym = c.sym;
  int64_t calls = 0;
  const ConvertReport r = convert_checkpoint(o, [&](const ConvertProgress& p) {
    EXPECT_EQ(p.index, ++calls);
    EXPECT_EQ(p.total, int64_t(model.tensors.size()));
  });
  EXPECT_EQ(calls, int64_t(model.tensors.size()));
  std::vector<std::string> expect_q = model.projections;
  std::vector<std::string> got_q = r.quantized;
  std::sort(expect_q.begin(), expect_q.end());
  std::sort(got_q.begin(), got_q.end());
  EXPECT_EQ(got_q, expect_q);
  EXPECT_EQ(r.skipped.size(), model.tensors.size() - model.projections.size());
  EXPECT_EQ(r.ignored_modules, (std::vector<std::string>{"lm_head", "model.layers.0.mlp.gate"}));
  EXPECT_LT(r.bytes_out, r.bytes_in);
  EXPECT_EQ(read_text(out / "tokenizer.json"), read_text(model.dir / "tokenizer.json"));

  // The written config reads back as the format and settings asked for.
  const QuantScheme s = read_scheme(out, c.format);
  const auto config = nlohmann::json::parse(read_text(out / "config.json"));
  EXPECT_EQ(config["hidden_size"], 128);
  switch (c.format) {
    case ConvertFormat::gptq_int4:
    case ConvertFormat::gptq_int8:
      EXPECT_EQ(s.method, QuantMethod::gptq);
      EXPECT_EQ(s.gptq.bits, c.format == ConvertFormat::gptq_int4 ? 4 : 8);
      EXPECT_EQ(s.gptq.group_size, c.group_size ? c.group_size : 128);
      EXPECT_EQ(s.gptq.sym, c.sym);
      EXPECT_EQ(s.gptq.zero_format, GptqZeroFormat::v1_minus_one);
      EXPECT_EQ(read_scheme(out, c.format).gptq.bits,
                parse_quant_config(read_text(out / "quantize_config.json"), "q").gptq.bits);
      break;
    case ConvertFormat::awq_int4:
      EXPECT_EQ(s.method, QuantMethod::awq);
      EXPECT_EQ(s.awq.group_size, c.group_size ? c.group_size : 128);
      break;
    case ConvertFormat::ct_int4:
    case ConvertFormat::ct_int8:
      EXPECT_EQ(s.method, QuantMethod::ct_pack);
      EXPECT_EQ(s.ct.bits, c.format == ConvertFormat::ct_int4 ? 4 : 8);
      EXPECT_EQ(s.ct.strategy, c.group_size == -1 ? CtStrategy::channel : CtStrategy::group);
      EXPECT_EQ(s.ct.symmetric, c.sym);
      EXPECT_FALSE(s.ct_actorder);
      break;
    case ConvertFormat::fp8_block:
      EXPECT_EQ(s.method, QuantMethod::fp8_block);
      EXPECT_EQ(s.fp8.block_n, c.group_size ? c.group_size : 128);
      break;
    case ConvertFormat::nvfp4:
      EXPECT_EQ(s.method, QuantMethod::nvfp4);
      EXPECT_FALSE(config.contains("quantization_config"));
      break;
  }
  if (c.format != ConvertFormat::gptq_int4 && c.format != ConvertFormat::gptq_int8)
    EXPECT_EQ(s.unquantized_modules, r.ignored_modules);

  Output output(out);
  for (const std::string& name : model.projections) {
    const std::string module = name.substr(0, name.size() - 7);
    const Tensor& w = model.tensors.at(name);
    if (c.format == ConvertFormat::gptq_int4 || c.format == ConvertFormat::gptq_int8 ||
        c.format == ConvertFormat::awq_int4 || c.format == ConvertFormat::ct_int4 ||
        c.format == ConvertFormat::ct_int8)
      EXPECT_FALSE(output.has(name)) << name << " should be replaced by the packed tensors";
    const auto [from_file, in_memory] = dequantized(output, s, c.format, module, w);
    const std::vector<float> a = test::to_floats(from_file), b = test::to_floats(in_memory),
                             orig = test::to_floats(w);
    ASSERT_EQ(a.size(), orig.size()) << name;
    EXPECT_EQ(a, b) << name << ": the file does not reproduce the quantizer";
    double amax = 0;
    for (float v : orig) amax = std::max(amax, double(std::abs(v)));
    for (size_t i = 0; i < a.size(); ++i) {
      const double bound = step_bound(c.format, amax, orig[i]);
      ASSERT_LE(std::abs(double(a[i]) - orig[i]), bound)
          << name << "[" << i << "]: " << a[i] << " vs " << orig[i];
    }
  }
  // Everything not quantized is copied byte for byte, with its dtype and shape.
  SafetensorsFile in1((model.dir / "model-00001-of-00002.safetensors").string());
  SafetensorsFile in2((model.dir / "model-00002-of-00002.safetensors").string());
  for (const auto& [name, why] : r.skipped) {
    const SafetensorsFile& src = in1.contains(name) ? in1 : in2;
    const SafetensorsFile& dst = output.file(name);
    ASSERT_EQ(dst.entry(name).dtype, src.entry(name).dtype) << name;
    ASSERT_EQ(dst.entry(name).shape, src.entry(name).shape) << name;
    const size_t bytes = src.entry(name).end - src.entry(name).begin;
    EXPECT_EQ(std::memcmp(dst.raw(name), src.raw(name), bytes), 0) << name << " (" << why << ")";
  }
  fs::remove_all(out);
}

INSTANTIATE_TEST_SUITE_P(Formats, ConvertEachFormat,
                         ::testing::Values(FormatCase{ConvertFormat::gptq_int4, 0, true},
                                           FormatCase{ConvertFormat::gptq_int4, 32, false},
                                           FormatCase{ConvertFormat::gptq_int8, -1, false},
                                           FormatCase{ConvertFormat::awq_int4, 64, false},
                                           FormatCase{ConvertFormat::ct_int4, 0, true},
                                           FormatCase{ConvertFormat::ct_int8, -1, false},
                                           FormatCase{ConvertFormat::ct_int4, 32, false},
                                           FormatCase{ConvertFormat::fp8_block, 0, false},
                                           FormatCase{ConvertFormat::fp8_block, 48, false},
                                           FormatCase{ConvertFormat::nvfp4, 0, false}),
                         [](const auto& info) {
                           std::string n =
                               std::string(convert_format_name(info.param.format)) + "_g" +
                               (info.param.group_size < 0 ? "m1"
                                                          : std::to_string(info.param.group_size)) +
                               (info.param.sym ? "_sym" : "");
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

TEST(QuantConvert, SkipRule) {
  EXPECT_FALSE(quantizable_weight("model.layers.3.self_attn.q_proj.weight", "BF16", {64, 128}));
  EXPECT_FALSE(quantizable_weight("model.layers.3.mlp.experts.17.down_proj.weight", "F16", {8, 8}));
  EXPECT_FALSE(
      quantizable_weight("model.layers.0.block_sparse_moe.experts.1.w3.weight", "F32", {8, 8}));
  EXPECT_FALSE(quantizable_weight("model.layers.0.self_attn.kv_b_proj.weight", "BF16", {8, 8}));
  EXPECT_EQ(*quantizable_weight("model.embed_tokens.weight", "BF16", {8, 8}), "embedding");
  EXPECT_EQ(*quantizable_weight("model.layers.0.post_attention_layernorm.weight", "BF16", {8}),
            "norm");
  EXPECT_NE(quantizable_weight("lm_head.weight", "BF16", {8, 8})->find("lm_head"),
            std::string::npos);
  EXPECT_NE(quantizable_weight("model.layers.0.mlp.gate.weight", "BF16", {8, 8})->find("router"),
            std::string::npos);
  EXPECT_NE(quantizable_weight("model.layers.0.mlp.shared_expert_gate.weight", "BF16", {1, 8})
                ->find("router"),
            std::string::npos);
  EXPECT_TRUE(quantizable_weight("model.layers.0.self_attn.q_proj.bias", "BF16", {8}));
  EXPECT_TRUE(
      quantizable_weight("model.layers.0.mlp.experts.gate_up_proj.weight", "BF16", {2, 8, 8}));
  EXPECT_TRUE(quantizable_weight("model.layers.0.self_attn.q_proj.weight", "F8_E4M3", {8, 8}));
}

TEST(QuantConvert, SingleFileModel) {
  TinyModel m("conv_single");
  for (const auto& entry : fs::directory_iterator(m.dir))
    if (entry.path().extension() == ".safetensors" || entry.path().extension() == ".json")
      if (entry.path().filename() != "config.json") fs::remove(entry.path());
  quant_test::write_file((m.dir / "model.safetensors").string(), m.tensors);
  const fs::path out = temp_path("conv_single_out");
  fs::remove_all(out);
  ConvertOptions o;
  o.in_dir = m.dir.string();
  o.out_dir = out.string();
  o.format = ConvertFormat::fp8_block;
  const ConvertReport r = convert_checkpoint(o);
  EXPECT_EQ(r.files, (std::vector<std::string>{"model.safetensors", "config.json"}));
  EXPECT_FALSE(fs::exists(out / "model.safetensors.index.json"));
  SafetensorsFile f((out / "model.safetensors").string());
  EXPECT_EQ(f.metadata().at("format"), "pt");
  for (const std::string& name : m.projections) {
    EXPECT_EQ(f.entry(name).dtype, "F8_E4M3") << name;
    EXPECT_TRUE(f.contains(name + "_scale_inv")) << name;
  }
  EXPECT_EQ(f.entry("lm_head.weight").dtype, "BF16");
  fs::remove_all(out);
}

TEST(QuantConvert, BadInput) {
  EXPECT_QUANT_ERROR([] { parse_convert_format("int3"); }, "unknown format \"int3\"", "gptq-int4",
                     "nvfp4");
  const fs::path out = temp_path("conv_bad_out");
  fs::remove_all(out);
  ConvertOptions o;
  o.out_dir = out.string();
  {  // missing config.json
    TinyModel m("conv_bad_noconfig");
    fs::remove(m.dir / "config.json");
    o.in_dir = m.dir.string();
    EXPECT_QUANT_ERROR([&] { convert_checkpoint(o); }, "missing config.json");
  }
  {  // K = 160 is not a multiple of 64: refused before anything is written, naming the tensor
    TinyModel m("conv_bad_k", 32);
    o.in_dir = m.dir.string();
    o.group_size = 64;
    EXPECT_QUANT_ERROR([&] { convert_checkpoint(o); }, "model.layers.0.self_attn.o_proj.weight",
                       "[128, 160]", "group_size 64 must divide K = 160", "nothing was written");
    EXPECT_FALSE(fs::exists(out));
    o.group_size = 32;  // fits
    EXPECT_NO_THROW(convert_checkpoint(o));
    // a non-empty output directory is not overwritten
    EXPECT_QUANT_ERROR([&] { convert_checkpoint(o); }, "not empty");
    fs::remove_all(out);
    o.format = ConvertFormat::nvfp4;  // K = 160 is a multiple of 16
    o.group_size = 128;
    EXPECT_QUANT_ERROR([&] { convert_checkpoint(o); }, "nvfp4 groups are 16");
    o.format = ConvertFormat::awq_int4;
    o.group_size = 0;
    o.sym = true;
    EXPECT_QUANT_ERROR([&] { convert_checkpoint(o); }, "--sym", "awq-int4");
    o.sym = false;
    o.format = ConvertFormat::gptq_int4;
    o.group_size = 100;
    EXPECT_QUANT_ERROR([&] { convert_checkpoint(o); }, "group_size", "100");
    o.group_size = 0;
    // an already quantized model
    write_text(m.dir / "config.json", R"({"quantization_config": {"quant_method": "fp8"}})");
    EXPECT_QUANT_ERROR([&] { convert_checkpoint(o); }, "already quantized");
    // no weights
    write_text(m.dir / "config.json", "{}");
    fs::remove(m.dir / "model.safetensors.index.json");
    EXPECT_QUANT_ERROR([&] { convert_checkpoint(o); }, "no model.safetensors");
  }
  EXPECT_FALSE(fs::exists(out));
}

}  // namespace
}  // namespace moelora
